#!/bin/bash
# The Dockerfile test needs a base image with Python, and no registry is reachable here: build a
# Debian bookworm root (its python3 is 3.11, like python:3.11-slim) with debootstrap and import it.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
IMAGE=llmswap-test-python:bookworm
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo ">> Installing debootstrap with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
fi
root=$(mktemp -d /tmp/llmswap-pyroot.XXXXXX)
trap '$SUDO rm -rf "$root"' EXIT
echo ">> Building $IMAGE with debootstrap (about a minute)"
$SUDO debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" \
  http://deb.debian.org/debian >/tmp/llmswap-debootstrap.log 2>&1 \
  || { tail -20 /tmp/llmswap-debootstrap.log >&2; exit 1; }
$SUDO tar -C "$root" -c . | docker import - "$IMAGE" >/dev/null
echo ">> $IMAGE ready"
