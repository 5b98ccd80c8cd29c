#!/usr/bin/env bash
# build-guest.sh [--force] [--quiet]
#
# Builds the small test guest into ${SWIFTVMM_GUEST_CACHE:-$HOME/.cache/swiftvmm/guest}:
#   vmlinuz            the stock Debian kernel of the installed linux-image-amd64 package
#   kernel-version     its version (uname -r), e.g. 6.1.0-56-amd64
#   initramfs.cpio.gz  busybox-static plus an /init that mounts proc, sys and devtmpfs, prints
#                      "swiftvmm-guest: init reached" as its first line, runs /case.sh if present
#                      (output to the console), prints "swiftvmm-guest: case exit=N" and
#                      "swiftvmm-guest: powering off", then `poweroff -f` when the guest has ACPI
#                      (/sys/firmware/acpi/tables/FACP), else `reboot -f` (with reboot=k on the kernel
#                      command line that is an i8042 reset, which swiftvmm treats as power-off).
#                      Kernel modules for case scripts, with their dependencies, decompressed, are in
#                      /lib/modules/<ver>/ (qemu_fw_cfg button virtio_mmio virtio_blk virtio_net virtio_rng
#                      virtio_console); `/bin/modload NAME...` insmods modules and their dependencies.
# Reproducible (fixed mtimes from SOURCE_DATE_EPOCH, default 0; sorted cpio, --reproducible; gzip -n)
# and cached: nothing is rebuilt while this script, lib/common.sh, the kernel and busybox are unchanged.
#
# Prints, on stdout, shell-quoted assignments (eval-able; one per line):
#   VMLINUZ=...  INITRAMFS=...  KERNEL_VERSION=...
# --force rebuilds even if cached; --quiet prints nothing on stderr.
set -euo pipefail
force=0 quiet=0
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1; shift ;;
        --quiet) quiet=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-guest.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_deps
log() { [ "$quiet" = 1 ] || echo "build-guest: $*" >&2; }

# Modules that case scripts may need (module names; dependencies are added).
GUEST_MODULES=(qemu_fw_cfg button virtio_mmio virtio_blk virtio_net virtio_rng virtio_console)

kver=$(kernel_version)
kpkg=$(dpkg-query -W -f='${Version}' "linux-image-$kver" 2>/dev/null || echo unknown)
bbver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)
busybox=/bin/busybox
[ -x "$busybox" ] || busybox=$(command -v busybox)
out=${SWIFTVMM_GUEST_CACHE:-$HOME/.cache/swiftvmm/guest}
mkdir -p "$out"

print_paths() {
    printf 'VMLINUZ=%q\nINITRAMFS=%q\nKERNEL_VERSION=%q\n' "$out/vmlinuz" "$out/initramfs.cpio.gz" "$kver"
}

key=$( {
    cat "${BASH_SOURCE[0]}" "$GT_DIR/lib/common.sh"
    echo "kernel $kver $kpkg"
    echo "busybox $bbver"
    echo "epoch ${SOURCE_DATE_EPOCH:-0}"
} | sha256sum | cut -c1-32)

# One builder at a time (the e2e harness and the benchmark may start together).
exec 9> "$out/.lock"
flock 9
if [ "$force" = 0 ] && [ -f "$out/key" ] && [ "$(cat "$out/key")" = "$key" ] &&
    [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    log "cached ($kver, busybox $bbver)"
    print_paths
    exit 0
fi
log "building the test guest for kernel $kver, busybox $bbver"

work=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root,"lib/modules/$kver"}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
"$busybox" --list | while read -r app; do
    [ "$app" = busybox ] || ln -s busybox "$root/bin/$app"
done
# The kernel opens /dev/console for init before /init can mount devtmpfs.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "warning: cannot mknod /dev/console (not root?); /init reopens it"

# Modules: same relative paths as in /lib/modules/<ver>, decompressed, with a modules.dep for them.
moddir=/lib/modules/$kver
mapfile -t modfiles < <(module_closure "$kver" "${GUEST_MODULES[@]}")
for f in "${modfiles[@]}"; do
    rel=${f#"$moddir"/}
    install_module "$f" "$root/lib/modules/$kver/$(dirname "$rel")" >/dev/null
done
awk -v want="$(printf '%s\n' "${modfiles[@]#"$moddir"/}")" '
    BEGIN { n = split(want, w, "\n"); for (i = 1; i <= n; i++) keep[w[i]] = 1 }
    { p = $1; sub(/:$/, "", p); if (p in keep) { gsub(/\.ko\.(xz|zst|gz)/, ".ko"); print } }
' "$moddir/modules.dep" | LC_ALL=C sort > "$root/lib/modules/$kver/modules.dep"

cat > "$root/bin/modload" <<'MODLOAD'
#!/bin/sh
# modload NAME...: insmod each module and, first, its dependencies (from modules.dep).
dir=/lib/modules/$(uname -r)
load() {
    local name pat line deps d
    name=$(echo "$1" | tr - _)
    [ -d "/sys/module/$name" ] && return 0
    pat=$(echo "$name" | sed 's/_/[-_]/g')
    line=$(grep -E "(^|/)${pat}\.ko:" "$dir/modules.dep" | head -n 1)
    if [ -z "$line" ]; then echo "modload: no module $1 in $dir/modules.dep" >&2; return 1; fi
    deps=${line#*:}
    for d in $deps; do
        d=${d##*/}
        load "${d%.ko}" || return 1
    done
    insmod "$dir/${line%%:*}" || [ -d "/sys/module/$name" ]
}
status=0
for m in "$@"; do load "$m" || status=1; done
exit $status
MODLOAD
chmod 0755 "$root/bin/modload"

cat > "$root/init" <<'INIT'
#!/bin/sh
# swiftvmm test guest /init (guest-tests/build-guest.sh)
export PATH=/bin:/sbin HOME=/root
errors=""
mount -t proc proc /proc 2>/dev/null || errors="$errors proc"
mount -t sysfs sysfs /sys 2>/dev/null || errors="$errors sys"
mount -t devtmpfs devtmpfs /dev 2>/dev/null || errors="$errors dev"
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
echo "swiftvmm-guest: init reached"
[ -z "$errors" ] || echo "swiftvmm-guest: could not mount:$errors"
status=0
if [ -f /case.sh ]; then
    (cd / && sh /case.sh)
    status=$?
fi
echo "swiftvmm-guest: case exit=$status"
echo "swiftvmm-guest: powering off"
if [ -e /sys/firmware/acpi/tables/FACP ]; then poweroff -f; else reboot -f; fi
# Should not get here; returning from init panics the kernel (panic=-1 then reboots).
sleep 30
echo "swiftvmm-guest: power-off did not happen"
INIT
chmod 0755 "$root/init"

pack_cpio "$root" "$work/initramfs.cpio.gz"
cp "/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" > "$out/kernel-version"
echo "$key" > "$out/key"
log "built $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes, modules: ${GUEST_MODULES[*]})"
print_paths
