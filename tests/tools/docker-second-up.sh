#!/bin/bash
# A second Docker engine for the multi-engine tests: its own TCP socket with TLS client
# verification (certificates made here), data root, exec root and pid file, beside the first.
# Idempotent; the tests read the certificates from $DIR/certs.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
DIR=/tmp/llmswap-docker2
PORT=23761
CERTS=$DIR/certs
client=(docker --host "tcp://127.0.0.1:$PORT" --tlsverify --tlscacert "$CERTS/ca.pem"
        --tlscert "$CERTS/cert.pem" --tlskey "$CERTS/key.pem")
if [ -f "$CERTS/key.pem" ] && "${client[@]}" info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v openssl >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  echo ">> Installing openssl and iproute2 with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl iproute2 >/dev/null
fi
mkdir -p "$CERTS"
cd "$CERTS"
if [ ! -f key.pem ]; then
  echo ">> Making a CA, a server certificate for 127.0.0.1 and a client certificate in $CERTS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout ca-key.pem -out ca.pem \
    -subj "/CN=llmswap test CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
    -subj "/CN=127.0.0.1" 2>/dev/null
  printf "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -out server-cert.pem -extfile server.ext 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout key.pem -out client.csr -subj "/CN=llmswap" 2>/dev/null
  printf "extendedKeyUsage=clientAuth\n" > client.ext
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -out cert.pem -extfile client.ext 2>/dev/null
  chmod 644 ./*.pem
fi
# A bridge of its own: `--bridge none` would delete the first engine's docker0, and the
# default would take it over.  No iptables rules: the first engine owns those; the test
# containers use the host's network.
if ! ip link show llmswap-br2 >/dev/null 2>&1; then
  $SUDO ip link add name llmswap-br2 type bridge
  $SUDO ip addr add 172.31.254.1/24 dev llmswap-br2
  $SUDO ip link set llmswap-br2 up
fi
echo ">> Starting a second dockerd on tcp://127.0.0.1:$PORT (TLS; log: $DIR/dockerd.log)"
$SUDO sh -c "nohup dockerd --host tcp://127.0.0.1:$PORT --tlsverify --tlscacert $CERTS/ca.pem \
  --tlscert $CERTS/server-cert.pem --tlskey $CERTS/server-key.pem --data-root $DIR/root \
  --exec-root $DIR/exec --pidfile $DIR/dockerd.pid --bridge llmswap-br2 --iptables=false \
  --ip6tables=false --ip-masq=false >$DIR/dockerd.log 2>&1 &"
for _ in $(seq 1 60); do
  if "${client[@]}" info >/dev/null 2>&1; then
    echo ">> Second Docker engine is up"
    exit 0
  fi
  sleep 1
done
echo "the second dockerd did not come up; last log lines:" >&2
tail -20 "$DIR/dockerd.log" >&2
exit 1
