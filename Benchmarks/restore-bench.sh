#!/usr/bin/env bash
# restore-bench.sh [--runs N] [--memory SIZE] [--vmms qemu,swiftvmm] [--via auto|direct|testhost|pvm] [--restore-arg ARG]...
#
# Snapshot restore latency, swiftvmm against QEMU (-M microvm, migrate to a file and -incoming), in
# ONE test-host session (or directly when /dev/kvm is hardware virtualization; --via overrides).
# The guest: the stock Debian kernel + the busybox test initramfs with a case script that counts in
# guest memory and prints `t<N>` every ~5 ms (one short line: few exits), 256 MiB, 1 vCPU. Each VMM
# boots it once with a QMP socket, snapshots it while it ticks, quits, and the snapshot is restored
# N times per VMM (default 10), alternating. Per restore: process start -> guest running (swiftvmm:
# its "vCPUs entering the guest ... ms after process start" log line; QEMU: its RESUME event) and
# process start -> the restored guest's first line on the console; plus snapshot-create time and
# size against QEMU's migration time and file size. See restore-bench.py for the details.
# Prints min/median per VMM and the ratios swiftvmm/QEMU; compare ratios, not absolute times, in
# the test host (it is emulated and every VM exit is very expensive there).
# --via pvm runs directly on a kvm_pvm host, where Linux does not boot in useful time: the originals
# are snapshotted 3 s after they start (the guest is early in its kernel, printing nothing), swiftvmm
# gets --allow-slow-kvm, and only process start -> running is measured (native process start-up and
# restore cost, without the emulated test host's slowness; no guest-print figure).
# Builds the release swiftvmm first unless SWIFTVMM is set (as the other benchmarks do). --vmms qemu
# measures QEMU only (no swiftvmm needed); a swiftvmm without a `restore` command is skipped.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
runs=10 memory=256M via=auto vmms=qemu,swiftvmm restore_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?}; shift 2 ;;
        --memory) memory=${2:?}; shift 2 ;;
        --vmms) vmms=${2:?}; shift 2 ;;
        --via) via=${2:?}; shift 2 ;;
        --restore-arg) restore_args+=("--restore-arg=${2:?}"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "restore-bench.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "restore-bench.sh: --runs needs a positive number" >&2; exit 2 ;; esac
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest-tests/lib/common.sh
source "$here/../guest-tests/lib/common.sh"
ensure_deps
via=$(bench_via "$via")

vmm=""
case ,$vmms, in
    *,swiftvmm,*)
        [ -n "${SWIFTVMM:-}" ] || build_release || { echo "restore-bench: building swiftvmm failed" >&2; exit 1; }
        vmm=${SWIFTVMM:-$REPO_DIR/.build/release/swiftvmm}
        vmm=$(bench_binary "$via" "$vmm")
        if ! "$vmm" restore --help >/dev/null 2>&1; then
            echo "restore-bench: $vmm has no 'restore' command: SKIPPING the swiftvmm side" >&2
            vmms=$(echo ",$vmms," | sed 's/,swiftvmm,/,/g; s/^,//; s/,$//')
            vmm=""
        fi ;;
esac
[ -n "$vmms" ] || { echo "restore-bench: nothing to measure" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-restore-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The ticking guest: a counter in guest memory, printed every ~5 ms (read -t on a FIFO that never
# has data is a builtin sleep: no fork per tick).
cat > "$work/case.sh" <<'CASE'
mkfifo /tmp/tick-wait && exec 3<>/tmp/tick-wait
i=0
while :; do i=$((i+1)); echo "t$i"; read -t 0.005 _ <&3; done
CASE
VMLINUZ="" INITRAMFS=""
eval "$("$GT_DIR/build-guest.sh" --quiet)"
"$GT_DIR/make-initrd.sh" --case "$work/case.sh" --base "$INITRAMFS" --out "$work/initrd"

cmd=("$(python_bin)" "$here/restore-bench.py" --runs "$runs" --memory "$memory" --vmms "$vmms"
     --kernel "$VMLINUZ" --initrd "$work/initrd")
[ -z "$vmm" ] || cmd+=(--swiftvmm "$vmm" "${restore_args[@]}")
# (QEMU's -cpu host sets IA32_ARCH_CAPABILITIES, which kvm_pvm refuses.)
[ "$via" != pvm ] || cmd+=(--snapshot-after 3 --qemu-cpu "host,arch-capabilities=off")
case $via in
    direct) where="directly on this machine's KVM" ;;
    pvm) where="directly on this machine's kvm_pvm, snapshots 3 s after start, start -> running only" ;;
    testhost) where="in one test-host session (QEMU TCG -cpu EPYC + kvm_amd)" ;;
    *) echo "restore-bench.sh: --via must be auto, direct, testhost or pvm" >&2; exit 2 ;;
esac
echo "restore-bench: $runs restore(s) each of $vmms, $memory, $where" >&2
if [ "$via" != testhost ]; then
    "${cmd[@]}"
else
    "$GT_DIR/testhost.sh" --timeout $(( 900 + runs * 60 )) --rw "$work" -- "${cmd[@]}"
fi
