#!/usr/bin/env bash
# Entrypoint of the coordinator image: start a Ray head node in this container, then run the
# coordinator attached to it (docker-compose.yml passes `--ray-address auto`).
#
# Why a head node started here rather than ray.init() inside the coordinator process:
#  - more machines can add CPUs to the same cluster (`ray start --address=<host>:6379`) without
#    touching the coordinator;
#  - `docker compose exec coordinator ray status` (or `ray list actors`) works for debugging;
#  - the coordinator takes the same code path as on any real Ray cluster. (`--ray-address local`,
#    an in-process ray.init, stays for the process-based fleet and the tests.)
# Why `ray start` without --block: it returns once the head node is up and leaves its processes to
# the container's init (compose `init: true` reaps them), so `exec` can make the coordinator the
# process that gets SIGTERM from `docker stop`; with --block in the background this script would
# have to supervise two processes and forward signals itself. When the coordinator exits, the
# container stops and Ray with it: the head keeps nothing we need (actors checkpoint to the state
# dir, and a restarted container starts a fresh head).
set -euo pipefail

# The object store lives in /dev/shm: keep it below the container's shm_size (512 MB in compose;
# Docker's default 64 MB is below Ray's 75 MiB minimum).
ray start --head \
  --port="${SKIPFLEET_RAY_PORT:-6379}" \
  --num-cpus="${SKIPFLEET_RAY_NUM_CPUS:-2}" \
  --object-store-memory="${SKIPFLEET_RAY_OBJECT_STORE_BYTES:-200000000}" \
  --include-dashboard=false \
  --disable-usage-stats
exec skipfleet coordinator "$@"
