#!/usr/bin/env bash
# Build and install CRIU >= 4.1 from Debian's trixie source archive.
#
# bookworm's criu 3.17 fails on kernels that expose a [vvar_vclock] mapping
# ("vdso: Unexpected rt vDSO area bounds"). The trixie source package carries
# upstream CRIU 4.1.x, which builds cleanly on bookworm.
#
# Idempotent: if an installed criu is new enough, nothing happens. The build is
# cached under $WARMSTART_CACHE (default /var/cache/warmstart/criu), so a second
# run only copies the binary.
set -euo pipefail

MIN_VERSION="4.1"
PREFIX="${WARMSTART_CRIU_PREFIX:-/usr/local}"
CACHE="${WARMSTART_CACHE:-/var/cache/warmstart}/criu"
SUITE="${WARMSTART_CRIU_SUITE:-trixie}"

log() { printf 'install-criu: %s\n' "$*" >&2; }

version_ok() {
  local bin="$1" v
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1) || return 1
  [ -n "$v" ] || return 1
  [ "$(printf '%s\n%s\n' "$MIN_VERSION" "$v" | sort -V | head -n1)" = "$MIN_VERSION" ]
}

if [ -x "$PREFIX/sbin/criu" ] && version_ok "$PREFIX/sbin/criu"; then
  log "criu $("$PREFIX/sbin/criu" --version | sed -n 's/^Version: *//p') already installed at $PREFIX/sbin/criu"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root (apt-get and install into $PREFIX)"; exit 1
fi

export DEBIAN_FRONTEND=noninteractive
BUILD_DEPS=(curl ca-certificates build-essential dpkg-dev pkgconf python3 libbsd-dev libcap-dev libgnutls28-dev
  libnet1-dev libnftables-dev libnl-3-dev libnl-route-3-dev libprotobuf-c-dev libprotobuf-dev
  uuid-dev protobuf-c-compiler protobuf-compiler iproute2 libaio-dev)

built="$CACHE/criu.bin"
if [ ! -x "$built" ] || ! version_ok "$built"; then
  # A deb-src entry for $SUITE, built from the mirror this machine already uses.
  src_list=/etc/apt/sources.list.d/warmstart-criu-src.sources
  if [ ! -f "$src_list" ]; then
    mirror=$( { grep -rhoE '^(URIs:|deb)[[:space:]]+[a-z]+://[^[:space:]]+/debian/?' \
      /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } \
      | grep -v -- '-security' | awk 'NR==1 {print $NF}')
    [ -n "$mirror" ] || { log "no Debian mirror found in apt sources"; exit 1; }
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
      echo "Types: deb-src"; echo "URIs: $mirror"; echo "Suites: $SUITE"; echo "Components: main"
      [ -f "$keyring" ] && echo "Signed-By: $keyring"
    } > "$src_list"
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${BUILD_DEPS[@]}" >/dev/null
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # Only the upstream tarball is needed (and, on some mirrors, the only part
  # served): take its URI and checksum from apt and verify what we fetch.
  line=$(apt-get source --print-uris -qq "criu/$SUITE" | grep -E "\.orig\.tar\." | head -n1)
  [ -n "$line" ] || { log "apt knows no criu source in $SUITE"; exit 1; }
  uri=$(echo "$line" | awk '{print $1}' | tr -d "'")
  name=$(echo "$line" | awk '{print $2}')
  sha=$(echo "$line" | awk '{print $4}' | sed 's/^SHA256://')
  tarball="$work/$name"
  curl -fsSL --retry 3 -o "$tarball" "$uri"
  echo "$sha  $tarball" | sha256sum -c --quiet - || { log "checksum mismatch for $name"; exit 1; }
  mkdir -p "$work/src"
  tar -xf "$tarball" -C "$work/src" --strip-components=1
  log "building $(basename "$tarball")"
  make -C "$work/src" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
  mkdir -p "$CACHE"
  install -m 0755 "$work/src/criu/criu" "$built.tmp" && mv "$built.tmp" "$built"
fi

# Runtime libraries (the build deps above pull them in; a cached build on a
# fresh machine needs them too).
if ! ldd "$built" | grep -q 'not found'; then :; else
  apt-get install -y -qq --no-install-recommends libbsd0 libcap2 libgnutls30 libnet1 libnftables1 \
    libnl-3-200 libnl-route-3-200 libprotobuf-c1 libuuid1 iproute2 >/dev/null
fi
install -D -m 0755 "$built" "$PREFIX/sbin/criu"
log "installed $("$PREFIX/sbin/criu" --version | sed -n 's/^Version: *//p') at $PREFIX/sbin/criu"
