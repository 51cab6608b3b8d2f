#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian for the demo's browser test
# (tests/test_app_browser.py), plus Selenium into the project's virtual environment.
# Debian's packages only: nothing downloads a browser of its own.
#
#   scripts/install_browser.sh            # as root (or with sudo available)
#   VENV=/path/to/venv scripts/install_browser.sh
#
# Then: .venv/bin/pytest -m browser tests/test_app_browser.py
set -euo pipefail

VENV="${VENV:-.venv}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core
fi
chromium --version
chromedriver --version

if [ -x "$VENV/bin/python" ]; then
  "$VENV/bin/python" -c "import selenium" 2>/dev/null || "$VENV/bin/python" -m pip install -q "selenium>=4.20"
  "$VENV/bin/python" -c "import selenium; print('selenium', selenium.__version__)"
else
  echo "note: no virtual environment at $VENV; install selenium into yours: pip install 'selenium>=4.20'"
fi
