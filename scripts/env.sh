#!/usr/bin/env bash
# Creates .venv once and installs the project with its test extras. Sourced by demo.sh and test.sh.
# torch is pinned to the CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import mdf_taxonomy, pytest, sklearn" 2>/dev/null; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c scripts/constraints.txt -e ".[test,gpu,mdf]"
fi
export PATH="$PWD/.venv/bin:$PATH"
