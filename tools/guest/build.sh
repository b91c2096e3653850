#!/usr/bin/env bash
# Reproducible tether guest image: Debian cloud kernel + tiny busybox initramfs with memcheck,
# netcheck, diskcheck, diskbench and fsload.
# Output: <repo>/.cache/guest/<key>/{vmlinuz,initrd.img,manifest.txt} and
#         <repo>/.cache/guest/current -> <key>
# Prints "kernel=<abs path>" and "initrd=<abs path>" as the last two lines.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="$ROOT/.cache/guest"
DL="$CACHE/dl"
META_PKG="${TETHER_KERNEL_META:-linux-image-cloud-amd64}"
# Virtio drivers we want; their dependencies are added from modules.dep.
WANT_MODULES=(virtio_pci virtio_net virtio_blk virtio_console ext4)
# Loaded when the kernel has them as modules (ext4's checksums ask the crypto API for crc32c).
OPTIONAL_MODULES=(crc32c_generic)

log() { echo "guest-build: $*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$CACHE" "$DL"
# Serialise concurrent builds (parallel test runs share the cache).
exec 9>"$CACHE/.lock"
flock 9

# ---------- resolve inputs ----------
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 1
    APT_UPDATED=1
    log "apt lists missing or stale, running apt-get update"
    apt-get update -qq >&2
}

resolve_kernel_pkg() {
    apt-cache depends "$META_PKG" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
KPKG="$(resolve_kernel_pkg || true)"
if [ -z "$KPKG" ]; then
    apt_update_once || true
    KPKG="$(resolve_kernel_pkg || true)"
fi
[ -n "$KPKG" ] || die "cannot resolve kernel package behind $META_PKG"
KVER_PKG="$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2; exit }')"
[ -n "$KVER_PKG" ] && [ "$KVER_PKG" != "(none)" ] || die "no candidate version for $KPKG"

BUSYBOX="${TETHER_BUSYBOX:-/bin/busybox}"
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    log "installing busybox-static"
    apt-get install -y -qq busybox-static >&2 || { apt_update_once && apt-get install -y -qq busybox-static >&2; }
fi
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found"
BB_VER="$(dpkg-query -W -f='${Version}' busybox-static)"

# ---------- cache key ----------
KEY="$(
    {
        printf 'kernel=%s %s\n' "$KPKG" "$KVER_PKG"
        printf 'busybox-static=%s\n' "$BB_VER"
        printf 'modules=%s\n' "${WANT_MODULES[*]}"
        printf 'optional=%s\n' "${OPTIONAL_MODULES[*]}"
        sha256sum "$HERE/memcheck.c" | cut -d' ' -f1
        sha256sum "$HERE/netcheck.c" | cut -d' ' -f1
        sha256sum "$HERE/diskcheck.c" | cut -d' ' -f1
        sha256sum "$HERE/diskbench.c" | cut -d' ' -f1
        sha256sum "$HERE/guest.h" | cut -d' ' -f1
        sha256sum "$HERE/fsload" | cut -d' ' -f1
        sha256sum "$HERE/init" | cut -d' ' -f1
        sha256sum "$HERE/build.sh" | cut -d' ' -f1
    } | sha256sum | cut -c1-16
)"
OUT="$CACHE/$KEY"

update_current() {
    ln -sfn "$KEY" "$CACHE/.current.tmp.$$"
    mv -Tf "$CACHE/.current.tmp.$$" "$CACHE/current"
}

if [ -f "$OUT/initrd.img" ] && [ -f "$OUT/vmlinuz" ]; then
    echo "cached $KEY"
    update_current
    echo "kernel=$OUT/vmlinuz"
    echo "initrd=$OUT/initrd.img"
    exit 0
fi

log "building key=$KEY kernel=$KPKG $KVER_PKG busybox-static=$BB_VER"
WORK="$(mktemp -d "$CACHE/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---------- kernel ----------
find_deb() {
    local f
    for f in "$DL/${KPKG}"_*_amd64.deb; do
        [ -f "$f" ] || continue
        if [ "$(dpkg-deb -f "$f" Version)" = "$KVER_PKG" ]; then echo "$f"; return 0; fi
    done
    return 1
}
DEB="$(find_deb || true)"
if [ -z "$DEB" ]; then
    log "downloading $KPKG=$KVER_PKG"
    # apt warns about the _apt sandbox user not being able to write here; harmless.
    if ! (cd "$DL" && apt-get download -q "$KPKG=$KVER_PKG" >&2); then
        apt_update_once || die "apt-get download $KPKG failed"
        (cd "$DL" && apt-get download -q "$KPKG=$KVER_PKG" >&2) || die "apt-get download $KPKG failed"
    fi
    DEB="$(find_deb)" || die "downloaded .deb for $KPKG not found in $DL"
