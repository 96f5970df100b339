#!/usr/bin/env bash
# Make the fleet's TLS certificates: a fleet CA, the broker's certificate, and one client
# certificate per device (CN = device id) for a mosquitto listener with
# `require_certificate true` + `use_identity_as_username true` (deploy/mosquitto/tls.conf).
#
#   deploy/tls/make-certs.sh DIR BROKER_HOST NAME...
#
# NAME: device ids ([a-z0-9-]{1,64}) and `coordinator`, `coordinator-NAME` (the ACL's coordinator
# accounts: deploy/mosquitto/make-accounts.sh --coordinator NAME writes their ACL blocks).
# Writes, in DIR (0700; keys 0600, certificates 0644):
#   ca.key ca.crt                 the fleet CA (kept on the operator's machine: it signs devices)
#   broker.key broker.crt         for BROKER_HOST (a DNS name or an IP address)
#   clients/NAME.key NAME.crt     one per name; a device gets its own pair and ca.crt, nothing else
# Running it again keeps the CA and every existing certificate and only adds the new names.
# Keys are EC P-256; a certificate from another CA is refused by the broker; the CN is the
# account name the broker's ACL (%u) and client id see, so a device's certificate cannot act as
# another device.
set -euo pipefail

usage="usage: $0 DIR BROKER_HOST NAME...  (NAME: device ids [a-z0-9-]{1,64}, or coordinator)"
(($# >= 3)) || { echo "$usage" >&2; exit 64; }
dir=$1 host=$2
shift 2
for name in "$@"; do
  [[ $name =~ ^[a-z0-9-]{1,64}$ ]] || { echo "$0: bad name '$name': $usage" >&2; exit 64; }
done
[[ $host =~ ^[A-Za-z0-9.:-]+$ ]] || { echo "$0: bad broker host '$host'" >&2; exit 64; }
command -v openssl >/dev/null || { echo "$0: needs openssl" >&2; exit 69; }

umask 077
mkdir -p "$dir/clients"
chmod 700 "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME KEY CRT EXTENSIONS: a certificate for CN=NAME signed by the fleet CA.
sign() {
  openssl req -new -key "$2" -subj "/CN=$1" -out "$tmp/req.csr"
  printf '%s\n' "$4" >"$tmp/ext.cnf"
  openssl x509 -req -in "$tmp/req.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -CAserial "$dir/ca.srl" -days 825 -sha256 -extfile "$tmp/ext.cnf" \
    -out "$3" 2>/dev/null
  chmod 644 "$3"
}

if [[ ! -s $dir/ca.crt ]]; then
  new_key "$dir/ca.key"
  openssl req -x509 -new -key "$dir/ca.key" -subj "/CN=skipfleet fleet CA" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.crt"
  chmod 644 "$dir/ca.crt"
fi

if [[ ! -s $dir/broker.crt ]]; then
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san="IP:$host"; else san="DNS:$host"; fi
  new_key "$dir/broker.key"
  sign "$host" "$dir/broker.key" "$dir/broker.crt" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
fi

made=0
for name in "$@"; do
  [[ -s $dir/clients/$name.crt ]] && continue
  new_key "$dir/clients/$name.key"
  sign "$name" "$dir/clients/$name.key" "$dir/clients/$name.crt" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  made=$((made + 1))
done
echo "fleet CA and broker certificate for $host in $dir; $made new client certificates"
