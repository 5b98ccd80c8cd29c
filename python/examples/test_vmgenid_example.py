"""Example 2: does my guest notice a VM generation ID change?

The host changes the ID; swiftvmm tells the guest (ACPI GPE 5), the guest's kernel reseeds its
random number generator, and swiftvmm reports when the guest took the notification.
"""

GUEST = r"""
wait_dmesg() { i=0; while ! dmesg | grep -q "$1"; do sleep 0.2; i=$((i+1)); [ $i -gt 900 ] && return 1; done; return 0; }
wait_dmesg "crng init done"
echo "guest: ready"
wait_dmesg "crng reseeded due to virtual machine fork" && echo "guest: reseeded after the change"
"""


def test_the_guest_notices_a_new_generation_id(swiftvmm_guest_image, swiftvmm_vm):
    vm = swiftvmm_vm(swiftvmm_guest_image(GUEST))
    vm.console.expect("guest: ready", timeout=180)
    before = vm.generation_id

    after = vm.set_generation_id("auto")
    assert after != before

    # Waits for swiftvmm's VM_GENERATION_ID_ACKNOWLEDGED event for this GUID, then the guest's line.
    event = vm.expect_generation_id_acknowledged(after, timeout=60, console="guest: reseeded after the change")
    assert event["data"]["latency-ms"] >= 0
    assert vm.generation_id_state()["pending"] is False
    assert vm.wait(timeout=60) == 0
