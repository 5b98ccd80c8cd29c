"""The QMP control socket driven by the real qemu.qmp client (qmp_driver.py) while a Linux guest runs:
the VM generation ID change end to end (guest memory, GPE 5, the guest kernel's reseed, the guest's
acknowledgement as VM_GENERATION_ID_ACKNOWLEDGED), stop/cont, and system_powerdown through the ACPI
power button."""

import json

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
        # The guest's ACPI cleared GPE 5 as it took the SCI: the change is acknowledged, once.
        'echo "swiftvmm-qmp: query-ack"',
        # A second change: acknowledged once more, with its own GUID.
        f'c1=$({GPE5})',
        'echo "swiftvmm-qmp: change-guid"',
        f'i=0; c=$c1; while [ "$c" = "$c1" ] && [ $i -lt 600 ]; do sleep 0.1; c=$({GPE5}); i=$((i+1)); done',
        "sleep 1",
        'echo "case: gpe05-second=$c1,$c"',
        'echo "swiftvmm-qmp: query-ack"',
        "sleep 1",  # no late second event for the same change
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

# A guest whose ACPI never handles GPE 5 (acpi_mask_gpe masks it: GPE0_EN bit 5 stays clear, the status
# bit is not cleared while it runs): the change is written to guest memory and stays pending (until the
# power-off, when ACPICA clears every GPE status bit).
VMGENID_UNHANDLED = GuestRun(
    name="qmp-vmgenid-unhandled",
    case_script="\n".join([
        GUID_WORDS,
        'echo "swiftvmm-qmp: change-guid"',
        "sleep 3",
        'echo "case: guid-after=$(guid)"',
        'echo "case: gpe05=$(cat /sys/firmware/acpi/interrupts/gpe05)"',
        'echo "swiftvmm-qmp: query-ack"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=qmp-vmgenid-unhandled acpi_mask_gpe=0x05",
    driver="qmp_driver.py",
    timeout=300,
)

GUEST_RUNS = [VMGENID, STOPCONT, VMGENID_UNHANDLED]


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


def events_named(r, name: str) -> list[dict]:
    """The data of every event `name` the driver received, in order."""
    prefix = f"driver: event {name} "
    return [json.loads(line[len(prefix):]) for line in r.lines if line.startswith(prefix)]


def acks(r) -> list[dict]:
    """Every query-ack answer, in order."""
    return [json.loads(line[len("driver: ack="):]) for line in r.lines if line.startswith("driver: ack=")]


def test_qmp_guid_change_is_acknowledged_once_per_change(guest):
    r = guest("qmp-vmgenid")
    new = [line[len("driver: new-guid="):] for line in r.lines if line.startswith("driver: new-guid=")]
    r.check(len(new) == 2, f"two set-vm-generation-id replies expected, got {new}")
    before, _, after = (r.value("case: gpe05-second=") or ",").partition(",")
    r.check(before.isdigit() and after.isdigit() and int(after) == int(before) + 1,
            f"second change: gpe05 went {before!r} -> {after!r}, expected +1")
    acked = events_named(r, "VM_GENERATION_ID_ACKNOWLEDGED")
    r.check([e.get("guid") for e in acked] == new,
            f"VM_GENERATION_ID_ACKNOWLEDGED exactly once per change, in order: {acked} for changes {new}")
    for e in acked:
        r.check(isinstance(e.get("latency-ms"), (int, float)) and 0 <= e["latency-ms"] < 10_000,
                f"latency-ms {e.get('latency-ms')!r}")
    names = (r.value("driver: events=") or "").split(",")
    changed = [i for i, n in enumerate(names) if n == "VM_GENERATION_ID_CHANGED"]
    ackd = [i for i, n in enumerate(names) if n == "VM_GENERATION_ID_ACKNOWLEDGED"]
    r.check(len(changed) == 2 and len(ackd) == 2 and changed[0] < ackd[0] < changed[1] < ackd[1],
            f"each acknowledgement follows its change: {names}")
    answers = acks(r)
    r.check(len(answers) == 2, f"two query-ack answers expected: {answers}")
    for a, e in zip(answers, acked):
        r.check(a.get("acknowledged") is True and a.get("pending") is False and a.get("ack-latency-ms") == e.get("latency-ms"),
                f"query-vm-generation-id after the acknowledgement: {a} (event {e})")


def test_qmp_guid_change_unhandled_stays_pending(guest):
    r = guest("qmp-vmgenid-unhandled")
    r.assert_clean_run()
    new = r.value("driver: new-guid=")
    r.check(new is not None, "set-vm-generation-id failed")
    r.check((r.value("case: guid-after=") or "").split() == guid_words(new or "0" * 32).split(),
            f"guest memory holds {r.value('case: guid-after=')!r} after the change to {new}")
    names = (r.value("driver: events=") or "").split(",")
    r.check("VM_GENERATION_ID_CHANGED" in names, f"no VM_GENERATION_ID_CHANGED: {names}")
    # Still pending 3 s after the change (the guest's ACPI never took GPE 5).
    answers = acks(r)
    r.check(answers == [{"pending": True, "acknowledged": False}], f"query-vm-generation-id: {answers}")
    # On the way to S5, ACPICA clears every GPE status bit, masked ones too: that clear may still
    # come as an acknowledgement, but only then, after the query above (3 s and more after the change).
    late = [json.loads(line.split(" ", 3)[3]) for line in r.lines
            if line.startswith("driver: event VM_GENERATION_ID_ACKNOWLEDGED ")]
    r.check(all(e.get("latency-ms", 0) >= 3000 for e in late),
            f"a guest that masks GPE 5 acknowledged the change while running: {late} (gpe05: {r.value('case: gpe05=')!r})")
    r.check(len(late) <= 1, f"more than one acknowledgement of one change: {late}")


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
