#!/usr/bin/env bash
# What the real-application tests need on the host, installed on demand (npm run test:apps
# and netns-tests/apps/ call this; tools/bootstrap.sh does not): the image builder's tools
# and the Debian clients the tests run in the client namespace.
set -euo pipefail
pkgs=(mmdebstrap e2fsprogs cpio python3 coreutils postgresql-client libmemcached-tools curl)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "tether: missing packages: ${need[*]} (run as root, or: apt-get install ${need[*]})" >&2
    exit 1
fi
echo "== installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}
