"""NOT COLLECTED by e2e.sh (not named test_*); run it by hand:
`guest-tests/e2e.sh -s guest-tests/e2e/boot_stress_scenario.py`.

Boots the snapshot case's guest (test_snapshot.CASE, its modules and command line) again and again,
2 at a time, until SWIFTVMM_BOOT_STRESS_BOOTS boots (default 20) have run, and fails when one does
not print its `case: ready` line within 120 s (in the CI of 2026-12-06 one did not in 240 s) or
ends before it. For such a guest it prints its console and the last events of each vCPU thread in
the test host's KVM trace (swiftvmm_kit/l1trace.py).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from guestrun import GUEST_MODULES
from swiftvmm_kit import KitError
from swiftvmm_kit.l1trace import L1Trace
from test_snapshot import SNAPSHOT


def _say(text: str) -> None:
    print(f"boot-stress: {text}", file=sys.stderr, flush=True)


@pytest.mark.swiftvmm_no_retry
def test_fresh_boots_reach_ready(swiftvmm_guest_image, swiftvmm_vm):
    limit = int(os.environ.get("SWIFTVMM_BOOT_STRESS_BOOTS", "20"))
    trace, why = L1Trace.open()
    if trace is None:
        _say(f"no KVM trace ({why})")
    image = swiftvmm_guest_image(SNAPSHOT.case_script, modules=GUEST_MODULES, load_modules=False)
    problems, times = [], []
    for round_ in range(0, limit, 2):
        if trace is not None:
            trace.arm()
        start = time.monotonic()
        vms = [swiftvmm_vm(image, memory="256M", cpus=None, vmgenid=None, cmdline=SNAPSHOT.cmdline) for _ in range(2)]
        for i, vm in enumerate(vms):
            try:
                vm.console.expect(r"^case: ready ", timeout=max(1.0, 120 - (time.monotonic() - start)))
                times.append(round(time.monotonic() - start, 1))
            except KitError as e:
                problems.append(f"boot {round_ + i + 1}: {str(e).splitlines()[0]}")
                _say(f"{problems[-1]}\n--- console:\n{vm.console.text[-3000:]}\n--- stderr:\n{vm.stderr[-2000:]}")
                if trace is not None:
                    _say(trace.last_events(per_thread=30))
        for vm in vms:
            vm.close(graceful=False)
        _say(f"boots {round_ + 1}-{round_ + 2}: ready after {times[-2:]} s")
        if problems:
            break
    assert not problems, "\n".join(problems)
