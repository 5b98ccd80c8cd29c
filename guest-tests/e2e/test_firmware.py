"""Firmware boot: swiftvmm maps our firmware (firmware/, built by firmware/build.sh) at the reset vector;
it loads the kernel, initrd and command line through fw_cfg DMA, runs etc/table-loader (so the guest's
ACPI tables come from the same loader script a direct boot runs on the host) and boots Linux."""

import re

from guestrun import GuestRun

FWBOOT = GuestRun(
    name="fwboot",
    case_script="\n".join([
        'echo "tables=$(ls /sys/firmware/acpi/tables | tr "\\n" " ")"',
        'echo "online=$(cat /sys/devices/system/cpu/online)"',
        'echo "cmdline=$(cat /proc/cmdline)"',
        'echo "sci_file=$([ -e /sys/firmware/acpi/interrupts/sci ] && echo yes || echo no)"',
        "modload qemu_fw_cfg || echo modload-failed",
        'echo "fwcfg_loader=$(cat /sys/firmware/qemu_fw_cfg/by_name/etc/table-loader/size 2>/dev/null)"',
        'dmesg | grep -iE "ACPI (Error|Exception|BIOS Error|Warning)|BIOS bug|Firmware Bug|ACPI.*(checksum|invalid)" '
        '| grep -v "checksum verification disabled" | sed "s/^/acpi-bad: /"',
        'echo "vmgenid_bound=$(ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | grep -c QEMUVGID)"',
        'echo "vgen_status=$(cat /sys/bus/acpi/devices/QEMUVGID:00/status 2>/dev/null)"',
        'echo "gpe05=$(cat /sys/firmware/acpi/interrupts/gpe05 2>/dev/null | tr -s " ")"',
        'echo "e820_reserved=$(dmesg | grep -c "BIOS-e820:.*reserved")"',
    ]),
    swiftvmm_args=("--memory", "256M", "--cpus", "2", "--firmware", "builtin", "--log-level", "info"),
    cmdline_extra="swiftvmm.e2e=fwboot",
    timeout=300,
)

GUEST_RUNS = [FWBOOT]


def test_firmware_boot_reaches_init_and_powers_off(guest):
    guest("fwboot").assert_clean_run()


def test_firmware_reports_its_time(guest):
    r = guest("fwboot")
    i = r.index_of("swiftvmm-fw: tables loaded, booting Linux after")
    r.check(i >= 0, "the firmware's boot line is missing")
    m = re.search(r"after (\d+) (us|TSC cycles)", r.lines[i])
    r.check(m is not None, f"no time figure in {r.lines[i]!r}")
    if m.group(2) == "us":
        r.check(int(m.group(1)) < 1_000_000, f"the firmware took {m.group(1)} us")


def test_firmware_loaded_the_acpi_tables(guest):
    r = guest("fwboot")
    tables = (r.value("tables=") or "").split()
    for t in ("FACP", "APIC", "DSDT", "FACS"):
        r.check(t in tables, f"/sys/firmware/acpi/tables lacks {t}: {tables}")
    r.check(r.value("online=") == "0-1", f"CPUs online: {r.value('online=')!r}")
    r.check(r.value("sci_file=") == "yes", "no SCI")
    r.assert_printed_good_lines()
    r.check(r.value("fwcfg_loader=") is not None and r.value("vmgenid_bound=") is not None,
            "the case script's lines around the ACPI complaint filter are missing")
    bad = [line for line in r.lines if line.startswith("acpi-bad: ")]
    r.check(not bad, f"ACPI complaints: {bad}")
    r.check(r.index_of("guest powered off (ACPI S5)") >= 0, "the power-off did not go through S5")


def test_firmware_passed_the_command_line_and_initrd(guest):
    r = guest("fwboot")
    r.check(FWBOOT.cmdline in (r.value("cmdline=") or ""), f"/proc/cmdline is {r.value('cmdline=')!r}")
    # /init ran at all: the initrd arrived. fw_cfg still lists the loader script the firmware ran.
    # (Only the leading digits: a kernel message may land on the same console line, since printk
    # overtakes what user space still has in the tty's buffer when the console is slow.)
    size = re.match(r"\d*", r.value("fwcfg_loader=") or "").group(0)
    r.check(size.isdigit() and int(size) % 128 == 0 and int(size) > 0, f"etc/table-loader size {r.value('fwcfg_loader=')!r}")


def test_fwboot_vmgenid_driver_bound_and_gpe5_enabled(guest):
    r = guest("fwboot")
    r.check(r.value("vmgenid_bound=") == "1", "the guest's vmgenid driver did not bind to QEMUVGID:00")
    r.check(r.value("vgen_status=") == "15", f"QEMUVGID:00 _STA is {r.value('vgen_status=')!r} (0 means VGIA was not patched)")
    r.check("enabled" in (r.value("gpe05=") or ""), f"GPE 5 is not enabled: {r.value('gpe05=')!r} (\\_GPE._E05 missing?)")
