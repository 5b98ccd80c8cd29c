#!/usr/bin/env bash
# run-guest.sh [OPTIONS] [-- EXTRA SWIFTVMM RUN ARGUMENTS]
#
# Boots the test guest (build-guest.sh: the stock Debian kernel + a busybox initramfs) with
#   $SWIFTVMM run --kernel K --initrd I --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet" EXTRA...
# directly when kvm-probe.sh says /dev/kvm is hardware virtualization, otherwise inside the nested
# test host (testhost.sh), and exits with swiftvmm's exit status (testhost.sh's 124/125 when the
# test host timed out / failed). One line on stderr says which way it runs and why.
# Builds swiftvmm first (build_release in lib/common.sh: `swift build -c release --product swiftvmm
# --static-swift-stdlib`, quick when it is up to date) unless SWIFTVMM names a binary.
#
# Options:
#   --via auto|direct|testhost  where to run (default auto: kvm-probe.sh decides)
#   --case SCRIPT               a shell script the guest's /init runs (make-initrd.sh appends it)
#   --cmdline STRING            replace the guest kernel command line
#   --append STRING             add to the guest kernel command line
#   --quiet                     do not show the guest console; print only its swiftvmm-guest: lines
#   --timeout SECONDS           kill the run after this long (default: 600 in the test host, none directly)
#   -h, --help                  this text
# Environment: SWIFTVMM  the swiftvmm binary (default: <repo>/.build/release/swiftvmm)
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
via=auto case_script="" quiet=0 timeout_s=""
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet"
while [ $# -gt 0 ]; do
    case $1 in
        --via) via=${2:?}; shift 2 ;;
        --case) case_script=${2:?}; shift 2 ;;
        --cmdline) cmdline=${2?}; shift 2 ;;
        --append) cmdline="$cmdline ${2:?}"; shift 2 ;;
        --quiet) quiet=1; shift ;;
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run-guest.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $via in auto|direct|testhost) ;; *) echo "run-guest.sh: --via must be auto, direct or testhost" >&2; exit 2 ;; esac
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_deps
if [ -z "${SWIFTVMM:-}" ]; then
    build_release ||
        { echo "run-guest.sh: building swiftvmm failed" >&2; exit 1; }
fi
vmm=${SWIFTVMM:-$REPO_DIR/.build/release/swiftvmm}
if [ ! -x "$vmm" ]; then
    echo "run-guest.sh: no swiftvmm binary at $vmm: build it first (swift build -c release --product swiftvmm) or set SWIFTVMM" >&2
    exit 2
fi
vmm=$(cd "$(dirname "$vmm")" && pwd -P)/$(basename "$vmm")

VMLINUZ="" INITRAMFS=""
eval "$("$GT_DIR/build-guest.sh" --quiet)"
initrd=$INITRAMFS
if [ -n "$case_script" ]; then
    initrd=$(dirname "$INITRAMFS")/run-guest-case.cpio.gz
    "$GT_DIR/make-initrd.sh" --case "$case_script" --base "$INITRAMFS" --out "$initrd"
fi

if [ "$via" = auto ]; then
    probe=$("$GT_DIR/kvm-probe.sh")
    case $probe in
        hardware) via=direct; why="kvm-probe: /dev/kvm is hardware virtualization" ;;
        pvm) via=testhost; why="kvm-probe: /dev/kvm is kvm_pvm (paravirtual nested KVM, far too slow for a Linux guest)" ;;
        *) via=testhost; why="kvm-probe: no usable /dev/kvm" ;;
    esac
else
    why="--via $via"
fi

args=(run --kernel "$VMLINUZ" --initrd "$initrd" --cmdline "$cmdline" "$@")
if [ "$via" = direct ]; then
    echo "run-guest: running swiftvmm directly ($why)" >&2
    cmd=("$vmm" "${args[@]}")
    [ -z "$timeout_s" ] || cmd=(timeout --kill-after=10 "$timeout_s" "${cmd[@]}")
else
    echo "run-guest: running swiftvmm in the nested test host: QEMU TCG -cpu EPYC + kvm_amd, ~30-60 s ($why)" >&2
    th=("$GT_DIR/testhost.sh" --timeout "${timeout_s:-600}")
    # The test host mounts tmpfs on /tmp and /run: share the directories of files that live there.
    for f in "$vmm" "$initrd" "$VMLINUZ"; do
        case $f in /tmp/*|/run/*) th+=(--rw "$(dirname "$f")") ;; esac
    done
    cmd=("${th[@]}" -- "$vmm" "${args[@]}")
fi
if [ "$quiet" = 0 ]; then
    exec "${cmd[@]}"
fi
set +e
"${cmd[@]}" | tr -d '\r' | grep --line-buffered '^swiftvmm-guest:'
status=${PIPESTATUS[0]}
echo "run-guest: swiftvmm exited $status" >&2
exit "$status"
