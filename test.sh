#!/usr/bin/env bash
# The whole test suite: unit, KVM and CLI tests (swift test); every fuzz target for a short fixed
# budget (Fuzz/run.sh: a crash fails the run); the firmware under QEMU (firmware/test-qemu.sh:
# its fw_cfg, table-loader and Linux boot against QEMU's reference fw_cfg, vmgenid's WRITE_POINTER
# included); the snapshot tests about moving between hosts again on another KVM and CPU, without and
# with PKU (guest-tests/cross-host.sh, in the nested test host); that the test host's kernel stalling
# or going silent ends its session at once (guest-tests/testhost-selftest.sh); then the end-to-end Linux guest tests
# (guest-tests/e2e.sh, on swiftvmm-kit, in the nested test host unless /dev/kvm has hardware
# virtualization); then swiftvmm-kit's own tests and its three documented examples (python/check.sh).
set -euo pipefail
cd "$(dirname "$0")"
source guest-tests/lib/common.sh
ensure_deps
swift test
Fuzz/run.sh --seconds "${SWIFTVMM_FUZZ_SECONDS:-10}"
firmware/build.sh
firmware/test-qemu.sh
guest-tests/cross-host.sh
guest-tests/testhost-selftest.sh
guest-tests/e2e.sh
python/check.sh