fi
dpkg -x "$DEB" "$WORK/kpkg"
KREL="$(basename "$(ls -d "$WORK"/kpkg/lib/modules/*/ | head -n1)")"
KMODDIR="$WORK/kpkg/lib/modules/$KREL"
VMLINUZ="$WORK/kpkg/boot/vmlinuz-$KREL"
[ -f "$VMLINUZ" ] || die "vmlinuz not found in $DEB"
# The .deb ships no modules.dep (postinst runs depmod); generate it in the scratch tree.
[ -f "$KMODDIR/modules.dep" ] || depmod -b "$WORK/kpkg" "$KREL"

# Resolve module load order (dependencies first) from modules.dep.
declare -A DEPS=() SEEN=()
while IFS= read -r line; do
    mod="${line%%:*}"
    DEPS["$mod"]="${line#*:}"
done <"$KMODDIR/modules.dep"
ORDER=()
visit() {
    local m="$1" d
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN["$m"]=1
    for d in ${DEPS[$m]}; do visit "$d"; done
    ORDER+=("$m")
}
for name in "${WANT_MODULES[@]}"; do
    if grep -Eq "/${name}\.ko(\.[a-z]+)?\$" "$KMODDIR/modules.builtin"; then
        log "module $name is built in"
        continue
    fi
    path="$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$KMODDIR/modules.dep" | head -n1 | cut -d: -f1)"
    [ -n "$path" ] || die "module $name neither built in nor in modules.dep"
    visit "$path"
done
for name in "${OPTIONAL_MODULES[@]}"; do
    path="$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$KMODDIR/modules.dep" | head -n1 | cut -d: -f1 || true)"
    if [ -n "$path" ]; then visit "$path"; else log "optional module $name not a module (built in or absent)"; fi
done

# ---------- memcheck, netcheck, diskcheck, diskbench ----------
for prog in memcheck netcheck diskcheck diskbench; do
    gcc -static -O2 -Wall -pthread -o "$WORK/$prog" "$HERE/$prog.c"
    strip "$WORK/$prog"
done

# ---------- initramfs tree ----------
umask 022
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,mnt,lib/modules}
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list | LC_ALL=C sort); do
    [ "$applet" = busybox ] && continue
    [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
install -m 0755 "$WORK/memcheck" "$R/bin/memcheck"
install -m 0755 "$WORK/netcheck" "$R/bin/netcheck"
install -m 0755 "$WORK/diskcheck" "$R/bin/diskcheck"
install -m 0755 "$WORK/diskbench" "$R/bin/diskbench"
install -m 0755 "$HERE/fsload" "$R/bin/fsload"
install -m 0755 "$HERE/init" "$R/init"
: >"$R/etc/tether-modules"
for m in "${ORDER[@]}"; do
    rel="${m%.xz}"; rel="${rel%.zst}"; rel="${rel%.gz}"; rel="$KREL/$rel"
    mkdir -p "$R/lib/modules/$(dirname "$rel")"
    case "$m" in
        *.ko.xz)  xz -dc "$KMODDIR/$m" >"$R/lib/modules/$rel" ;;
        *.ko.zst) zstd -qdc "$KMODDIR/$m" >"$R/lib/modules/$rel" ;;
        *.ko.gz)  gzip -dc "$KMODDIR/$m" >"$R/lib/modules/$rel" ;;
        *)        cp "$KMODDIR/$m" "$R/lib/modules/$rel" ;;
    esac
    chmod 0644 "$R/lib/modules/$rel"
    echo "$rel" >>"$R/etc/tether-modules"
done
printf 'tether guest %s\nkernel %s %s (%s)\nbusybox-static %s\n' \
    "$KEY" "$KPKG" "$KVER_PKG" "$KREL" "$BB_VER" >"$R/etc/tether-release"
# No /dev/console node here (mknod needs root and would make the output depend on who
# builds): the kernel's built-in default initramfs provides one, and /init re-opens
# /dev/console from devtmpfs.

# ---------- reproducible cpio + gzip ----------
export SOURCE_DATE_EPOCH=0
find "$R" -exec touch -h -d @0 {} +
CPIO_FLAGS=(-o -H newc -R 0:0 --quiet)
if cpio --help 2>&1 | grep -q -- --reproducible; then CPIO_FLAGS+=(--reproducible); fi
(cd "$R" && find . -mindepth 1 -print | LC_ALL=C sort | cpio "${CPIO_FLAGS[@]}") \
    | gzip -n -9 >"$WORK/initrd.img"

# ---------- publish ----------
STAGE="$WORK/out"
mkdir -p "$STAGE"
cp "$VMLINUZ" "$STAGE/vmlinuz"
mv "$WORK/initrd.img" "$STAGE/initrd.img"
{
    echo "key=$KEY"
    echo "kernel_package=$KPKG"
    echo "kernel_package_version=$KVER_PKG"
    echo "kernel_release=$KREL"
    echo "busybox_static_version=$BB_VER"
    echo "modules=${ORDER[*]}"
    (cd "$STAGE" && sha256sum vmlinuz initrd.img)
} >"$STAGE/manifest.txt"
rm -rf "$OUT"
mv -T "$STAGE" "$OUT"
update_current
log "built $KEY"
echo "kernel=$OUT/vmlinuz"
echo "initrd=$OUT/initrd.img"
