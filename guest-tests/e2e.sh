#!/usr/bin/env bash
# e2e.sh [PYTEST ARGUMENTS...]
#
# The end-to-end tests: real Linux guests (the stock Debian kernel + a busybox initramfs per case)
# under swiftvmm, with pytest (guest-tests/e2e/) on swiftvmm-kit (python/swiftvmm_kit): the kit builds
# each case's guest image and runs its VM; its pytest plugin runs the whole session in ONE nested
# test-host session when this host's /dev/kvm has no hardware virtualization (else directly), and
# each case runs once, when its first test asks for it. Exit status: pytest's (0 = all passed).
#
# First builds swiftvmm (`swift build --product swiftvmm`, debug) unless SWIFTVMM is set or
# E2E_NO_BUILD=1, the firmware (firmware/build.sh) and the static guest tools (tools/build-tools.sh),
# here rather than in the test host's emulated CPU.
# Environment: SWIFTVMM (binary, default <repo>/.build/debug/swiftvmm), E2E_VIA=auto|direct|testhost
# (the kit's --swiftvmm-via), E2E_TIMEOUT (seconds for the test-host session, default 1800).
# Select cases with pytest's -k, e.g. `e2e.sh -k tpm` (only the selected tests' guests run), or name
# test files (then only those run), e.g. `e2e.sh guest-tests/e2e/tpm_snapshot_scenario.py`.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_deps
if [ -z "${SWIFTVMM:-}" ] && [ "${E2E_NO_BUILD:-0}" != 1 ]; then
    echo "e2e: swift build --product swiftvmm" >&2
    (cd "$REPO_DIR" && swift build --product swiftvmm >&2)
fi
swiftvmm=${SWIFTVMM:-$REPO_DIR/.build/debug/swiftvmm}
# The firmware for the firmware-boot cases (quick when it is up to date).
"$REPO_DIR/firmware/build.sh" >&2
# Every guest tool, into the cache the cases take them from (quick when cached).
mapfile -t tools < <(cd "$GT_DIR/tools" && ls -- *.c | sed 's/\.c$//')
"$GT_DIR/tools/build-tools.sh" "${tools[@]}" >/dev/null
# The guest images' shared base (busybox, /init, the modules), here rather than under the test host's
# emulated CPU: each case then adds only its own small archive to it.
kit_image >/dev/null
export PYTHONPATH=$REPO_DIR/python${PYTHONPATH:+:$PYTHONPATH}
# The whole suite, unless the arguments name test files or directories themselves.
where=("$GT_DIR/e2e")
for a in "$@"; do case $a in -*) ;; *) [ -e "${a%%::*}" ] && where=() ;; esac; done
# shellcheck disable=SC2046 # kit_pytest_args prints words
exec "$(python_bin)" -m pytest $(kit_pytest_args) "${where[@]}" --swiftvmm-bin "$swiftvmm" \
    --swiftvmm-via "${E2E_VIA:-auto}" --swiftvmm-testhost-timeout "${E2E_TIMEOUT:-1800}" "$@"
