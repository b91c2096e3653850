#!/usr/bin/env bash
# Makes a fresh Debian bookworm machine ready to run tether's demo and tests:
# system packages (as root), npm dependencies, the native addon, the guest image.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(qemu-system-x86 qemu-utils libnbd-bin busybox-static iproute2 nftables cpio kmod gcc libc6-dev make python3 g++ procps e2fsprogs libpcap-dev)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tether: missing packages: ${need[*]} (run as root, or: apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "== installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "== npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi
[ -e native/build/Release/tether_native.node ] || npm run --silent build:native >&2
tools/guest/build.sh >/dev/null
