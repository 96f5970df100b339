#!/usr/bin/env bash
# Install the Debian packages skipfleet needs, if they are missing.
#   install-system-deps.sh [--if-possible] [PACKAGE...]
# Packages (default: all of them, for `make test`): mosquitto (the MQTT broker simulate and the
# tests start on a free port), prometheus (promtool and a real scrape in the tests), docker.io
# (dockerd, started by deploy/docker-engine.sh), docker-compose (1.29, where compose v2 is not
# installed) and debootstrap: the compose fleet on a real engine (tests/test_compose_fleet.py);
# systemd (systemd-analyze verifies the agent's unit); chromium and chromium-driver (the
# dashboard's and the report's browser tests drive headless Chromium through Selenium).
# --if-possible (`make run`): where installing cannot work (not root, no apt-get), say so and
# exit 0, leaving the clear error to the program that needs the package.
set -euo pipefail
if_possible=0
if [ "${1:-}" = "--if-possible" ]; then
  if_possible=1
  shift
fi
[ $# -gt 0 ] || set -- mosquitto prometheus docker.io docker-compose debootstrap systemd chromium \
  chromium-driver
need=()
for package in "$@"; do
  case "$package" in
    mosquitto) command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto) ;;
    prometheus) command -v promtool >/dev/null 2>&1 || need+=(prometheus) ;;
    docker.io) command -v dockerd >/dev/null 2>&1 || need+=(docker.io) ;;
    docker-compose)
      command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 ||
        need+=(docker-compose)
      ;;
    debootstrap) command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap) ;;
    systemd) command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd) ;;
    chromium) command -v chromium >/dev/null 2>&1 || need+=(chromium) ;;
    chromium-driver) command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver) ;;
    *)
      echo "install-system-deps.sh: unknown package $package" \
        "(mosquitto, prometheus, docker.io, docker-compose, debootstrap, systemd, chromium," \
        "chromium-driver)" >&2
      exit 2
      ;;
  esac
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
why=""
if [ "$(id -u)" -ne 0 ]; then
  why="not root"
elif ! command -v apt-get >/dev/null 2>&1; then
  why="no apt-get on this machine"
fi
if [ -n "$why" ]; then
  echo "missing packages: ${need[*]} ($why: install them yourself, e.g. sudo apt-get install ${need[*]})" >&2
  [ "$if_possible" -eq 1 ] && exit 0
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged services; skipfleet and the tests run their own on free ports, and
# deploy/docker-engine.sh starts dockerd only for the tests.
systemctl disable --now prometheus >/dev/null 2>&1 || true
if [[ " ${need[*]} " == *" docker.io "* ]]; then
  systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
fi
