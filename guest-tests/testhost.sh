#!/usr/bin/env bash
# testhost.sh [--timeout SECONDS] [--mem SIZE] -- COMMAND [ARGS...]
#
# Runs COMMAND inside the nested test host and exits with COMMAND's status: QEMU in TCG mode with
# -cpu EPYC (which has SVM) boots the installed Debian kernel from a small initramfs that loads
# kvm_amd (a real /dev/kvm inside) and mounts this machine's root filesystem read-only over virtio-9p;
# COMMAND runs chrooted there, in the same working directory, with a writable results directory.
# COMMAND's output is printed afterwards. Exit 125 when the test host itself fails.
set -euo pipefail
timeout_s=600 mem=2G
while [ $# -gt 0 ]; do
    case $1 in
        --timeout) timeout_s=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: testhost.sh [--timeout S] [--mem SIZE] -- COMMAND [ARGS...]" >&2; exit 2; }
source "$(dirname "$0")/lib/common.sh"
ensure_deps
kver=$(kernel_version)

# The L1 initramfs (cached per kernel version and script).
l1="$CACHE_DIR/testhost-$kver.cpio.gz"
l1key="$CACHE_DIR/testhost-$kver.key"
key=$( (cat "$0" "$GT_DIR/lib/common.sh"; echo "$kver") | sha256sum | cut -c1-16)
if [ ! -f "$l1" ] || [ "$(cat "$l1key" 2>/dev/null)" != "$key" ]; then
    mkdir -p "$CACHE_DIR"
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,proc,sys,dev,host,modules}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for app in sh mount umount mkdir insmod chroot poweroff cat echo sleep; do ln -s busybox "$root/bin/$app"; done
    module_closure "$kver" virtio_pci 9pnet_virtio 9p kvm-amd | while read -r m; do
        cp "$m" "$root/modules/$(printf '%02d' "$(ls "$root/modules" | wc -l)")-$(basename "$m")"
    done
    cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" 2>/dev/null; done
fail() { echo "testhost-l1: $*"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /host || fail "cannot mount the host root"
R=$(cat /proc/cmdline | sed -n 's/.*testhost.results=\([^ ]*\).*/\1/p')
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
mount -t tmpfs tmp /host/tmp; mount -t tmpfs run /host/run
mkdir -p "/host$R"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "/host$R" || fail "cannot mount the results dir"
[ -c /dev/kvm ] || { echo "no /dev/kvm in the test host (kvm_amd did not load)" > "/host$R/host-error"; poweroff -f; }
chroot /host /bin/sh "$R/inner.sh"
poweroff -f
INIT
    chmod +x "$root/init"
    pack_cpio "$root" "$l1"
    rm -rf "$root"
    echo "$key" > "$l1key"
fi

results=$(mktemp -d /tmp/swiftvmm-testhost.XXXXXX)
trap 'rm -rf "$results"' EXIT
{
    echo "export PATH=/opt/swift/usr/bin:$(dirname "$(command -v python3)"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "export HOME=/tmp"
    printf 'cd %q || exit 125\n' "$PWD"
    printf '%q ' "$@"; echo "> $results/out 2>&1 < /dev/null"
    echo "echo \$? > $results/status"
} > "$results/inner.sh"

start=$(date +%s.%N)
set +e
timeout --kill-after=5 "$timeout_s" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu EPYC -smp 2 -m "$mem" \
    -nodefaults -no-user-config -nographic -no-reboot -monitor none \
    -serial "file:$results/console.log" \
    -kernel "/boot/vmlinuz-$kver" -initrd "$l1" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 testhost.results=$results" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$results,mount_tag=results,security_model=none" \
    < /dev/null 2> "$results/qemu.err"
qemu_status=$?
set -e
elapsed=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")
[ -f "$results/out" ] && cat "$results/out"
if [ -f "$results/status" ]; then
    echo "testhost: command exited $(cat "$results/status") after ${elapsed}s in the test host" >&2
    exit "$(cat "$results/status")"
fi
echo "testhost: the test host failed (qemu status $qemu_status; 124 means the ${timeout_s}s timeout)" >&2
grep -v "TCG doesn't support requested feature" "$results/qemu.err" >&2 || true
[ -f "$results/host-error" ] && cat "$results/host-error" >&2
echo "testhost: last lines of the test host console:" >&2
tail -n 40 "$results/console.log" >&2 || true
exit 125
