#!/usr/bin/env bash
# `npm run demo`: bootstrap (packages, npm deps, guest image), then migrate a
# VM between two network-namespace hosts, kill the destination mid post-copy,
# and show the VM survive on the source.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo creates network namespaces: run it as root" >&2; exit 1; }
tools/bootstrap.sh
exec node --import tsx tools/demo.ts "$@"
