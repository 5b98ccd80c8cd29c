#!/usr/bin/env bash
# virtio-bench.sh [--runs N] [--parts io,boot] [--seconds S] [--depth D] [--rng-blocks N]
#                 [--image-mib N] [--timeout SECONDS] [--via auto|direct|testhost]
#
# virtio device performance seen by a Linux guest, swiftvmm against QEMU -M microvm, in ONE test-host
# session (or directly when /dev/kvm is hardware virtualization; --via overrides). Both VMMs boot the
# same stock Debian kernel + busybox test initramfs, 256 MiB, 1 vCPU, command line
# "console=ttyS0 reboot=k panic=-1 pci=off quiet", and use the same raw image: one file of
# --image-mib MiB (default 128, zero-filled) made at the start on the test host's /run (tmpfs), so
# both VMMs' reads and writes go to the page cache of the same file system.
#
# io (one boot per run and VMM; guest-tests/tools/blkbench as /bin/blkbench):
#   swiftvmm  $SWIFTVMM run --kernel K --initrd I --cmdline C --memory 256M --drive file=IMG
#             (its virtio-rng is there by default)
#   QEMU      qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256M -smp 1 -nodefaults
#             -no-user-config -nographic -no-reboot -serial stdio -kernel K -initrd I -append C
#             -drive file=IMG,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0
#             -device virtio-rng-device          (QEMU's defaults: cache=writeback, aio=threads)
#   The guest loads virtio_mmio virtio_blk virtio_rng and runs, timed in the guest (CLOCK_MONOTONIC,
#   `blkbench time`: fork to exit of dd):
#     seqwrite  dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct        -> MiB/s
#     seqread   dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct        -> MiB/s
#     randread  blkbench randread /dev/vda S 4096 D: 4 KiB reads at random 4 KiB-aligned offsets
#               over the whole drive, O_DIRECT, for S seconds (default 5), D in flight (default 1:
#               one pread at a time; more: Linux AIO)                          -> IOPS
#     rng       dd if=/dev/hwrng of=/dev/null bs=4096 count=N (default 64, 256 KiB), only when
#               /sys/class/misc/hw_random/rng_current is virtio_rng            -> KiB/s
# boot (the time from process start to the guest's "swiftvmm-guest: init reached" line, polled every
#   50 ms without forking, as boot-bench.sh does; the plain test initramfs, which powers off at once;
#   also the VMM's CPU time, all threads, from /proc: a device thread that spins shows there):
#   swiftvmm none     ... --no-rng
#   swiftvmm devices  ... --drive file=IMG --net tap=TAP --console virtio (and the default rng)
#   QEMU none         the QEMU command line above without -drive/-device
#   QEMU devices      ... -drive file=IMG,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0
#                     -netdev tap,id=n0,ifname=TAP,script=no,downscript=no -device virtio-net-device,netdev=n0
#                     -device virtio-rng-device -chardev stdio,id=con0,mux=on,signal=off (serial and
#                     hvc0 on it, instead of -serial stdio) -device virtio-serial-device
#                     -device virtconsole,chardev=con0
#   TAP is a persistent tap made for the run (`modprobe tun`, `ip tuntap add`, up); without one the
#   devices runs leave the net device out (and say so). The guest loads no virtio driver before
#   init: this is what the devices cost the VMM and the kernel's ACPI enumeration.
# Each run does io (swiftvmm and QEMU, the order alternating per run) and then the four boots in an
# order that rotates per run.
# Prints min/median per VMM and the ratios swiftvmm/QEMU of the medians (throughput and IOPS:
# target >= 1.0) and, per VMM, boot with devices / without (target for swiftvmm <= 1.05). Compare
# ratios, not absolute figures: the test host is emulated (QEMU TCG) and every VM exit is very
# expensive there. A VMM whose runs all failed gets no ratio and the exit status is 1.
# Builds the release swiftvmm first unless SWIFTVMM is set. In the test host SWIFTVMM must be inside
# the repository (it is mounted there), e.g. .build/bench/swiftvmm.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
runs=3 parts=io,boot seconds=5 depth=1 rng_blocks=64 image_mib=128 per_run_timeout=600 via=auto
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?}; shift 2 ;;
        --parts) parts=${2:?}; shift 2 ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        --depth) depth=${2:?}; shift 2 ;;
        --rng-blocks) rng_blocks=${2:?}; shift 2 ;;
        --image-mib) image_mib=${2:?}; shift 2 ;;
        --timeout) per_run_timeout=${2:?}; shift 2 ;;
        --via) via=${2:?}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "virtio-bench.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$runs" "$seconds" "$depth" "$rng_blocks" "$image_mib" "$per_run_timeout"; do
    case $v in ''|*[!0-9]*|0) echo "virtio-bench.sh: --runs/--seconds/--depth/--rng-blocks/--image-mib/--timeout need positive numbers" >&2; exit 2 ;; esac
