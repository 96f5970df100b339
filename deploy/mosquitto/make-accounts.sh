#!/usr/bin/env bash
# Create the fleet's MQTT accounts and the other compose secrets.
#
#   deploy/mosquitto/make-accounts.sh N [DIR]      (DIR defaults to deploy/secrets)
#
# Writes, in DIR:
#   mosquitto_passwd        hashed accounts device-0 .. device-(N-1) and coordinator (broker)
#   device_passwords        `device-K:password` lines, plain text (the simulated agents)
#   coordinator_password    the coordinator's password
#   grafana_admin_password  Grafana's admin password
# Running it again keeps every existing password and only adds missing accounts, so a fleet can
# grow (N larger) without restarting the devices that already run. Passwords are 24 random
# base64url characters. Hashing uses mosquitto_passwd, or the eclipse-mosquitto image if it is not
# installed.
#
# Permissions: DIR is 0700 (no other host user can enter it) and the files in it are 0444,
# because compose bind-mounts file secrets with their host owner and mode (uid/gid/mode of the
# long syntax are ignored for file secrets) and our containers run as non-root users.
set -euo pipefail

usage="usage: $0 N [DIR]  (N >= 1 device accounts device-0 .. device-(N-1))"
[[ ${1:-} =~ ^[0-9]+$ ]] && ((10#$1 >= 1)) || { echo "$usage" >&2; exit 64; }
n=$((10#$1))
dir=${2:-"$(cd "$(dirname "$0")/.." && pwd)/secrets"}

umask 077
mkdir -p "$dir"
chmod 700 "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

new_password() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }

# Existing device passwords win; one line per device, in order. (No associative arrays: this also
# runs with macOS's bash 3.2.)
old=$dir/device_passwords
[[ -f $old ]] || old=/dev/null
for ((k = 0; k < n; k++)); do
  line=$(grep -m1 "^device-$k:" "$old" || true)
  echo "${line:-device-$k:$(new_password)}"
done >"$tmp/device_passwords"
# Accounts beyond N made by an earlier, larger run are kept: their devices may still be running.
awk -F: -v n="$n" '!($1 ~ /^device-[0-9]+$/ && substr($1, 8) + 0 < n)' "$old" \
  >>"$tmp/device_passwords"

for name in coordinator_password grafana_admin_password; do
  if [[ -s $dir/$name ]]; then cp "$dir/$name" "$tmp/$name"; else new_password >"$tmp/$name"; fi
done

# mosquitto_passwd -U hashes a plain `user:password` file in place (one call for any N).
{ cat "$tmp/device_passwords"; echo "coordinator:$(<"$tmp/coordinator_password")"; } >"$tmp/mosquitto_passwd"
if command -v mosquitto_passwd >/dev/null 2>&1; then
  mosquitto_passwd -U "$tmp/mosquitto_passwd"
elif command -v docker >/dev/null 2>&1; then
  docker run --rm --user "$(id -u):$(id -g)" -v "$tmp:/accounts" eclipse-mosquitto:2 \
    mosquitto_passwd -U /accounts/mosquitto_passwd
else
  echo "$0: needs mosquitto_passwd (apt-get install mosquitto) or docker" >&2
  exit 69
fi

for name in mosquitto_passwd device_passwords coordinator_password grafana_admin_password; do
  chmod 0444 "$tmp/$name"
  mv -f "$tmp/$name" "$dir/$name"
done
echo "$(grep -c . "$dir/device_passwords") device accounts + coordinator in $dir"
