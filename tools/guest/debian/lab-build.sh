#!/usr/bin/env bash
# The lab guest (docs/lab.md, issue 14 part 4): Debian bookworm with Debian's own nodejs,
# booted with the same Debian cloud kernel as every tether guest (CONFIG_MEM_SOFT_DIRTY=y,
# swap, shmem THP), so the project's soft-dirty tracker runs on the kernel real hosts run.
# Built like the real-application guest (build.sh: mmdebstrap, mkfs.ext4 -d, its stage1) but
# with its own package list, init (lab-init) and cache, so that image stays as it is.
# The lab program itself is not in this image: tools/lab/vm.ts writes it from the checkout
# under test into a second small disk at every run.
#
# Output: <repo>/.cache/guest-lab/<key>/{rootfs.img,vmlinuz,initrd.img,manifest.txt}
# Prints "kernel=", "initrd=" and "image=" (absolute paths) as the last three lines.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
CACHE="$ROOT/.cache/guest-lab"
SUITE=bookworm
PACKAGES=(nodejs util-linux procps mount)
IMAGE_MIB=512

log() { echo "lab-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in mmdebstrap mkfs.ext4 cpio; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install mmdebstrap e2fsprogs cpio)"
done

# shellcheck source=tools/guest/debian/lib.sh
source "$HERE/lib.sh"
busybox_guest

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# Versions from Debian's archive (the host may pin another nodejs, e.g. NodeSource's, which
# mmdebstrap does not see: it uses deb.debian.org): the newest deb.debian.org version.
versions() {
    local p v
    for p in "${PACKAGES[@]}"; do
        v="$(apt-cache madison "$p" 2>/dev/null | awk -F'|' '$3 ~ /deb\.debian\.org/ { gsub(/ /, "", $2); print $2; exit }')"
        printf '%s=%s\n' "$p" "${v:-}"
    done
}
VERSIONS="$(versions)"
if grep -Eq '=$' <<<"$VERSIONS"; then
    log "apt lists missing or stale, running apt-get update"
    apt-get update -qq >&2
    VERSIONS="$(versions)"
fi

KEY="$(
    {
        printf 'suite=%s\nimage_mib=%s\nbusybox_guest=%s\n' "$SUITE" "$IMAGE_MIB" "$BB_KEY"
        echo "$VERSIONS"
        sha256sum "$HERE/lab-build.sh" "$HERE/lib.sh" "$HERE/stage1" "$HERE/lab-init" | cut -d' ' -f1
    } | sha256sum | cut -c1-16
)"
OUT="$CACHE/$KEY"

publish() {
    echo "kernel=$OUT/vmlinuz"
    echo "initrd=$OUT/initrd.img"
    echo "image=$OUT/rootfs.img"
}

if [ -f "$OUT/rootfs.img" ] && [ -f "$OUT/initrd.img" ]; then
    echo "cached $KEY"
    publish
    exit 0
fi

log "building key=$KEY ($(tr '\n' ' ' <<<"$VERSIONS"))"
START=$SECONDS
make_workdir

root_fs

install -m 0755 "$HERE/lab-init" "$R/sbin/tether-init"
echo tether-lab >"$R/etc/hostname"
printf 'tether lab guest %s\n' "$KEY" >"$R/etc/tether-release"
NODE_VERSION="$(chroot "$R" dpkg-query -W -f='${Version}' nodejs)"
USED_MIB="$(du -sm "$R" | cut -f1)"

mkfs.ext4 -q -F -b 4096 -L tether-lab -d "$R" "$WORK/rootfs.img" "${IMAGE_MIB}M" >&2

stage1_initrd

STAGE="$WORK/out"
mkdir -p "$STAGE"
mv "$WORK/rootfs.img" "$WORK/initrd.img" "$STAGE/"
cp "$KERNEL" "$STAGE/vmlinuz"
{
    echo "key=$KEY"
    echo "suite=$SUITE"
    echo "busybox_guest=$BB_KEY"
    echo "$VERSIONS"
    echo "nodejs_installed=$NODE_VERSION"
    echo "rootfs_used_mib=$USED_MIB"
    echo "build_seconds=$((SECONDS - START))"
} >"$STAGE/manifest.txt"
rm -rf "$OUT"
mv -T "$STAGE" "$OUT"
log "built $KEY in $((SECONDS - START)) s (root file system $USED_MIB MiB)"
publish
