#!/usr/bin/env bash
# The whole test suite: unit, KVM and CLI tests (swift test); every fuzz target for a short fixed
# budget (Fuzz/run.sh: a crash fails the run); the firmware under QEMU (firmware/test-qemu.sh:
# its fw_cfg, table-loader and Linux boot against QEMU's reference fw_cfg, vmgenid's WRITE_POINTER
# included); the snapshot tests about moving between hosts again on another KVM and CPU, without and
# with PKU (guest-tests/cross-host.sh, in the nested test host); that the test host's kernel stalling
# or going silent ends its session at once (guest-tests/testhost-selftest.sh); then the end-to-end Linux guest tests
# (guest-tests/e2e.sh, on swiftvmm-kit, in the nested test host unless /dev/kvm has hardware
# virtualization); then swiftvmm-kit's own tests and its three documented examples (python/check.sh).
# Each part is announced and timed on stderr; the first that fails ends the run with its exit status.
set -euo pipefail
cd "$(dirname "$0")"
source guest-tests/lib/common.sh
ensure_deps
# step COMMAND...: runs one part of the suite, says which part it is, and how long it took (or that it
# failed, with its exit status); a failure ends the run.
started=$SECONDS
step() {
    local t0=$SECONDS rc=0
    echo "test.sh: ==> $*" >&2
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "test.sh: FAILED: $* (exit $rc, after $((SECONDS - t0)) s)" >&2
        exit "$rc"
    fi
    echo "test.sh: done: $* in $((SECONDS - t0)) s ($((SECONDS - started)) s so far)" >&2
}
step swift test
step Fuzz/run.sh --seconds "${SWIFTVMM_FUZZ_SECONDS:-10}"
step firmware/build.sh
step firmware/test-qemu.sh
step guest-tests/cross-host.sh
step guest-tests/testhost-selftest.sh
step guest-tests/e2e.sh
step python/check.sh
echo "test.sh: all passed in $((SECONDS - started)) s" >&2
