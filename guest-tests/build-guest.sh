#!/usr/bin/env bash
# Builds the small test guest: the stock Debian kernel and a busybox initramfs whose /init mounts
# proc/sys/dev, prints "swiftvmm-guest: init reached", runs /case.sh if present, and powers off.
# Prints the kernel and initramfs paths. Cached: rebuilt only when this script or its inputs change.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
ensure_deps
kver=$(kernel_version)
busybox=$(command -v busybox)
out="$CACHE_DIR/guest"
key=$( (cat "$0" "$GT_DIR/lib/common.sh"; echo "$kver"; sha256sum "$busybox") | sha256sum | cut -c1-16)
if [ -f "$out/key" ] && [ "$(cat "$out/key")" = "$key" ]; then
    echo "$out/vmlinuz $out/initramfs.cpio.gz"; exit 0
fi
mkdir -p "$out"
root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc}
cp "$busybox" "$root/bin/busybox"
for app in $("$busybox" --list); do [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"; done
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "swiftvmm-guest: init reached"
status=0
if [ -f /case.sh ]; then sh /case.sh; status=$?; fi
echo "swiftvmm-guest: case exit=$status"
echo "swiftvmm-guest: powering off"
if [ -e /sys/firmware/acpi/tables/FACP ]; then poweroff -f; else reboot -f; fi
sleep 10
INIT
chmod +x "$root/init"
find "$root" -exec touch -h -d @0 {} +
cp "/boot/vmlinuz-$kver" "$out/vmlinuz"
pack_cpio "$root" "$out/initramfs.cpio.gz"
echo "$key" > "$out/key"
echo "$out/vmlinuz $out/initramfs.cpio.gz"
