"""NOT COLLECTED by e2e.sh (not named test_*); run it by hand:
`guest-tests/e2e.sh -s guest-tests/e2e/clone_stress_scenario.py` (add TESTHOST_NPT=0 for shadow paging).

The stress run behind README, "The test host": a guest that counts on its console is snapshotted,
then restored 3 clones at a time, each sent a console line every 0.3 s for 20 s, until
SWIFTVMM_CLONE_STRESS_CLONES clones (default 30) have run or 3 have crashed. It prints each round's triple
faults with the test host's KVM trace of the first (swiftvmm_kit/l1trace.py) and the totals, and fails when a
triple fault is not one of the emulator's patterns (what the e2e harness would not retry), or when
a clone ends in any other way before its 20 s are up.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from swiftvmm_kit.l1trace import L1Trace, reset_state_triple_faults

GUEST = r"""
( i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 1; done ) &
while read -r line; do echo "answer: $line"; done
"""


def _say(text: str) -> None:
    print(f"clone-stress: {text}", file=sys.stderr, flush=True)


@pytest.mark.swiftvmm_no_retry  # it counts the emulator's triple faults itself
def test_restored_clones_under_console_input(swiftvmm_guest_image, swiftvmm_vm):
    limit = int(os.environ.get("SWIFTVMM_CLONE_STRESS_CLONES", "30"))
    trace, why = L1Trace.open()
    if trace is None:
        _say(f"no KVM trace ({why}): triple faults are counted, not judged")
    vm = swiftvmm_vm(swiftvmm_guest_image(GUEST))
    vm.console.expect(r"^tick 3$", timeout=180)
    vm.pause()
    snap = vm.snapshot()
    vm.quit()
    crashed = total = 0
    problems = []
    with snap:
        while total < limit and crashed < 3:
            if trace is not None:
                trace.arm()
            with snap.restore(n=3) as clones:
                end = time.monotonic() + 20
                while time.monotonic() < end and all(c.running for c in clones):
                    for c in clones:
                        if c.running:
                            c.console.send("x\n")
                    time.sleep(0.3)
                statuses = [c.exit_status() for c in clones]
                errs = [c.stderr for c in clones]
            total += 3
            faults = reset_state_triple_faults(errs)
            crashed += faults
            others = [s for s, e in zip(statuses, errs) if s is not None and reset_state_triple_faults([e]) == 0]
            if others:
                problems.append(f"clones ended with status {others} before their 20 s, not in a triple fault")
            if faults:
                _say(f"{faults} triple fault(s) in clones {total - 2}..{total}")
                if trace is not None:
                    judged = trace.shutdowns()
                    for s in judged:
                        _say(s.report())
                    problems += [f"not the emulator's: {s.why}" for s in judged if not s.emulator]
    _say(f"{crashed} triple fault(s) in {total} clones")
    assert not problems, "\n".join(problems)