done
[ "$depth" -le 64 ] || { echo "virtio-bench.sh: --depth is at most 64" >&2; exit 2; }
[ "$image_mib" -ge 64 ] || { echo "virtio-bench.sh: --image-mib must be at least 64 (the sequential tests move 64 MiB)" >&2; exit 2; }
do_io=0 do_boot=0
IFS=, read -r -a part_list <<< "$parts"
for p in "${part_list[@]}"; do
    case $p in io) do_io=1 ;; boot) do_boot=1 ;; *) echo "virtio-bench.sh: --parts: unknown $p (io, boot)" >&2; exit 2 ;; esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest-tests/lib/common.sh
source "$here/../guest-tests/lib/common.sh"
ensure_deps
via=$(bench_via "$via")

[ -n "${SWIFTVMM:-}" ] || build_release || { echo "virtio-bench: building swiftvmm failed" >&2; exit 1; }
vmm=${SWIFTVMM:-$REPO_DIR/.build/release/swiftvmm}
[ -x "$vmm" ] || { echo "virtio-bench: no swiftvmm binary at $vmm" >&2; exit 1; }
vmm=$(bench_binary "$via" "$vmm")
# (The help is read whole first: `grep -q` on a pipe would end it early, and pipefail fail it.)
vmm_help=$("$vmm" run --help 2>/dev/null || true)
case $vmm_help in *--drive*) ;; *) echo "virtio-bench: $vmm has no --drive (a build without virtio)" >&2; exit 1 ;; esac

VMLINUZ="" INITRAMFS=""
eval "$("$GT_DIR/build-guest.sh" --quiet)"
tool=$("$GT_DIR/tools/build-tools.sh" blkbench)
work=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-virtio-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The io guest. Every figure is one line starting with "bench: " (few console bytes: they are slow).
cat > "$work/case.sh" <<CASE
modload virtio_mmio virtio_blk virtio_rng || echo "bench: modload failed"
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
[ -b /dev/vda ] || echo "bench: no /dev/vda"
echo "bench: seqwrite \$(blkbench time dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct 2>&1 | sed -n 's/^time //p')"
echo "bench: seqread \$(blkbench time dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>&1 | sed -n 's/^time //p')"
echo "bench: \$(blkbench randread /dev/vda $seconds 4096 $depth 2>&1)"
r=\$(blkbench rngcheck)
echo "bench: rngcheck \$r"
case \$r in
    rng_current=virtio_rng*) echo "bench: rng \$(blkbench time dd if=/dev/hwrng of=/dev/null bs=4096 count=$rng_blocks 2>&1 | sed -n 's/^time //p')" ;;
    *) echo "bench: rng skipped" ;;
esac
CASE
"$GT_DIR/make-initrd.sh" --case "$work/case.sh" --base "$INITRAMFS" --out "$work/initrd" --add "$tool:/bin/blkbench"
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet"

