#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under TRITON_INTERPRET=1 where tests ask for it),
# after the style checks CI holds the code to.
set -euo pipefail
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
python -m pytest -q "$@"
