#!/usr/bin/env bash
# wrk generates the load; Debian packages it. Installed only when missing.
set -euo pipefail
command -v wrk >/dev/null && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq wrk >/dev/null
