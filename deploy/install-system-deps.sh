#!/usr/bin/env bash
# Install the Debian packages the integration tests need, if they are missing.
# mosquitto: the MQTT broker the tests start on a free port; prometheus: promtool and a real scrape;
# docker.io (dockerd, started by deploy/docker-engine.sh), docker-compose (1.29, where compose v2 is
# not installed) and debootstrap: the compose fleet on a real engine (tests/test_compose_fleet.py).
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 ||
  need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged services; the tests run their own on free ports, and
# deploy/docker-engine.sh starts dockerd only for the tests.
systemctl disable --now prometheus >/dev/null 2>&1 || true
if [[ " ${need[*]} " == *" docker.io "* ]]; then
  systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
fi
