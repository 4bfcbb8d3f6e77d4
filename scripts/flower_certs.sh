#!/usr/bin/env bash
# TLS certificates and SuperNode authentication keys for a Flower deployment of shn.
#
#   scripts/flower_certs.sh OUT_DIR [NUM_SUPERNODES] [HOST_OR_IP ...]
#
# Writes to OUT_DIR:
#   ca.crt, ca.key              a self-signed CA; ca.crt goes to every SuperNode and into flwr's
#                               SuperLink connection (root-certificates)
#   server.pem, server.key      the SuperLink's certificate, signed by the CA, valid for localhost,
#                               127.0.0.1, ::1 and every HOST_OR_IP given (the names/addresses that
#                               SuperNodes and `flwr` use to reach the SuperLink)
#   supernode-<i>, supernode-<i>.pub   one ECDSA P-384 key pair per SuperNode (OpenSSH format, as
#                               flower-supernode --auth-supernode-private-key and
#                               flwr supernode register expect), i = 1..NUM_SUPERNODES (default 2)
# All keys are ECDSA P-384.
#
# Keep ca.key, server.key and the private supernode keys secret; copy each private key only to
# its SuperNode. Re-running with the same OUT_DIR keeps existing files (delete them to rotate).
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
out="$1"
nodes="${2:-2}"
shift $(( $# >= 2 ? 2 : 1 ))
days="${CERT_DAYS:-365}"
[[ "$nodes" =~ ^[0-9]+$ ]] || { echo "NUM_SUPERNODES must be a number, got '$nodes'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 2; }

mkdir -p "$out"
cd "$out"
umask 077

# subjectAltName: localhost, loopback and the given hosts (IPs as IP:, names as DNS:)
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in "$@"; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
done

if [[ ! -f ca.crt ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -days "$days" -nodes \
        -keyout ca.key -out ca.crt -subj "/CN=shn-flower-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

if [[ ! -f server.pem ]]; then
    ext="$(mktemp)"
    trap 'rm -f "$ext" server.csr' EXIT
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$san" > "$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -keyout server.key -out server.csr \
        -subj "/CN=shn-flower-superlink" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem \
        -days "$days" -sha384 -extfile "$ext" 2>/dev/null
    echo "server.pem: valid for $san"
fi

for i in $(seq 1 "$nodes"); do
    key="supernode-$i"
    [[ -f "$key" ]] && continue
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "shn-$key" -f "$key"
    else  # the cryptography package comes with flwr
        "${PYTHON:-python3}" - "$key" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path = sys.argv[1]
open(path, "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()))
open(path + ".pub", "wb").write(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
PY
    fi
done
chmod 644 ca.crt server.pem supernode-*.pub 2>/dev/null || true

echo "wrote $(pwd): ca.crt, server.pem/server.key, supernode-1..$nodes (+ .pub)"
