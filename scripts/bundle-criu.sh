#!/usr/bin/env bash
# Copy the installed criu and its non-libc libraries into .criu-bundle/, to carry
# to a machine without package registries (see scripts/gpu-test.sh). runc and
# busybox (for the container tests) go into .criu-bundle/bin when installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr/local/sbin/criu}
rm -rf .criu-bundle && mkdir -p .criu-bundle/lib .criu-bundle/bin
cp "$src" .criu-bundle/criu
libs() {
  ldd "$1" | awk '/=>/ {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in libc.so*|libm.so*|libpthread*|libdl*|ld-linux*) ;; *) cp -L "$lib" .criu-bundle/lib/ ;; esac
  done
}
libs "$src"
for tool in runc busybox; do
  if path=$(command -v "$tool"); then
    cp "$path" .criu-bundle/bin/
    if ldd "$path" >/dev/null 2>&1; then libs "$path"; fi
  fi
done
