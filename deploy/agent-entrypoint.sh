#!/usr/bin/env bash
# Entrypoint of the agent image: work out which device this container is, then run the agent.
#
# Compose scales the agent service to N replicas named <project>-agent-1 .. -N (compose v1:
# <project>_agent_1). Replica n becomes device `device-(n-1)`, the account made by
# deploy/mosquitto/make-accounts.sh, and trains on shard (n-1) mod S of the S shards in
# $SKIPFLEET_SHARDS_DIR. Inside the container $HOSTNAME is the short container id, not the
# container name, so the name is looked up in Docker's embedded DNS (which maps a container's
# address to <container name>.<network>). Any other name (a `docker compose run` container, a
# host with its own name) becomes a device id as the agent itself does it (agent.config.device_id_from_hostname): lower case, runs of characters outside
# [a-z0-9-] -> '-', trimmed, at most 64 characters; its shard then comes from a checksum.
# SKIPFLEET_DEVICE_ID, if set, wins over all of this.
#
# Environment (defaults are the image's layout):
#   SKIPFLEET_SHARDS_DIR             shard-0.npz .. shard-(S-1).npz (or shard-K/ directories)
#   SKIPFLEET_BASE_MODEL             the pre-trained base model (.npz)
#   SKIPFLEET_STATE_ROOT             per-device state dirs are created below it
#   SKIPFLEET_MQTT_USERNAME          default: the device id (the broker ACL needs user == id)
#   SKIPFLEET_MQTT_PASSWORD_FILE     this device's password, or else
#   SKIPFLEET_DEVICE_PASSWORDS_FILE  `user:password` lines, one per device (compose secret)
#   SKIPFLEET_RUNTIME_DIR            where the chosen password is written (a tmpfs in compose)
# Arguments are passed on to `skipfleet agent` (e.g. --heartbeat-seconds 10).
set -euo pipefail
shopt -s extglob

shards_dir=${SKIPFLEET_SHARDS_DIR:-/data/fleet/shards}
base_model=${SKIPFLEET_BASE_MODEL:-/data/fleet/base.npz}
state_root=${SKIPFLEET_STATE_ROOT:-/var/lib/skipfleet}
runtime_dir=${SKIPFLEET_RUNTIME_DIR:-/run/skipfleet}

die() {
  echo "agent-entrypoint: $*" >&2
  exit 64 # the agent's own exit code for a bad configuration
}

# The container's name if Docker's DNS knows it, else the host name.
container_name() {
  local address name
  if [[ $HOSTNAME =~ ^[0-9a-f]{12}$ ]]; then
    read -r address _ < <(getent hosts "$HOSTNAME" || true) || true
    if [[ -n ${address:-} ]]; then
      # -s hosts:dns skips /etc/hosts, which would just answer with the container id again.
      read -r _ name _ < <(timeout 3 getent -s hosts:dns hosts "$address" || true) || true
      if [[ -n ${name:-} ]]; then
        echo "${name%%.*}"
        return
      fi
    fi
  fi
  echo "$HOSTNAME"
}

sanitize() {
  local id=${1,,}
  id=${id//+([^a-z0-9-])/-}
  id=${id##+(-)}
  id=${id%%+(-)}
  echo "${id:0:64}"
}

name=$(container_name)
if [[ -n ${SKIPFLEET_DEVICE_ID:-} ]]; then
  device_id=$SKIPFLEET_DEVICE_ID
elif [[ $name =~ [-_]agent[-_]0*([1-9][0-9]{0,8})$ ]]; then
  device_id=device-$((BASH_REMATCH[1] - 1))
else
  device_id=$(sanitize "$name")
fi
[[ $device_id =~ ^[a-z0-9-]{1,64}$ ]] || die "no valid device id from '$name' (got '$device_id'): set SKIPFLEET_DEVICE_ID"

# Shards: shard-0 .. shard-(S-1), counted up to the first gap.
shards=0
while [[ -e $shards_dir/shard-$shards.npz || -d $shards_dir/shard-$shards ]]; do
  shards=$((shards + 1))
done
((shards > 0)) || die "no shards in $shards_dir (expected shard-0.npz, shard-1.npz, ...)"
if [[ $device_id =~ ^device-([0-9]{1,9})$ ]]; then
  slot=$((10#${BASH_REMATCH[1]}))
else
  read -r slot _ < <(printf '%s' "$device_id" | cksum)
fi
shard=$shards_dir/shard-$((slot % shards))
[[ -d $shard ]] || shard=$shard.npz

username=${SKIPFLEET_MQTT_USERNAME:-$device_id}
if [[ -n ${SKIPFLEET_MQTT_PASSWORD_FILE:-} ]]; then
  password_file=$SKIPFLEET_MQTT_PASSWORD_FILE
elif [[ -n ${SKIPFLEET_DEVICE_PASSWORDS_FILE:-} ]]; then
  # Copy this device's own line out, so the agent only ever reads its own password.
  password=$(grep -m1 "^$username:" "$SKIPFLEET_DEVICE_PASSWORDS_FILE" | cut -d: -f2-) ||
    die "no password for $username in $SKIPFLEET_DEVICE_PASSWORDS_FILE (see make-accounts.sh)"
  password_file=$runtime_dir/mqtt-password
  (umask 077 && printf '%s\n' "$password" >"$password_file")
else
  die "set SKIPFLEET_MQTT_PASSWORD_FILE or SKIPFLEET_DEVICE_PASSWORDS_FILE"
fi

echo "agent-entrypoint: container $name -> device $device_id, shard $(basename "$shard") of $shards" >&2
exec skipfleet agent \
  --device-id "$device_id" \
  --username "$username" \
  --password-file "$password_file" \
  --data "$shard" \
  --base-model "$base_model" \
  --state-dir "$state_root/$device_id" \
  "$@"
