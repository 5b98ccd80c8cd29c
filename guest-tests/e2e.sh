#!/usr/bin/env bash
# e2e.sh [PYTEST ARGUMENTS...]
#
# The end-to-end tests: real Linux guests (the stock Debian kernel + the busybox test initramfs)
# under swiftvmm, with pytest (guest-tests/e2e/). Every guest run that the test modules declare runs
# in ONE nested test-host session (or directly when /dev/kvm is hardware virtualization); the tests
# then check each run's output, exit status and timing. Exit status: pytest's (0 = all passed).
# If the test host or the guest build fails, every test fails with the reason.
#
# First builds swiftvmm (`swift build --product swiftvmm`, debug) unless SWIFTVMM is set, VMM=qemu,
# or E2E_NO_BUILD=1, and the firmware (firmware/build.sh).
# Environment: SWIFTVMM (binary, default <repo>/.build/debug/swiftvmm), VMM=swiftvmm|qemu (qemu runs
# the same cases under qemu-system-x86_64 -M microvm, or the machine a case asks for, e.g. q35 for the
# TPM cases, to check the harness and the tests), E2E_VIA=auto|direct|testhost.
# Select cases with pytest's -k, e.g. `e2e.sh -k tpm` (only the selected tests' guest runs are made).
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_deps
if [ "${VMM:-swiftvmm}" = swiftvmm ] && [ -z "${SWIFTVMM:-}" ] && [ "${E2E_NO_BUILD:-0}" != 1 ]; then
    echo "e2e: swift build --product swiftvmm" >&2
    (cd "$REPO_DIR" && swift build --product swiftvmm >&2)
fi
# The firmware for the firmware-boot cases (quick when it is up to date).
"$REPO_DIR/firmware/build.sh" >&2
exec "$(python_bin)" -m pytest "$GT_DIR/e2e" "$@"
