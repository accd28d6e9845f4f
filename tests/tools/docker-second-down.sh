#!/bin/bash
# Stop the second Docker engine (tests/tools/docker-second-up.sh), as a box that goes away:
# the engine-fault tests stop it, then start it again with docker-second-up.sh.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PIDFILE=/tmp/llmswap-docker2/dockerd.pid
[ -f "$PIDFILE" ] || exit 0
pid=$(cat "$PIDFILE")
$SUDO kill "$pid" 2>/dev/null || exit 0
for _ in $(seq 1 120); do
  kill -0 "$pid" 2>/dev/null || exit 0
  sleep 0.25
done
echo "the second dockerd ($pid) did not stop" >&2
exit 1