inner=$work/bench-inner.sh
{
    echo '#!/bin/bash'
    echo '# generated by Benchmarks/virtio-bench.sh; runs where the VMMs run'
    printf 'work=%q kernel=%q io_initrd=%q boot_initrd=%q cmdline=%q vmm=%q limit=%q runs=%q\n' \
        "$work" "$VMLINUZ" "$work/initrd" "$INITRAMFS" "$cmdline" "$vmm" "$per_run_timeout" "$runs"
    printf 'image_mib=%q do_io=%q do_boot=%q marker=%q\n' "$image_mib" "$do_io" "$do_boot" "swiftvmm-guest: init reached"
    cat <<'INNER'
# The image, the VMMs' output and the sleep FIFO live on a local tmpfs (/run in the test host): $work
# may be a 9p mount there.
scratch=$(mktemp -d /run/swiftvmm-virtio-bench.XXXXXX 2>/dev/null || mktemp -d /tmp/swiftvmm-virtio-bench.XXXXXX) || exit 1
tap=""
cleanup() { [ -z "$tap" ] || ip link del "$tap" 2>/dev/null; rm -rf "$scratch"; }
trap cleanup EXIT
img=$scratch/drive.img
dd if=/dev/zero of="$img" bs=1M count="$image_mib" status=none || { echo "bench: cannot make the image" >&2; exit 1; }
echo "bench: image $img ($image_mib MiB, file system $(stat -f -c %T "$scratch"))" >&2
# A persistent tap for the devices boots (both VMMs open it in turn).
if [ "$do_boot" = 1 ]; then
    [ -c /dev/net/tun ] || modprobe tun 2>/dev/null || true
    name=vbtap$$
    if [ -c /dev/net/tun ] && ip tuntap add dev "$name" mode tap 2>/dev/null && ip link set "$name" up 2>/dev/null; then
        tap=$name
        echo "bench: tap $tap for the net device" >&2
    else
        ip link del "$name" 2>/dev/null || true
        echo "bench: NO TAP (tun: $( [ -c /dev/net/tun ] && echo present || echo missing)): the devices boots have no net device" >&2
    fi
fi
mkfifo "$scratch/sleep" && exec 7<> "$scratch/sleep" || { echo "bench: cannot make a FIFO in $scratch" >&2; exit 1; }
TIMEFORMAT='%R %U %S'
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
qemu_base=(qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256M -smp 1 -nodefaults -no-user-config
           -nographic -no-reboot)
swift_base=("$vmm" run --cmdline "$cmdline" --memory 256M)

# io NAME RUN: one boot of the io guest; prints
# "IO name run status seqwrite_ms seqread_ms randread_iops rng_ms rng_current wall_s user_s sys_s"
# ("-" where the guest printed no figure; the times: the VMM process's, from bash's `time`).
io() {
    local name=$1 run=$2 out=$scratch/io.$1.$2.out err=$scratch/io.$1.$2.err st w r i g c times
    local -a cmd
    case $name in
        swiftvmm) cmd=("${swift_base[@]}" --kernel "$kernel" --initrd "$io_initrd" --drive "file=$img") ;;
        qemu) cmd=("${qemu_base[@]}" -serial stdio -kernel "$kernel" -initrd "$io_initrd" -append "$cmdline"
                   -drive "file=$img,format=raw,if=none,id=d0" -device virtio-blk-device,drive=d0 -device virtio-rng-device) ;;
    esac
    { time timeout --kill-after=10 "$limit" "${cmd[@]}" > "$out" 2> "$err" < /dev/null; } 2> "$scratch/time"
    st=$?
    times=$(tail -n 1 "$scratch/time")
    w=$(tr -d '\r' < "$out" | sed -n 's/^bench: seqwrite ms=\([0-9.]*\) status=0$/\1/p' | head -n 1)
    r=$(tr -d '\r' < "$out" | sed -n 's/^bench: seqread ms=\([0-9.]*\) status=0$/\1/p' | head -n 1)
    i=$(tr -d '\r' < "$out" | sed -n 's/^bench: randread .* iops=\([0-9]*\)$/\1/p' | head -n 1)
    g=$(tr -d '\r' < "$out" | sed -n 's/^bench: rng ms=\([0-9.]*\) status=0$/\1/p' | head -n 1)
    c=$(tr -d '\r' < "$out" | sed -n 's/^bench: rngcheck rng_current=\(.*\)$/\1/p' | head -n 1)
    echo "RESULT IO $name $run $st ${w:--} ${r:--} ${i:--} ${g:--} ${c:--} ${times:-- - -}"
    echo "bench: io $name run $run: exit $st, seqwrite ${w:--} ms, seqread ${r:--} ms, randread ${i:--} IOPS, rng ${g:--} ms (${c:-no rng_current}); VMM wall/user/sys ${times:-?} s" >&2
    if [ -z "$w" ] || [ -z "$r" ] || [ -z "$i" ] || [ -z "$g" ]; then
        echo "bench: io $name run $run: last console lines:" >&2
        tr -d '\r' < "$out" | tail -n 15 | sed 's/^/  console| /' >&2
        tail -n 5 "$err" | sed 's/^/  stderr| /' >&2
    fi
}

