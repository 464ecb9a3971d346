#!/usr/bin/env bash
# Run the GPU tests on a GPU machine that has torch but no package registry.
# Expects (carried next to the checkout, both git-ignored):
#   .criu-bundle/  criu binary + its non-libc shared libraries (scripts/bundle-criu.sh)
#   .whl/          wheels missing there (pydantic, pydantic-core, annotated-types, typing-inspection)
# Usage: bash scripts/gpu-test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/device-env.sh
python3 -m warmstart doctor || true
exec python3 -m pytest -p no:cacheprovider -o addopts="" -rA "${@:-tests/gpu}"
