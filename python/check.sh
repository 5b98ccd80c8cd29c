#!/usr/bin/env bash
# python/check.sh: the kit's tests. First its unit tests (tests/, against tests/fake_swiftvmm.py: no
# KVM needed), then the three documented examples (examples/) with the real swiftvmm: in the nested
# test host unless /dev/kvm has hardware virtualization (the plugin decides). Exit status: pytest's.
# Environment: SWIFTVMM (default <repo>/.build/debug/swiftvmm), PYTHON (default python3).
# Arguments are passed to both pytest runs (e.g. -x, -k NAME).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
# shellcheck source=guest-tests/lib/common.sh
source ../guest-tests/lib/common.sh
"$python" -m pytest -q -p no:cacheprovider tests "$@"
# shellcheck disable=SC2046 # kit_pytest_args prints words (-p for the plugin unless pip installed it)
"$python" -m pytest -q -p no:cacheprovider $(kit_pytest_args) examples --swiftvmm-bin "${SWIFTVMM:-../.build/debug/swiftvmm}" "$@"
