#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under TRITON_INTERPRET=1 where tests ask for it).
set -euo pipefail
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
