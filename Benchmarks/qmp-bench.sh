#!/usr/bin/env bash
# qmp-bench.sh [--runs N]: QMP start-up (process start → greeting, wall and CPU time) and the
# generation-ID change round trip, swiftvmm vs QEMU (-M pc with -device vmgenid), in one test-host
# session (or directly on hardware KVM). See qmp-bench.py for what is measured.
set -euo pipefail
runs=5
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "qmp-bench.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest-tests/lib/common.sh
source "$here/../guest-tests/lib/common.sh"
ensure_deps
[ -n "${SWIFTVMM:-}" ] || build_release
via=$(bench_via auto)
vmm=$(bench_binary "$via" "${SWIFTVMM:-$REPO_DIR/.build/release/swiftvmm}")
VMLINUZ="" INITRAMFS=""
eval "$("$GT_DIR/build-guest.sh" --quiet)"
cmd=("$(python_bin)" "$here/qmp-bench.py" --runs "$runs" --swiftvmm "$vmm" --kernel "$VMLINUZ" --initrd "$INITRAMFS")
if [ "$via" = direct ]; then
    "${cmd[@]}"
else
    "$GT_DIR/testhost.sh" --timeout 900 -- "${cmd[@]}"
fi
