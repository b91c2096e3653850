#!/usr/bin/env bash
# The real-application guest (issue 14): a Debian bookworm root file system with memcached,
# PostgreSQL 15 and nginx, built with mmdebstrap and written into a raw ext4 image with
# `mkfs.ext4 -d`. It boots with the busybox guest's kernel (tools/guest/build.sh; direct
# kernel boot) and a small initramfs of its own (stage1) that loads the virtio modules,
# mounts root=/dev/vda (the VM's disk, served through tether) and runs /sbin/tether-init.
#
# Output: <repo>/.cache/guest-debian/<key>/{rootfs.img,vmlinuz,initrd.img,manifest.txt}
#         <repo>/.cache/guest-debian/current -> <key>
# Prints "kernel=", "initrd=" and "image=" (absolute paths) as the last three lines.
# Built only on demand (npm run test:apps), never by tools/bootstrap.sh's default path.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
CACHE="$ROOT/.cache/guest-debian"
SUITE=bookworm
# What the guest runs; the versions apt resolves for them go into the cache key.
PACKAGES=(memcached postgresql-15 nginx-light iproute2 procps mount)
IMAGE_MIB="${TETHER_DEBIAN_IMAGE_MIB:-1024}"
# nginx serves this file (deterministic bytes, see big_file below) at /big.bin.
BIG_MIB=32

log() { echo "debian-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in mmdebstrap mkfs.ext4 cpio python3; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install mmdebstrap e2fsprogs cpio python3)"
done

# shellcheck source=tools/guest/debian/lib.sh
source "$HERE/lib.sh"
busybox_guest

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

versions() {
    local p v
    for p in "${PACKAGES[@]}"; do
        v="$(apt-cache policy "$p" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')"
        printf '%s=%s\n' "$p" "${v:-}"
    done
}
VERSIONS="$(versions)"
if grep -Eq '=(|\(none\))$' <<<"$VERSIONS"; then
    log "apt lists missing or stale, running apt-get update"
    apt-get update -qq >&2
    VERSIONS="$(versions)"
fi

KEY="$(
    {
        printf 'suite=%s\nimage_mib=%s\nbig_mib=%s\nbusybox_guest=%s\n' "$SUITE" "$IMAGE_MIB" "$BIG_MIB" "$BB_KEY"
        echo "$VERSIONS"
        sha256sum "$HERE/build.sh" "$HERE/lib.sh" "$HERE/stage1" "$HERE/tether-init" | cut -d' ' -f1
    } | sha256sum | cut -c1-16
)"
OUT="$CACHE/$KEY"

publish_current() {
    ln -sfn "$KEY" "$CACHE/.current.tmp.$$"
    mv -Tf "$CACHE/.current.tmp.$$" "$CACHE/current"
    echo "kernel=$OUT/vmlinuz"
    echo "initrd=$OUT/initrd.img"
    echo "image=$OUT/rootfs.img"
}

if [ -f "$OUT/rootfs.img" ] && [ -f "$OUT/initrd.img" ]; then
    echo "cached $KEY"
    publish_current
    exit 0
fi

log "building key=$KEY ($(tr '\n' ' ' <<<"$VERSIONS"))"
START=$SECONDS
make_workdir

# ---------- root file system ----------
# Variant essential + the services: no systemd, no apt in the image (mmdebstrap installs
# with the host's apt). Documentation and translations are left out (size, copy time).
# The hook configures what the packages' maintainer scripts set up: PostgreSQL's cluster
# "main" (made by postgresql-common's postinst) gets the durability settings the
# evaluation depends on and a trust rule for the client's subnet.
root_fs --customize-hook='[ -d "$1/etc/postgresql/15/main" ] || chroot "$1" pg_createcluster 15 main'

install -m 0755 "$HERE/tether-init" "$R/sbin/tether-init"
echo tether-debian >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 tether-debian\n' >"$R/etc/hosts"
cat >"$R/etc/postgresql/15/main/conf.d/tether.conf" <<'CONF'
# tether's real-application evaluation: every acknowledged COMMIT is durable.
listen_addresses = '*'
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 32MB
max_connections = 20
CONF
echo 'host all all samenet trust' >>"$R/etc/postgresql/15/main/pg_hba.conf"
# The download check pauses its reader while the VM migrates (to hold one connection
# open across the switchover by construction): nginx must not give up on it meanwhile.
echo 'send_timeout 600s;' >"$R/etc/nginx/conf.d/tether.conf"

# nginx-light's default site serves /var/www/html; a large deterministic body for the
# download check (its sha256 is also in the image and the manifest).
big_file() {
    python3 - "$1" "$BIG_MIB" <<'PY'
import hashlib, sys
out, mib = sys.argv[1], int(sys.argv[2])
with open(out, "wb") as f:
    for i in range(mib * 1024 * 1024 // 32):
        f.write(hashlib.sha256(b"tether-big-%d" % i).digest())
PY
}
mkdir -p "$R/var/www/html"
big_file "$R/var/www/html/big.bin"
BIG_SHA="$(sha256sum "$R/var/www/html/big.bin" | cut -d' ' -f1)"
echo "$BIG_SHA" >"$R/var/www/html/big.bin.sha256"
printf 'tether debian guest %s\n' "$KEY" >"$R/etc/tether-release"
USED_MIB="$(du -sm "$R" | cut -f1)"

# ---------- ext4 image ----------
mkfs.ext4 -q -F -b 4096 -L tether-root -d "$R" "$WORK/rootfs.img" "${IMAGE_MIB}M" >&2

# ---------- stage-1 initramfs: the busybox guest's, with stage1 as /init ----------
stage1_initrd

# ---------- publish ----------
STAGE="$WORK/out"
mkdir -p "$STAGE"
mv "$WORK/rootfs.img" "$WORK/initrd.img" "$STAGE/"
cp "$KERNEL" "$STAGE/vmlinuz"
{
    echo "key=$KEY"
    echo "suite=$SUITE"
    echo "busybox_guest=$BB_KEY"
    echo "$VERSIONS"
    echo "rootfs_used_mib=$USED_MIB"
    echo "image_mib=$IMAGE_MIB"
    echo "big_bin_mib=$BIG_MIB"
    echo "big_bin_sha256=$BIG_SHA"
    echo "build_seconds=$((SECONDS - START))"
} >"$STAGE/manifest.txt"
rm -rf "$OUT"
mv -T "$STAGE" "$OUT"
log "built $KEY in $((SECONDS - START)) s (root file system $USED_MIB MiB)"
publish_current
