"""Example 1: does my kernel boot, and does the guest see the machine I asked for?

Run: pytest examples/test_boot_example.py   (with the kit installed: pip install ./python)
"""


def test_the_guest_boots_and_sees_two_cpus(swiftvmm_guest_image, swiftvmm_vm):
    # The host's kernel with a busybox initramfs whose /init runs this script, then powers off.
    image = swiftvmm_guest_image('echo "guest: kernel=$(uname -r) cpus=$(nproc) mem=$(free -m | awk \'/Mem:/{print $2}\')"')
    vm = swiftvmm_vm(image, memory="256M", cpus=2)

    m = vm.console.expect(r"guest: kernel=(\S+) cpus=(\d+) mem=(\d+)", timeout=180)
    assert m.group(1) == image.kernel_version
    assert m.group(2) == "2"
    assert 200 < int(m.group(3)) <= 256

    vm.console.expect("swiftvmm-guest: powering off", timeout=60)
    assert vm.wait(timeout=60) == 0  # ACPI power-off ends swiftvmm with status 0
