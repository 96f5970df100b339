#!/usr/bin/env bash
# Create the fleet's MQTT accounts, the broker's ACL and the other compose secrets.
#
#   deploy/mosquitto/make-accounts.sh [--partitions P] [--coordinator NAME [--partitions P]]... N [DIR]
#                                                                         (DIR: deploy/secrets)
#
# Writes, in DIR:
#   mosquitto_passwd        hashed accounts device-0 .. device-(N-1), coordinator, and
#                           coordinator-NAME for each --coordinator NAME (broker)
#   mosquitto_acl           the ACL: deploy/mosquitto/acl plus, for each coordinator-NAME, the
#                           grants of its `user coordinator` block (mosquitto has no user-name
#                           wildcards, so each coordinator account gets its own block)
#   device_passwords        `device-K:password` lines, plain text (the simulated agents)
#   coordinator_password    the password of `coordinator`, the compose coordinator's account
#   coordinator-NAME_password  the password of each further coordinator's account: one account
#                           per coordinator, because the broker makes the account the client id
#                           and two connections with one client id close each other
#   ACCOUNT_password-pI     with --partitions P (after --coordinator NAME: that coordinator's;
#                           before any: `coordinator`'s), the password of each partition's
#                           account ACCOUNT-pI, I = 0 .. P-1: a coordinator started with
#                           `--partitions P --username ACCOUNT --password-file ACCOUNT_password`
#                           connects partition I as ACCOUNT-pI with the password in that file
#                           (coordinator/partition_accounts.py); each gets the ACL block too
#   grafana_admin_password  Grafana's admin password
# NAME is the coordinator's --instance ([a-z0-9][a-z0-9-]{0,31}, not ending in -pDIGITS: that is
# a partition's account).
# Running it again keeps every existing password and only adds missing accounts, so a fleet can
# grow (N larger, another --coordinator) without restarting what already runs; coordinator
# accounts made by an earlier run are kept. Passwords are 24 random base64url characters.
# Hashing uses mosquitto_passwd, or the eclipse-mosquitto image if it is not installed.
#
# Permissions: DIR is 0700 (no other host user can enter it) and the files in it are 0444,
# because compose bind-mounts file secrets with their host owner and mode (uid/gid/mode of the
# long syntax are ignored for file secrets) and our containers run as non-root users. Files that
# exist are rewritten in place: a bind mount holds the file's inode, so a replaced file would
# stay invisible to a running broker that is told to reload (SIGHUP).
set -euo pipefail

usage="usage: $0 [--partitions P] [--coordinator NAME [--partitions P]]... N [DIR]  (N >= 1 device accounts device-0 .. device-(N-1))"
coordinators=()
current=coordinator # the account a --partitions applies to
while [[ ${1:-} == --coordinator || ${1:-} == --partitions ]]; do
  if [[ $1 == --coordinator ]]; then
    [[ ${2:-} =~ ^[a-z0-9][a-z0-9-]{0,31}$ && ! ${2:-} =~ -p[0-9]+$ ]] || {
      echo "$0: --coordinator '${2:-}': use the coordinator's --instance, [a-z0-9-], at most 32," \
        "not ending in -pDIGITS (a partition's account)" >&2
      exit 64
    }
    current=coordinator-$2
    coordinators+=("$current")
  else
    [[ ${2:-} =~ ^[0-9]+$ ]] && ((10#$2 >= 1 && 10#$2 <= 64)) || {
      echo "$0: --partitions '${2:-}': the coordinator's --partitions, 1 to 64" >&2
      exit 64
    }
    for ((i = 0; i < 10#$2; i++)); do coordinators+=("$current-p$i"); done
  fi
  shift 2
done
[[ ${1:-} =~ ^[0-9]+$ ]] && ((10#$1 >= 1)) || { echo "$usage" >&2; exit 64; }
n=$((10#$1))
dir=${2:-"$(cd "$(dirname "$0")/.." && pwd)/secrets"}
template=$(dirname "$0")/acl

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

# A coordinator account's password file; a partition's (ACCOUNT-pI) is ACCOUNT_password-pI, the
# coordinator's --password-file with -pI appended.
password_file() {
  if [[ $1 =~ ^(.*)-(p[0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]}_password-${BASH_REMATCH[2]}"
  else
    echo "$1_password"
  fi
}

# Coordinator accounts: the compose one, those asked for, and those an earlier run made.
for path in "$dir"/coordinator-*_password "$dir"/coordinator*_password-p*; do
  name=$(basename "$path")
  [[ -f $path ]] || continue
  if [[ $name == *_password-p* ]]; then
    coordinators+=("${name%_password-p*}-p${name##*_password-p}")
  else
    coordinators+=("${name%_password}")
  fi
done
accounts=(coordinator $(printf '%s\n' ${coordinators[@]+"${coordinators[@]}"} | sort -u))
secrets=(mosquitto_passwd mosquitto_acl device_passwords grafana_admin_password)
for account in "${accounts[@]}"; do secrets+=("$(password_file "$account")"); done

for name in "${secrets[@]:3}"; do
  if [[ -s $dir/$name ]]; then cp "$dir/$name" "$tmp/$name"; else new_password >"$tmp/$name"; fi
done

# The template's grants for `coordinator`, repeated for each further coordinator account.
grants=$(awk '/^user /{on = ($2 == "coordinator"); next} on && /^topic /' "$template")
[[ -n $grants ]] || { echo "$0: $template has no \`user coordinator\` block" >&2; exit 70; }
{
  cat "$template"
  for account in "${accounts[@]:1}"; do printf '\nuser %s\n%s\n' "$account" "$grants"; done
} >"$tmp/mosquitto_acl"

# mosquitto_passwd -U hashes a plain `user:password` file in place (one call for any N).
{
  cat "$tmp/device_passwords"
  for account in "${accounts[@]}"; do echo "$account:$(<"$tmp/$(password_file "$account")")"; done
} >"$tmp/mosquitto_passwd"
if command -v mosquitto_passwd >/dev/null 2>&1; then
  mosquitto_passwd -U "$tmp/mosquitto_passwd"
elif command -v docker >/dev/null 2>&1; then
  docker run --rm --user "$(id -u):$(id -g)" -v "$tmp:/accounts" eclipse-mosquitto:2 \
    mosquitto_passwd -U /accounts/mosquitto_passwd
else
  echo "$0: needs mosquitto_passwd (apt-get install mosquitto) or docker" >&2
  exit 69
fi

for name in "${secrets[@]}"; do
  if [[ -f $dir/$name ]]; then
    chmod u+w "$dir/$name" && cat "$tmp/$name" >"$dir/$name"
  else
    mv "$tmp/$name" "$dir/$name"
  fi
  chmod 0444 "$dir/$name"
done
echo "$(grep -c . "$dir/device_passwords") device accounts + ${accounts[*]} in $dir"
