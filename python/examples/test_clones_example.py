"""Example 3: does my service survive a snapshot restored into two clones?

The guest runs a counter and answers on its console. It is snapshotted while paused, then restored
twice: each clone goes on counting from where the original stopped, answers on its own, and has a
generation ID of its own that its guest acknowledges.
"""

import re

GUEST = r"""
( i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 1; done ) &
while read -r line; do echo "answer: $line"; done
"""


def test_a_snapshot_restores_into_two_independent_clones(swiftvmm_guest_image, swiftvmm_vm):
    vm = swiftvmm_vm(swiftvmm_guest_image(GUEST))
    vm.console.expect(r"^tick 3$", timeout=180)
    vm.pause()
    original_id = vm.generation_id
    snap = vm.snapshot()          # a private directory, removed when `with snap` ends
    last = max(int(n) for n in re.findall(r"^tick (\d+)$", vm.console.text, re.M))
    vm.quit()

    with snap, snap.restore(n=2) as clones:
        a, b = clones
        assert len({original_id, a.generation_id, b.generation_id}) == 3
        for clone in clones:
            clone.expect_generation_id_acknowledged(timeout=60)
            tick = int(clone.console.expect(r"^tick (\d+)$", timeout=60).group(1))
            # The count goes on from the snapshot, not from 1 (last may miss a tick still in flight).
            assert last < tick <= last + 2
        a.console.send("hello from a\n")
        b.console.send("hello from b\n")
        assert a.console.expect(r"^answer: (.*)$", timeout=60).group(1) == "hello from a"
        assert b.console.expect(r"^answer: (.*)$", timeout=60).group(1) == "hello from b"
        assert "hello from b" not in a.console.text
