#!/usr/bin/env bash
# Servers the tests drive for real, from Debian's packages, installed only when missing.
# The tests start and stop them themselves, on 127.0.0.1 only.
set -uo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "note: cannot install ${need[*]} (not root, no sudo): the tests that need them are skipped"
  exit 0
fi
echo "installing test services: ${need[*]}"
$SUDO apt-get update -qq >/dev/null 2>&1
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
  echo "note: could not install ${need[*]}: the tests that need them are skipped"
fi
# Debian starts the packaged services on install; the tests start their own instances.
for service in redis-server prometheus prometheus-node-exporter; do
  $SUDO systemctl stop "$service" >/dev/null 2>&1 || $SUDO service "$service" stop >/dev/null 2>&1 || true
done
exit 0
