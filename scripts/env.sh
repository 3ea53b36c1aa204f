#!/usr/bin/env bash
# Creates .venv and installs the project with its test extras, pinned by scripts/constraints.txt;
# installs again when that file or pyproject.toml changed. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
STAMP=$(cat scripts/constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$STAMP" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c scripts/constraints.txt -e ".[test,gpu,mdf,text,report]"
  echo "$STAMP" > .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
