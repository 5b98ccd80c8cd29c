#!/usr/bin/env bash
# run-guest.sh [--via auto|direct|testhost] [--case SCRIPT] [-- extra swiftvmm run arguments]
#
# Builds swiftvmm (release) and the test guest, then boots the guest with swiftvmm: directly when
# /dev/kvm has hardware virtualization behind it, otherwise inside the nested test host.
# Exits with swiftvmm's status.
set -euo pipefail
via=auto case_script=
while [ $# -gt 0 ]; do
    case $1 in
        --via) via=$2; shift 2 ;;
        --case) case_script=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "run-guest.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
source "$(dirname "$0")/lib/common.sh"
ensure_deps
(cd "$REPO_DIR" && swift build -c release --product swiftvmm 2>&1 | grep -E "error|omplete" >&2 || true)
vmm=${SWIFTVMM:-$REPO_DIR/.build/release/swiftvmm}
read -r kernel initrd < <("$GT_DIR/build-guest.sh")
if [ -n "$case_script" ]; then
    initrd="$CACHE_DIR/guest/demo-initrd.cpio.gz"
    "$GT_DIR/make-initrd.sh" --case "$case_script" --out "$initrd"
fi
cmdline=${SWIFTVMM_CMDLINE:-"console=ttyS0 reboot=k panic=-1 pci=off"}
if [ "$via" = auto ]; then
    if "$vmm" host-info | grep -q '^hardware'; then via=direct; else via=testhost; fi
fi
args=(run --kernel "$kernel" --initrd "$initrd" --cmdline "$cmdline" "$@")
if [ "$via" = direct ]; then
    echo "run-guest: /dev/kvm has hardware virtualization: running swiftvmm directly" >&2
    exec "$vmm" "${args[@]}"
fi
echo "run-guest: $("$vmm" host-info | head -n1 || true)" >&2
echo "run-guest: booting inside the nested test host (QEMU TCG, -cpu EPYC, kvm_amd); this takes about a minute" >&2
exec "$GT_DIR/testhost.sh" --timeout 600 -- "$vmm" "${args[@]}"