now_ms() { local t=${EPOCHREALTIME/[.,]/}; REPLY=$(( t / 1000 )); }
# scan_output: reads what the VMM wrote since the last call (descriptor 8); found=1 at the marker.
scan_output() {
    local line
    while IFS= read -r -u 8 line; do
        line=$partial$line; partial=""
        case $line in *"$marker"*) found=1 ;; esac
    done
    partial+=$line
    case $partial in *"$marker"*) found=1 ;; esac
}
# boot NAME RUN: process start -> the marker, polled every 50 ms without forking (a fork costs tens
# of milliseconds in the test host); prints "RESULT BOOT name run init_ms total_ms status cpu_ms"
# (cpu_ms: the VMM's user + system time, all threads, at the last poll before it exited).
boot() {
    local name=$1 run=$2 out=$scratch/boot.$1.$2.out start init_ms=- pid st total_ms found=0 partial="" cpu_ticks=0
    local -a stat
    local -a cmd
    case $name in
        swiftvmm-none) cmd=("${swift_base[@]}" --kernel "$kernel" --initrd "$boot_initrd" --no-rng) ;;
        swiftvmm-devices) cmd=("${swift_base[@]}" --kernel "$kernel" --initrd "$boot_initrd" --drive "file=$img" --console virtio)
                          [ -z "$tap" ] || cmd+=(--net "tap=$tap") ;;
        qemu-none) cmd=("${qemu_base[@]}" -serial stdio -kernel "$kernel" -initrd "$boot_initrd" -append "$cmdline") ;;
        qemu-devices) cmd=("${qemu_base[@]}" -chardev stdio,id=con0,mux=on,signal=off -serial chardev:con0
                           -kernel "$kernel" -initrd "$boot_initrd" -append "$cmdline"
                           -drive "file=$img,format=raw,if=none,id=d0" -device virtio-blk-device,drive=d0)
                      [ -z "$tap" ] || cmd+=(-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device virtio-net-device,netdev=n0)
                      cmd+=(-device virtio-rng-device -device virtio-serial-device -device virtconsole,chardev=con0) ;;
    esac
    : > "$out"
    exec 8< "$out"
    now_ms; start=$REPLY
    "${cmd[@]}" > "$out" 2>&1 < /dev/null &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$init_ms" = - ]; then
            scan_output
            if [ "$found" = 1 ]; then now_ms; init_ms=$(( REPLY - start )); fi
        fi
        # The VMM's CPU time so far (all threads: utime + stime, fields 14 and 15), read without a fork.
        if read -r -a stat < "/proc/$pid/stat" 2>/dev/null && [ "${#stat[@]}" -gt 15 ]; then
            cpu_ticks=$(( stat[13] + stat[14] ))
        fi
        now_ms
        if [ $(( (REPLY - start) / 1000 )) -ge "$limit" ]; then
            echo "bench: $name run $run: killed after ${limit}s" >&2
            kill -9 "$pid" 2>/dev/null
        fi
        read -r -t 0.05 -u 7 _ || true
    done
    wait "$pid"; st=$?
    now_ms; total_ms=$(( REPLY - start ))
    if [ "$init_ms" = - ]; then scan_output; [ "$found" = 1 ] && init_ms=$total_ms; fi
    exec 8<&-
    echo "RESULT BOOT $name $run $init_ms $total_ms $st $(( cpu_ticks * 1000 / hz ))"
    echo "bench: boot $name run $run: init ${init_ms} ms, exit $st after ${total_ms} ms, VMM CPU $(( cpu_ticks * 1000 / hz )) ms" >&2
    [ "$init_ms" != - ] || { echo "bench: $name run $run: no '$marker'; last output lines:" >&2; tail -n 15 "$out" >&2; }
}

