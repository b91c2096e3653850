# Shared by build.sh (the real-application guest) and lab-build.sh (the soft-dirty lab guest),
# sourced after each sets HERE, ROOT, CACHE, SUITE and PACKAGES: the steps both images are
# built with, so that a fix to one (above all the work directory's cleanup) reaches both.

# The kernel and its modules: the busybox guest's (built or cached by its own script).
# Sets KERNEL, BB_INITRD and BB_KEY.
busybox_guest() {
    local out
    out="$("$ROOT/tools/guest/build.sh" | tail -n2)"
    KERNEL="$(sed -n 's/^kernel=//p' <<<"$out")"
    BB_INITRD="$(sed -n 's/^initrd=//p' <<<"$out")"
    BB_KEY="$(sed -n 's/^key=//p' "$(dirname "$KERNEL")/manifest.txt")"
}

# A fresh work directory under the cache, removed on exit. mmdebstrap mounts the host's
# /dev/shm, /proc and /sys inside the root while it runs: if it dies without unmounting them,
# a plain rm -rf of $WORK would empty the host's /dev/shm (where tether keeps guest RAM).
# Unmount what is left, and never cross into another mount. Sets WORK and R (the root).
make_workdir() {
    WORK="$(mktemp -d "$CACHE/.work.XXXXXX")"
    trap '{ findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | xargs -r -n1 umount -l; } || true; rm -rf --one-file-system "$WORK"' EXIT
    R="$WORK/root"
}

# The root file system of PACKAGES at $R: variant essential (no systemd, no apt in the image:
# mmdebstrap installs with the host's apt), without documentation and translations (size,
# copy time). Extra arguments (e.g. a --customize-hook) go to mmdebstrap.
root_fs() {
    mmdebstrap --quiet --variant=essential --include="$(
        IFS=,
        echo "${PACKAGES[*]}"
    )" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$@" "$SUITE" "$R" >&2
}

# The stage-1 initramfs at $WORK/initrd.img: the busybox guest's, its test programs removed,
# with stage1 as /init (loads the virtio modules, mounts root=/dev/vda, runs
# /sbin/tether-init). Byte-reproducible: mtimes 0, sorted, newc without inode numbers
# (cpio --reproducible where it has it, as tools/guest/build.sh), gzip -n.
stage1_initrd() {
    local i="$WORK/initrd"
    mkdir -p "$i"
    (cd "$i" && gzip -dc "$BB_INITRD" | cpio -id --quiet)
    rm -f "$i/bin/memcheck" "$i/bin/netcheck" "$i/bin/diskcheck" "$i/bin/diskbench" "$i/bin/fsload"
    install -m 0755 "$HERE/stage1" "$i/init"
    find "$i" -exec touch -h -d @0 {} +
    local flags=(-o -H newc -R 0:0 --quiet)
    if cpio --help 2>&1 | grep -q -- --reproducible; then flags+=(--reproducible); fi
    (cd "$i" && find . -mindepth 1 -print | LC_ALL=C sort | cpio "${flags[@]}") | gzip -n -9 >"$WORK/initrd.img"
}
