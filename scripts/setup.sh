#!/usr/bin/env bash
# Set up warmstart on a fresh Debian (bookworm or newer) machine, as root.
# Idempotent: re-running it only does what is missing.
#   - system packages the tests and runtime use
#   - CRIU >= 4.1 built from Debian's trixie source (cached; scripts/install-criu.sh)
#   - a virtual environment in .venv with warmstart and its extras
#     (torch pinned to the 2.13.0 CPU build first, so nothing pulls a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "run as root (CRIU, apt-get)"; exit 1
fi

export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in python3-venv util-linux iproute2 runc busybox-static containerd; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash scripts/install-criu.sh

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  log "installing torch 2.13.0 (CPU build)"
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e '.[test,serve,k8s,agent,store]'
log "ready: $(.venv/bin/warmstart --help >/dev/null && echo 'warmstart installed in .venv')"