boots=(swiftvmm-none swiftvmm-devices qemu-none qemu-devices)
for ((run = 1; run <= runs; run++)); do
    if [ "$do_io" = 1 ]; then
        if (( run % 2 )); then io swiftvmm "$run"; io qemu "$run"; else io qemu "$run"; io swiftvmm "$run"; fi
    fi
    if [ "$do_boot" = 1 ]; then
        for ((k = 0; k < 4; k++)); do boot "${boots[(k + run - 1) % 4]}" "$run"; done
    fi
done > "$work/results.txt"
INNER
} > "$inner"

case $via in
    direct) where="directly on this machine's KVM" ;;
    testhost) where="in one test-host session (QEMU TCG -cpu EPYC + kvm_amd)" ;;
    *) echo "virtio-bench.sh: --via must be auto, direct or testhost" >&2; exit 2 ;;
esac
echo "virtio-bench: $runs run(s), parts $parts; randread ${seconds}s depth $depth, rng $rng_blocks x 4 KiB, image $image_mib MiB; $where" >&2
status=0
if [ "$via" = direct ]; then
    bash "$inner" || status=$?
else
    "$GT_DIR/testhost.sh" --timeout $(( 300 + runs * (do_io * 2 * (per_run_timeout + 15) + do_boot * 4 * (per_run_timeout + 5)) )) \
        --rw "$work" -- bash "$inner" || status=$?
fi
[ -s "$work/results.txt" ] || { echo "virtio-bench: no results (test-host status $status)" >&2; exit 1; }

