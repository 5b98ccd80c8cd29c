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
# The plugin comes from the pytest11 entry point when the kit is pip-installed, else from -p.
plugin=(-p swiftvmm_kit.pytest_plugin)
if "$python" -c 'import sys; from importlib.metadata import entry_points as e; sys.exit(0 if any(p.name == "swiftvmm" for p in e(group="pytest11")) else 1)'; then
    plugin=()
fi
"$python" -m pytest -q -p no:cacheprovider tests "$@"
"$python" -m pytest -q -p no:cacheprovider "${plugin[@]}" examples --swiftvmm-bin "${SWIFTVMM:-../.build/debug/swiftvmm}" "$@"
