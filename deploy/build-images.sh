#!/usr/bin/env bash
# Build the four images docker-compose.yml runs, on hosts with or without an image registry.
#
#   deploy/build-images.sh
#
# Builds skipfleet-agent, skipfleet-coordinator, skipfleet-mosquitto and skipfleet-prometheus,
# tagged $SKIPFLEET_TAG (default dev), from the repository root. Their bases are the upstream
# images the Dockerfiles name by default (python:3.11-slim-bookworm, eclipse-mosquitto:2,
# prom/prometheus) when the engine has them or can pull them. Where it cannot (no image registry),
# each missing one is replaced by a stand-in built here from Debian's packages
# (deploy/standins/*.Dockerfile), on a Debian 12 base made once with debootstrap (as root) and
# reused while the image skipfleet-standin/debian:bookworm exists.
#
# Environment:
#   SKIPFLEET_TAG            tag of the four images (default dev)
#   SKIPFLEET_STANDINS       auto (default): stand-ins only for what cannot be had; always; never
#   SKIPFLEET_DEBIAN_MIRROR  debootstrap's mirror (default http://deb.debian.org/debian)
#
# Needs BuildKit (build secrets, cache mounts, COPY --chmod): the buildx plugin, or a docker CLI
# older than 23 with BuildKit built in (Debian 12's docker.io, /usr/bin/docker).
#
# What the host's pip needs to reach its package index goes to the build as BuildKit secrets,
# never into a layer (deploy/pip-in-build.sh): pip_cert, the CA bundle pip is set up with
# ($PIP_CERT or pip's `cert` setting), and pip_conf, the http(s) index URLs pip is set up with, if
# any (a file:// index or --find-links folder on the host does not exist inside a build).
set -euo pipefail

