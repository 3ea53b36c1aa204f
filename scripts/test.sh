#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under TRITON_INTERPRET=1 where tests ask for it),
# after the style checks CI holds the code to.
set -euo pipefail
source "$(dirname "$0")/env.sh"
# headless Chromium for tests/test_report.py (Debian's; about a minute where it is missing)
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    chromium chromium-driver fonts-liberation
fi
ruff check .
ruff format --check .
python -m pytest -q "$@"
