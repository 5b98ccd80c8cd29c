"""fw_cfg seen by the guest's own qemu_fw_cfg driver: the file directory in sysfs, host-provided files
with their exact content, and the driver's DMA write of etc/vmcoreinfo reaching the VMM."""

import hashlib
from pathlib import Path

from guestrun import GuestRun

HOST_FILE = "/etc/os-release"  # exists on the host and, through 9p, in the test host
HELLO = "hello, from the host"

FWCFG = GuestRun(
    name="fwcfg",
    case_script="\n".join([
        "modload qemu_fw_cfg || echo modload-failed",
        "d=/sys/firmware/qemu_fw_cfg",
        'echo "rev=$(cat $d/rev 2>/dev/null)"',
        'echo "etc=$(ls $d/by_name/etc 2>/dev/null | tr "\\n" " ")"',
        'echo "acpi=$(ls $d/by_name/etc/acpi 2>/dev/null | tr "\\n" " ")"',
        'echo "hello=$(cat $d/by_name/opt/swiftvmm/hello/raw)"',
        'echo "osrel=$(md5sum < $d/by_name/opt/swiftvmm/os-release/raw | cut -d" " -f1)"',
        'echo "osrel_size=$(cat $d/by_name/opt/swiftvmm/os-release/size)"',
        'echo "e820_size=$(cat $d/by_name/etc/e820/size)"',
    ]),
    swiftvmm_args=("--memory", "256M", "--log-level", "info",
                   "--fw-cfg", f"name=opt/swiftvmm/hello,string={HELLO}",
                   "--fw-cfg", f"name=opt/swiftvmm/os-release,file={HOST_FILE}"),
    cmdline_extra="swiftvmm.e2e=fwcfg",
    timeout=300,
)

GUEST_RUNS = [FWCFG]


def test_fwcfg_run_is_clean(guest):
    guest("fwcfg").assert_clean_run()


def test_fwcfg_driver_lists_our_files(guest):
    r = guest("fwcfg")
    r.check(r.index_of("modload-failed") < 0, "modload qemu_fw_cfg failed")
    r.check((r.value("rev=") or "").isdigit(), f"/sys/firmware/qemu_fw_cfg/rev is {r.value('rev=')!r}")
    etc = (r.value("etc=") or "").split()
    for f in ("e820", "table-loader", "vmcoreinfo", "acpi"):
        r.check(f in etc, f"by_name/etc lacks {f}: {etc}")
    acpi = (r.value("acpi=") or "").split()
    r.check(sorted(acpi) == ["rsdp", "tables"], f"by_name/etc/acpi is {acpi}")
    r.check(r.value("e820_size=") not in (None, "", "0") and int(r.value("e820_size=")) % 20 == 0,
            f"etc/e820 size {r.value('e820_size=')!r} is not a multiple of 20")


def test_fwcfg_host_files_reach_the_guest_intact(guest):
    r = guest("fwcfg")
    r.check(r.value("hello=") == HELLO, f"opt/swiftvmm/hello reads {r.value('hello=')!r}")
    data = Path(HOST_FILE).read_bytes()
    r.check(r.value("osrel_size=") == str(len(data)), f"size {r.value('osrel_size=')!r}, host file has {len(data)}")
    r.check(r.value("osrel=") == hashlib.md5(data).hexdigest(), "opt/swiftvmm/os-release content differs from the host file")


def test_fwcfg_vmcoreinfo_dma_write_observed(guest):
    r = guest("fwcfg")
    i = r.index_of("guest vmcoreinfo: guest format 1 (ELF note)")
    r.check(i >= 0, "swiftvmm did not log the guest's etc/vmcoreinfo DMA write")
    r.check(" at 0x0" not in r.lines[i], f"vmcoreinfo address is zero: {r.lines[i]}")
