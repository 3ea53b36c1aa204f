#!/usr/bin/env bash
# Fresh machine to a fitted, labelled taxonomy on the bundled sample.
set -euo pipefail
source "$(dirname "$0")/env.sh"
rm -rf output/demo
mdf-taxonomy run -c configs/demo.yaml "$@"
