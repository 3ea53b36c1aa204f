#!/usr/bin/env bash
# Fresh machine to a fitted, labelled taxonomy on the bundled sample, and its report.
set -euo pipefail
source "$(dirname "$0")/env.sh"
rm -rf output/demo
mdf-taxonomy run -c configs/demo.yaml "$@"
mdf-taxonomy -q report ./output/demo/taxonomy --data ./output/demo/labelled \
  --labels kingdom,phylum,class,order,family,genus,species --out ./output/demo/report
