"""The QMP control socket driven by the real qemu.qmp client (qmp_driver.py) while a Linux guest runs:
the VM generation ID change end to end (guest memory, GPE 5, the guest kernel's reseed), stop/cont,
and system_powerdown through the ACPI power button."""

from guestrun import GuestRun

WAIT_DMESG = ('wait_dmesg() { i=0; while ! dmesg | grep -q "$1"; do sleep 0.1; i=$((i+1)); '
              '[ $i -gt 600 ] && return 1; done; }')
GUID_WORDS = ('guid() { v=$(od -An -tu4 -j42 -N4 /sys/firmware/acpi/tables/SSDT | tr -d " "); a=$((v + 40)); '
              'for o in 0 4 8 12; do devmem $((a + o)) 32; done | tr "\\n" " "; }')
GPE5 = "awk '{print $1}' /sys/firmware/acpi/interrupts/gpe05"

VMGENID = GuestRun(
    name="qmp-vmgenid",
    case_script="\n".join([
        WAIT_DMESG, GUID_WORDS,
        'wait_dmesg "crng init done" || echo "case: crng not ready"',
        'echo "case: guid-before=$(guid)"',
        'echo "swiftvmm-qmp: query-guid"',
        f'c0=$({GPE5})',
        'echo "swiftvmm-qmp: change-guid"',
        f'i=0; c=$c0; while [ "$c" = "$c0" ] && [ $i -lt 600 ]; do sleep 0.1; c=$({GPE5}); i=$((i+1)); done',
        "sleep 1",
        'echo "case: gpe05=$c0,$c"',
        'echo "case: guid-after=$(guid)"',
        'echo "case: reseeds=$(dmesg | grep -c "crng reseeded due to virtual machine fork")"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=qmp-vmgenid",
    driver="qmp_driver.py",
    timeout=300,
)

STOPCONT = GuestRun(
    name="qmp-stopcont",
    case_script="\n".join([
        # The ACPI button driver (a module in Debian's kernel) enables the fixed power button event.
        "modload button || echo modload-failed",
        # A tick every 100 ms; after the 5th the driver stops the VM for 1 s, which shows as a gap
        # between two ticks (the guest clock keeps running while its vCPUs are parked).
        'i=0; while [ $i -lt 40 ]; do echo "tick $(cut -d" " -f1 /proc/uptime)"; '
        '[ $i = 5 ] && echo "swiftvmm-qmp: stop-cont"; sleep 0.1; i=$((i+1)); done',
        'echo "swiftvmm-qmp: powerdown"',
        # The power button makes the kernel send KEY_POWER; busybox init has no handler, so the
        # guest only reports that the event arrived (the ff_pwr_btn counter), then powers off itself.
        'i=0; while [ "$(awk \'{print $1}\' /sys/firmware/acpi/interrupts/ff_pwr_btn)" = 0 ] && [ $i -lt 600 ]; '
        'do sleep 0.1; i=$((i+1)); done',
        'echo "case: pwrbtn=$(awk \'{print $1}\' /sys/firmware/acpi/interrupts/ff_pwr_btn)"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=qmp-stopcont",
    driver="qmp_driver.py",
    timeout=300,
)

GUEST_RUNS = [VMGENID, STOPCONT]


def guid_words(guid: str) -> str:
    """The GUID as the guest's devmem prints it: four little-endian 32-bit words of the guest bytes."""
    h = guid.replace("-", "")
    b = bytes.fromhex(h)
    guest = b[0:4][::-1] + b[4:6][::-1] + b[6:8][::-1] + b[8:16]
    return " ".join(f"0x{int.from_bytes(guest[i:i + 4], 'little'):08X}" for i in range(0, 16, 4))


def test_qmp_vmgenid_run_is_clean(guest):
    guest("qmp-vmgenid").assert_clean_run()


def test_qmp_guid_in_guest_memory_matches_query(guest):
    r = guest("qmp-vmgenid")
    guid = r.value("driver: guid=")
    r.check(guid is not None, "query-vm-generation-id did not answer")
    r.check((r.value("case: guid-before=") or "").split() == guid_words(guid).split(),
            f"guest memory at VGIA+40 holds {r.value('case: guid-before=')!r}, QMP says {guid} ({guid_words(guid)})")


def test_qmp_guid_change_reaches_the_guest(guest):
    r = guest("qmp-vmgenid")
    new = r.value("driver: new-guid=")
    r.check(new is not None and new != r.value("driver: guid="), f"set-vm-generation-id returned {new!r}")
    r.check((r.value("case: guid-after=") or "").split() == guid_words(new).split(),
            f"guest memory holds {r.value('case: guid-after=')!r} after the change to {new}")
    before, _, after = (r.value("case: gpe05=") or ",").partition(",")
    r.check(before.isdigit() and after.isdigit() and int(after) == int(before) + 1,
            f"/sys/firmware/acpi/interrupts/gpe05 went {before!r} -> {after!r}, expected +1")
    r.check(r.value("case: reseeds=") == "1", f"the guest logged {r.value('case: reseeds=')!r} reseed lines, expected exactly 1")
    r.check("VM_GENERATION_ID_CHANGED" in (r.value("driver: events=") or ""), "no VM_GENERATION_ID_CHANGED event")


def test_qmp_stop_pauses_and_cont_resumes(guest):
    r = guest("qmp-stopcont")
    r.check(r.value("driver: status-while-stopped=") == "paused,running=False",
            f"query-status while stopped: {r.value('driver: status-while-stopped=')!r}")
    r.check(r.value("driver: status-after-cont=") == "running", f"after cont: {r.value('driver: status-after-cont=')!r}")
    ticks = [float(line.split()[1]) for line in r.lines if line.startswith("tick ")]
    r.check(len(ticks) == 40, f"{len(ticks)} ticks")
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    r.check(max(gaps) >= 0.9, f"no pause visible in the ticks (largest gap {max(gaps):.2f} s)")
    events = (r.value("driver: events=") or "").split(",")
    r.check("STOP" in events and "RESUME" in events, f"events {events}")


def test_qmp_powerdown_presses_the_power_button(guest):
    r = guest("qmp-stopcont")
    r.check(r.index_of("driver: powerdown-sent") >= 0, "system_powerdown failed")
    r.check(r.value("case: pwrbtn=") not in (None, "0"), f"the guest saw no power-button event: {r.value('case: pwrbtn=')!r}")
    r.check("POWERDOWN" in (r.value("driver: events=") or ""), "no POWERDOWN event")
    r.check("SHUTDOWN" in (r.value("driver: events=") or ""), "no SHUTDOWN event when the guest powered off")
