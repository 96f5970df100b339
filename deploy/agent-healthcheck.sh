#!/usr/bin/env bash
# Docker healthcheck of the agent image. The agent rewrites $SKIPFLEET_HEALTH_FILE when it connects
# to the broker and on every heartbeat while connected, so a file older than
# $SKIPFLEET_HEALTH_MAX_AGE_SECONDS (3 heartbeats, say) means disconnected or stuck.
set -euo pipefail
file=${SKIPFLEET_HEALTH_FILE:-/run/skipfleet/health}
max_age=${SKIPFLEET_HEALTH_MAX_AGE_SECONDS:-90}
[[ -f $file ]] || { echo "no health file $file yet"; exit 1; }
age=$(($(date +%s) - $(stat -c %Y "$file")))
((age <= max_age)) || { echo "health file $file is ${age}s old (limit ${max_age}s)"; exit 1; }
echo "ok: health file ${age}s old"
