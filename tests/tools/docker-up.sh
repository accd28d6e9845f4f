#!/bin/bash
# Make a Docker engine answer on the local socket: install docker.io and start dockerd if needed.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if docker info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo ">> Installing docker.io (Docker engine) with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io >/dev/null
fi
echo ">> Starting dockerd in the background (log: /tmp/llmswap-dockerd.log)"
$SUDO sh -c 'nohup dockerd >/tmp/llmswap-dockerd.log 2>&1 &'
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo ">> Docker engine is up"
    exit 0
  fi
  sleep 1
done
echo "dockerd did not come up; last log lines:" >&2
tail -20 /tmp/llmswap-dockerd.log >&2
exit 1
