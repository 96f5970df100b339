#!/usr/bin/env bash
# Run a command with a Docker engine answering; `make test` runs pytest through it.
#
#   deploy/docker-engine.sh run CMD [ARG...]
#
# If an engine answers already (DOCKER_HOST, or /var/run/docker.sock), CMD just runs with it and
# nothing here touches it. If none answers and this runs as root, it starts Debian's dockerd
# (package docker.io, installed by deploy/install-system-deps.sh) for CMD and stops it afterwards,
# whatever CMD's outcome. Several of these may run at once on one machine (two engineers'
# `make test`): the dockerd one of them started is shared, and stopped by the last one to finish.
# Not root and no engine: CMD runs without one (the live Docker tests then fail and say what to do).
#
# Exit status: CMD's. dockerd's log: /var/log/skipfleet-dockerd.log.
set -euo pipefail

state=/run/skipfleet-dockerd # dockerd.pid: the dockerd started here; users/PID: who runs with it
log=/var/log/skipfleet-dockerd.log

usage() {
  echo "usage: $0 run CMD [ARG...]" >&2
  exit 64
}
[[ ${1:-} == run && $# -ge 2 ]] || usage
shift

engine_answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
started_pid() { cat "$state/dockerd.pid" 2>/dev/null || true; }
prune_users() {
  local user
  for user in "$state"/users/*; do
    [[ -e $user ]] || continue
    alive "${user##*/}" || rm -f "$user"
  done
}

start_dockerd() {
  command -v dockerd >/dev/null 2>&1 || {
    echo "docker-engine: no dockerd (apt-get install docker.io)" >&2
    return 1
  }
  echo "docker-engine: no Docker engine answers; starting dockerd (log: $log)" >&2
  setsid dockerd </dev/null >>"$log" 2>&1 &
  echo $! >"$state/dockerd.pid"
  local waited=0
  until engine_answers; do
    if ! alive "$(started_pid)" || ((waited >= 60)); then
      echo "docker-engine: dockerd did not come up; the end of $log:" >&2
      tail -20 "$log" >&2
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

stop_dockerd() {
  local pid waited=0
  pid=$(started_pid)
  rm -f "$state/dockerd.pid"
  alive "$pid" || return 0
  echo "docker-engine: stopping the dockerd started for the tests (pid $pid)" >&2
  kill -TERM "$pid"
  while alive "$pid" && ((waited < 60)); do
    sleep 0.5
    waited=$((waited + 1))
  done
  alive "$pid" && kill -KILL "$pid"
  return 0
}

# Join (or start) the shared engine. Everything under the lock, so that one starts it and the last
# one stops it.
joined=false
join() {
  ((EUID == 0)) || return 0
  mkdir -p "$state/users"
  exec 9>"$state/lock"
  flock 9
  prune_users
  if engine_answers; then
    # Ours (started by another run still going, or left by one that was killed): share it.
    alive "$(started_pid)" && : >"$state/users/$$" && joined=true
  elif start_dockerd; then
    : >"$state/users/$$"
    joined=true
  else
    stop_dockerd
  fi
  flock -u 9
}

leave() {
  $joined || return 0
  flock 9
  rm -f "$state/users/$$"
  prune_users
  if [[ -z $(ls -A "$state/users") ]]; then
    stop_dockerd
  fi
  flock -u 9
}

join
trap leave EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
status=0
"$@" || status=$?
exit "$status"