echo "# raw IO: vmm run exit seqwrite_ms seqread_ms randread_iops rng_ms rng_current vmm_wall_s vmm_user_s vmm_sys_s"
sed -n 's/^RESULT IO /# IO /p' "$work/results.txt"
echo "# raw BOOT: config run ms_to_init ms_total exit vmm_cpu_ms"
sed -n 's/^RESULT BOOT /# BOOT /p' "$work/results.txt"
awk -v mib=64 -v rngkib=$(( rng_blocks * 4 )) -v depth="$depth" '
function sortlist(list, a,   n, i, j, t) {
    n = split(list, a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n
}
function median(list,   n, a) {
    n = sortlist(list, a); if (n == 0) return ""
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function minimum(list,   n, a) { n = sortlist(list, a); return n ? a[1] : "" }
function maximum(list,   n, a) { n = sortlist(list, a); return n ? a[n] : "" }
function add(key, v) { if (v != "-" && v != "") vals[key] = vals[key] " " v }
$1 == "RESULT" && $2 == "IO" {
    v = $3; ios[v]++
    if ($5 == 0) {
        if ($6 != "-") add(v ",seqwrite", mib * 1000 / $6)
        if ($7 != "-") add(v ",seqread", mib * 1000 / $7)
        add(v ",randread", $8)
        if ($9 != "-") add(v ",rng", rngkib * 1000 / $9)
        add(v ",cpu", $11 + $12)
    }
}
$1 == "RESULT" && $2 == "BOOT" { b = $3; boots[b]++; nboots++; if ($7 == 0 && $5 != "-") { add(b ",init", $5); add(b ",cpu", $8) } }
END {
    failed = 0
    if (("swiftvmm" in ios) || ("qemu" in ios)) {
        printf "%-10s %7s %24s %24s %24s %24s\n", "VMM", "ok", "seqwrite MiB/s min/med", "seqread MiB/s min/med", "randread IOPS min/med", "rng KiB/s min/med"
        split("swiftvmm qemu", names, " ")
        for (i = 1; i <= 2; i++) {
            v = names[i]
            if (!(v in ios)) continue
            n = split(vals[v ",randread"], tmp, " ")
            printf "%-10s %3d/%-3d %24s %24s %24s %24s\n", v, n, ios[v],
                sprintf("%.1f / %.1f", minimum(vals[v ",seqwrite"]), median(vals[v ",seqwrite"])),
                sprintf("%.1f / %.1f", minimum(vals[v ",seqread"]), median(vals[v ",seqread"])),
                sprintf("%d / %d", minimum(vals[v ",randread"]), median(vals[v ",randread"])),
                sprintf("%.1f / %.1f", minimum(vals[v ",rng"]), median(vals[v ",rng"]))
            if (n == 0) failed = 1
        }
        split("seqwrite seqread randread rng", tests, " ")
        label["seqwrite"] = "sequential write 64 MiB O_DIRECT bs=1M, MiB/s"
        label["seqread"] = "sequential read 64 MiB O_DIRECT bs=1M, MiB/s"
        label["randread"] = "4 KiB random read O_DIRECT depth " depth ", IOPS"
        label["rng"] = "virtio-rng /dev/hwrng bs=4096, KiB/s"
        for (i = 1; i <= 4; i++) {
            t = tests[i]; a = median(vals["swiftvmm," t]); b = median(vals["qemu," t])
            if (a == "" || b == "" || b == 0) printf "ratio swiftvmm/qemu, median %s: none (a VMM gave no figure)\n", label[t]
            else printf "ratio swiftvmm/qemu, median %s: %.2f (target >= 1.0)\n", label[t], a / b
        }
        a = median(vals["swiftvmm,cpu"]); b = median(vals["qemu,cpu"])
        if (a != "" && b != "") printf "VMM process CPU time (user+sys) per io boot, median: swiftvmm %.2f s, qemu %.2f s\n", a, b
    }
    if (nboots > 0) {
        printf "%-18s %7s %26s %14s\n", "boot config", "ok", "to init ms min/med/max", "VMM CPU ms med"
        split("swiftvmm-none swiftvmm-devices qemu-none qemu-devices", configs, " ")
        for (i = 1; i <= 4; i++) {
            c = configs[i]
            if (!(c in boots)) continue
            n = split(vals[c ",init"], tmp, " ")
            printf "%-18s %3d/%-3d %26s %14s\n", c, n, boots[c],
                minimum(vals[c ",init"]) " / " median(vals[c ",init"]) " / " maximum(vals[c ",init"]), median(vals[c ",cpu"])
            if (n == 0) failed = 1
        }
        split("swiftvmm qemu", names, " ")
        for (i = 1; i <= 2; i++) {
            v = names[i]; a = median(vals[v "-devices,init"]); b = median(vals[v "-none,init"])
            if (a == "" || b == "" || b == 0) printf "ratio %s boot with devices / without, median to init: none\n", v
            else printf "ratio %s boot with devices / without, median to init: %.3f%s\n", v, a / b, v == "swiftvmm" ? " (target <= 1.05)" : ""
        }
        a = median(vals["swiftvmm-devices,init"]); b = median(vals["qemu-devices,init"])
        if (a != "" && b != "" && b > 0) printf "ratio swiftvmm/qemu, median boot to init with the devices: %.2f\n", a / b
    }
    exit failed
}' "$work/results.txt" || status=1
exit "$status"
