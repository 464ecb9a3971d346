#!/usr/bin/env bash
# Copy the installed criu and its non-libc libraries into .criu-bundle/, to carry
# to a machine without package registries (see scripts/gpu-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr/local/sbin/criu}
rm -rf .criu-bundle && mkdir -p .criu-bundle/lib
cp "$src" .criu-bundle/criu
ldd "$src" | awk '/=>/ {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in libc.so*|libm.so*|libpthread*|libdl*|ld-linux*) ;; *) cp -L "$lib" .criu-bundle/lib/ ;; esac
done
