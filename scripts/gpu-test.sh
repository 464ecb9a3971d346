#!/usr/bin/env bash
# Run the GPU tests on a GPU machine that has torch but no package registry.
# Expects (carried next to the checkout, both git-ignored):
#   .criu-bundle/  criu binary + its non-libc shared libraries (scripts/bundle-criu.sh)
#   .whl/          wheels missing there (pydantic, pydantic-core, annotated-types, typing-inspection)
# Usage: bash scripts/gpu-test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ -x .criu-bundle/criu ]; then
  export WARMSTART_CRIU="$PWD/.criu-bundle/criu"
  export LD_LIBRARY_PATH="$PWD/.criu-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
python3 -m warmstart doctor || true
exec python3 -m pytest -p no:cacheprovider -o addopts="" -rA "${@:-tests/gpu}"
