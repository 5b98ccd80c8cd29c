"""ACPI platform: the guest finds our tables, brings up every vCPU through the MADT, registers the SCI,
logs no ACPI errors about our tables, and powers off through S5."""

from guestrun import GuestRun

ACPI = GuestRun(
    name="acpi",
    case_script="\n".join([
        'echo "online=$(cat /sys/devices/system/cpu/online)"',
        'echo "nproc=$(grep -c ^processor /proc/cpuinfo)"',
        'echo "tables=$(ls /sys/firmware/acpi/tables | tr "\\n" " ")"',
        'echo "sci_file=$([ -e /sys/firmware/acpi/interrupts/sci ] && echo yes || echo no)"',
        'echo "irq9=$(grep -E "^ *9:" /proc/interrupts | tr -s " ")"',
        'echo "s5=$(dmesg | grep -c "ACPI: PM: (supports S0 S5)")"',
        'echo "pmtimer=$(grep -c acpi_pm /sys/devices/system/clocksource/clocksource0/available_clocksource)"',
        # ACPICA's complaints about tables and AML; "checksum verification disabled" is an info line.
        'dmesg | grep -iE "ACPI (Error|Exception|BIOS Error|Warning)|BIOS bug|Firmware Bug|ACPI.*(checksum|invalid)" '
        '| grep -v "checksum verification disabled" | sed "s/^/acpi-bad: /"',
        'echo "vmgenid_bound=$(ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | grep -c QEMUVGID)"',
        'echo "vgen_status=$(cat /sys/bus/acpi/devices/QEMUVGID:00/status 2>/dev/null)"',
        'echo "gpe05=$(cat /sys/firmware/acpi/interrupts/gpe05 2>/dev/null | tr -s " ")"',
        'echo "devices=$(ls /sys/bus/acpi/devices | tr "\\n" " ")"',
    ]),
    swiftvmm_args=("--memory", "256M", "--cpus", "2", "--log-level", "info"),
    cmdline_extra="swiftvmm.e2e=acpi",
    timeout=300,
)

GUEST_RUNS = [ACPI]


def test_acpi_run_is_clean(guest):
    guest("acpi").assert_clean_run()


def test_acpi_two_vcpus_online(guest):
    r = guest("acpi")
    r.check(r.value("online=") == "0-1", f"/sys/devices/system/cpu/online is {r.value('online=')!r}, expected '0-1'")
    r.check(r.value("nproc=") == "2", f"/proc/cpuinfo lists {r.value('nproc=')!r} processors, expected 2")


def test_acpi_tables_seen(guest):
    r = guest("acpi")
    tables = (r.value("tables=") or "").split()
    for t in ("FACP", "APIC", "DSDT", "FACS"):
        r.check(t in tables, f"/sys/firmware/acpi/tables lacks {t}: {tables}")


def test_acpi_sci_on_irq9(guest):
    r = guest("acpi")
    r.check(r.value("sci_file=") == "yes", "/sys/firmware/acpi/interrupts/sci is missing")
    irq9 = r.value("irq9=") or ""
    r.check("acpi" in irq9 and "IO-APIC" in irq9 and "fasteoi" in irq9,
            f"/proc/interrupts line for IRQ 9 is {irq9!r}: expected the acpi handler on a level (fasteoi) IO-APIC pin")


def test_acpi_no_errors_about_our_tables(guest):
    r = guest("acpi")
    r.assert_printed_good_lines()
    # The lines the case script prints just before and after its dmesg filter.
    r.check(r.value("pmtimer=") is not None and r.value("vmgenid_bound=") is not None,
            "the case script's lines around the ACPI complaint filter are missing")
    bad = [line for line in r.lines if line.startswith("acpi-bad: ")]
    r.check(not bad, f"the guest's kernel log has ACPI complaints: {bad}")


def test_acpi_s5_supported_and_used_for_power_off(guest):
    r = guest("acpi")
    r.check(r.value("s5=") == "1", "the kernel did not log 'ACPI: PM: (supports S0 S5)'")
    r.check(r.index_of("guest powered off (ACPI S5)") >= 0,
            "swiftvmm did not report a power-off through ACPI S5 (a triple fault or i8042 reset is not a clean power-off)")


def test_acpi_devices_enumerated(guest):
    r = guest("acpi")
    devices = r.value("devices=") or ""
    for hid in ("PNP0501", "PNP0303", "PNP0B00", "PNP0C02", "LNXPWRBN"):
        r.check(hid in devices, f"/sys/bus/acpi/devices lacks {hid}: {devices}")


def test_acpi_pm_timer_is_a_clocksource(guest):
    r = guest("acpi")
    r.check(r.value("pmtimer=") == "1", "acpi_pm is not among the available clocksources")


def test_acpi_vmgenid_driver_bound_and_gpe5_enabled(guest):
    r = guest("acpi")
    r.check(r.value("vmgenid_bound=") == "1", "the guest's vmgenid driver did not bind to QEMUVGID:00")
    r.check(r.value("vgen_status=") == "15", f"QEMUVGID:00 _STA is {r.value('vgen_status=')!r} (0 means VGIA was not patched)")
    r.check("enabled" in (r.value("gpe05=") or ""), f"GPE 5 is not enabled: {r.value('gpe05=')!r} (\\_GPE._E05 missing?)")
