#!/usr/bin/env bash
# The whole test suite: unit, KVM and CLI tests (swift test), then the end-to-end Linux guest tests
# (guest-tests/e2e.sh, in the nested test host unless /dev/kvm has hardware virtualization).
set -euo pipefail
cd "$(dirname "$0")"
source guest-tests/lib/common.sh
ensure_deps
swift test
guest-tests/e2e.sh
