#!/usr/bin/env bash
# Throw-away TLS certificates and SuperNode keys for trying Flower's TLS and SuperNode
# authentication on loopback (CERTS=OUT/certs AUTH_KEYS=OUT/keys scripts/flower_local_deployment.sh):
# a self-signed CA, a server certificate for 127.0.0.1/localhost and one EC (P-384) key pair per
# SuperNode in OpenSSH format. Valid two days. Not for production: use your organisation's CA.
#
#   scripts/flower_dev_certs.sh OUT [NUM_NODES]
set -euo pipefail
OUT=${1:?usage: $0 OUT [NUM_NODES]}
NODES=${2:-2}
mkdir -p "$OUT/certs" "$OUT/keys"
(
  cd "$OUT/certs"
  openssl genrsa -out ca.key 4096 2>/dev/null
  openssl req -new -x509 -key ca.key -sha256 -days 2 -subj "/CN=fedlora-dev-ca" -out ca.crt
  openssl genrsa -out server.key 4096 2>/dev/null
  openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
)
for ((i = 0; i < NODES; i++)); do
  rm -f "$OUT/keys/node-$i" "$OUT/keys/node-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedlora-node-$i" -f "$OUT/keys/node-$i"
done
echo "$OUT/certs: ca.crt server.pem server.key; $OUT/keys: node-<i>, node-<i>.pub"
