#!/bin/bash
# The console's tests drive Debian's Chromium headless through its ChromeDriver (Selenium is
# told where both are: nothing is downloaded at test time). Install them when missing.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo ">> Installing chromium and chromium-driver with apt-get (about a minute)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