cd "$(dirname "$0")/.."
tag=${SKIPFLEET_TAG:-dev}
standins=${SKIPFLEET_STANDINS:-auto}
mirror=${SKIPFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_STANDIN=skipfleet-standin/debian:bookworm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

die() {
  echo "build-images: $*" >&2
  exit 1
}
say() { echo "build-images: $*" >&2; }

[[ $standins =~ ^(auto|always|never)$ ]] || die "SKIPFLEET_STANDINS must be auto, always or never"
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "SKIPFLEET_TAG '$tag' is not a docker tag"
command -v docker >/dev/null 2>&1 || die "no docker CLI (Debian: apt-get install docker.io)"
docker version >/dev/null 2>&1 || die "no Docker engine answers: start dockerd (or set DOCKER_HOST)"

# A docker CLI that builds with BuildKit, into build=(...).
choose_builder() {
  local cli version
  for cli in docker /usr/bin/docker; do
    command -v "$cli" >/dev/null 2>&1 || continue
    if "$cli" buildx version >/dev/null 2>&1; then
      build=("$cli" buildx build --load)
      return
    fi
    version=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [[ ${version%%.*} =~ ^[0-9]+$ ]] && ((${version%%.*} < 23)); then
      build=(env DOCKER_BUILDKIT=1 "$cli" build)
      return
    fi
  done
  die "no docker CLI here builds with BuildKit: install the buildx plugin, or Debian's docker.io"
}

# A pip setting as the host's pip sees it (its config files; the environment is read apart).
pip_setting() {
  local python
  python=$(command -v python3 || true)
  [[ -n $python ]] || return 0
  "$python" -m pip config list 2>/dev/null | sed -n "s/^global\.$1='\(.*\)'\$/\1/p" | tail -1
}

# BuildKit secrets for pip inside the build, into pip_secrets=(...).
choose_pip_secrets() {
  local cert index extra url urls=()
  pip_secrets=()
  cert=${PIP_CERT:-$(pip_setting cert)}
  if [[ -n $cert ]]; then
    [[ -f $cert ]] || die "pip's CA bundle $cert does not exist"
    pip_secrets+=(--secret "id=pip_cert,src=$cert")
  fi
  index=${PIP_INDEX_URL:-$(pip_setting index-url)}
  extra=${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}
  for url in $extra; do
    [[ $url =~ ^https?:// ]] && urls+=("$url")
  done
  [[ $index =~ ^https?:// ]] || index=
  if [[ -n $index || ${#urls[@]} -gt 0 ]]; then
    {
      echo "[global]"
      [[ -z $index ]] || echo "index-url = $index"
      ((${#urls[@]} == 0)) || echo "extra-index-url = ${urls[*]}"
    } >"$work/pip.conf"
    pip_secrets+=(--secret "id=pip_conf,src=$work/pip.conf")
  fi
}

# The upstream image if the engine has it or can pull it, else empty.
upstream() {
  if [[ $standins != always ]] &&
    { docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1; }; then
    echo "$1"
  elif [[ $standins == never ]]; then
    die "cannot pull $1 (SKIPFLEET_STANDINS=never)"
  fi
}

# skipfleet-standin/debian:bookworm: Debian 12 minbase, made once with debootstrap.
debian_standin() {
  docker image inspect "$DEBIAN_STANDIN" >/dev/null 2>&1 && return
  ((EUID == 0)) || die "building $DEBIAN_STANDIN needs root (debootstrap)"
  command -v debootstrap >/dev/null 2>&1 || die "no debootstrap (apt-get install debootstrap)"
  # Two builds at once (two test sessions) make it once.
  exec 9>"${TMPDIR:-/tmp}/skipfleet-standin-debian.lock"
  flock 9
  if ! docker image inspect "$DEBIAN_STANDIN" >/dev/null 2>&1; then
    local root=$work/rootfs
    say "debootstrap --variant=minbase bookworm ($mirror)"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
      die "debootstrap failed: $(tail -5 "$work/debootstrap.log")"
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    # As in Docker's own Debian images: package scripts never start services in a build.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar --numeric-owner -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$DEBIAN_STANDIN" >/dev/null
  fi
  flock -u 9
}

# Build deploy/standins/$1.Dockerfile as $2 (no build context: they copy nothing).
standin() {
  debian_standin
  say "stand-in $2 from Debian's packages"
  "${build[@]}" -t "$2" - <"deploy/standins/$1.Dockerfile" >&2
  echo "$2"
}

timed() {
  local start=$SECONDS
  "$@"
  say "$* took $((SECONDS - start)) s"
}

choose_builder
choose_pip_secrets
start=$SECONDS
python_image=$(upstream python:3.11-slim-bookworm)
[[ -n $python_image ]] || python_image=$(timed standin python skipfleet-standin/python:3.11-bookworm)
mosquitto_image=$(upstream eclipse-mosquitto:2)
[[ -n $mosquitto_image ]] || mosquitto_image=$(timed standin mosquitto skipfleet-standin/mosquitto:bookworm)
prometheus_image=$(upstream prom/prometheus:v2.53.2)
[[ -n $prometheus_image ]] || prometheus_image=$(timed standin prometheus skipfleet-standin/prometheus:bookworm)

for name in agent coordinator; do
  timed "${build[@]}" "${pip_secrets[@]}" --build-arg "PYTHON_IMAGE=$python_image" \
    -f "deploy/$name.Dockerfile" -t "skipfleet-$name:$tag" . >&2
done
timed "${build[@]}" --build-arg "MOSQUITTO_IMAGE=$mosquitto_image" \
  -f deploy/mosquitto.Dockerfile -t "skipfleet-mosquitto:$tag" . >&2
timed "${build[@]}" --build-arg "PROMETHEUS_IMAGE=$prometheus_image" \
  -f deploy/prometheus.Dockerfile -t "skipfleet-prometheus:$tag" . >&2
say "built skipfleet-{agent,coordinator,mosquitto,prometheus}:$tag in $((SECONDS - start)) s" \
  "(bases: $python_image, $mosquitto_image, $prometheus_image)"
