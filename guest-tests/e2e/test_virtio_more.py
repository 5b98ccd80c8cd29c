"""virtio-net, virtio-console and a snapshot taken during a disk write, end to end (issue 17), plus
the `--net` bad-input cases.

Guest cases (one driver each):
  virtio-net           virtio_net_driver.py makes a tap device in the test host (10.0.2.1/24, up) and
                       gives the VMM a virtio-net device on it (swiftvmm `--net tap=NAME`; QEMU
                       `-netdev tap -device virtio-net-device,id=net0`) and a QMP socket. The guest
                       (10.0.2.15/24 on eth0) pings the host; its MAC is query-rx-filter's main-mac;
                       after `set_link up=false` its carrier drops and a ping fails, after
                       `set_link up=true` the carrier is back and a ping succeeds; frames crossed the
                       tap both ways.
  virtio-console       virtio_console_driver.py: swiftvmm `--console virtio` (QEMU: a virtconsole
                       sharing a muxed stdio with the serial port). The guest writes a line to
                       /dev/hvc0, which must reach the VMM's standard output (once); the driver then
                       writes a line to the VMM's standard input, which the guest must read from
                       /dev/hvc0 (and not from its serial console).
  virtio-blk-snapshot  virtio_snapshot_driver.py (swiftvmm only): the guest writes a 48 MiB pattern
                       with dd oflag=direct, 1 MiB at a time; after chunk 10, snapshot-create
                       {"copy-drives": true} while the dd runs, quit; a restore without --drive and one
                       with an image of another size are refused; a restore on a copy of the snapshot's
                       drive0.img completes the dd and reads the whole pattern back; the images are
                       checked block by block (the copy holds the whole pattern, drive0.img is the disk
                       at the pause, neither the original image nor drive0.img is touched by the clone);
                       query-block names the images; `snapshot verify` passes.
The bad-input tests at the end run the built swiftvmm on this machine (no guest), as test_virtio.py's.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from guestrun import MARKER_INIT, MARKER_POWEROFF, GuestRun
from test_virtio import (CLI_CMDLINE, CLI_TIMEOUT, SH_HELPERS, assert_one_error_line, case_value, cli,  # noqa: F401
                         cli_kernel, vdevs)
from virtio_snapshot_driver import CHUNK_LINE, CHUNKS, MIB, SEQ_LAST, SMALL_MIB, STRIDE, TRIGGER, pattern

VIRTIO_NET, VIRTIO_CONSOLE = "0x0001", "0x0003"
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"
HVC_MARKER = "hvc-marker-42 from the guest"  # the guest computes the 42: its script text never holds it
HVC_INPUT = "hello hvc0, this is the host 4711"

NET = GuestRun(
    name="virtio-net",
    case_script="\n".join([
        SH_HELPERS,
        "modload virtio_mmio virtio_net || echo 'case: modload failed'",
        "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done",
        "vdevs",
        "n=/sys/class/net/eth0",
        'echo "case: eth0 address=$(cat $n/address 2>/dev/null)"',
        "ip link set eth0 up || echo 'case: ip link set eth0 up failed'",
        f"ip addr add {GUEST_IP}/24 dev eth0 || echo 'case: ip addr add failed'",
        # carrier WANT: waits up to 20 s for /sys/class/net/eth0/carrier to read WANT, prints what it reads.
        'carrier() { i=0; while [ "$(cat $n/carrier 2>/dev/null)" != "$1" ] && [ $i -lt 200 ]; do sleep 0.1; '
        "i=$((i + 1)); done; cat $n/carrier 2>/dev/null; }",
        f'pinged() {{ out=$(ping -c $2 -W 2 {HOST_IP} 2>&1); st=$?; '
        'echo "case: ping-$1 exit=$st $(echo "$out" | grep "packets transmitted")"; }',
        'echo "case: carrier-start=$(carrier 1)"',
        "pinged first 3",
        'echo "swiftvmm-net: query-mac"',
        'echo "swiftvmm-net: link-down"',
        'echo "case: carrier-down=$(carrier 0)"',
        "pinged down 2",
        'echo "swiftvmm-net: link-up"',
        'echo "case: carrier-up=$(carrier 1)"',
        "pinged again 3",
        'echo "case: done"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=virtio-net",
    driver="virtio_net_driver.py",
    driver_args=("--host-ip", f"{HOST_IP}/24", "--"),
    timeout=300,
)

CONSOLE = GuestRun(
    name="virtio-console",
    case_script="\n".join([
        SH_HELPERS,
        "modload virtio_mmio virtio_console || echo 'case: modload failed'",
        "i=0; while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done",
        "vdevs",
        'echo "case: hvc0=$([ -c /dev/hvc0 ] && echo present || echo missing)"',
        # Open hvc0 before the marker goes out (the host's line must find a reader's tty), without
        # echo (the host's line must come back only through the serial console).
        "exec 3<>/dev/hvc0 || echo 'case: cannot open /dev/hvc0'",
        'stty -echo <&3; echo "case: stty-echo-off=$?"',
        "sleep 1",  # the serial console's lines are out before hvc0's line
        "n=$((6 * 7))",
        f'echo "{HVC_MARKER.replace("42", "$n")}" >&3',
        'if read -r -t 60 line <&3; then echo "case: hvc-in=$line"; else echo "case: hvc-in-timeout"; fi',
        "exec 3<&-",
        # The serial console (the script's standard input) got nothing of it.
        'if read -r -t 2 other; then echo "case: ttyS0-in=$other"; else echo "case: ttyS0-in-none"; fi',
        'echo "case: done"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=virtio-console",
    driver="virtio_console_driver.py",
    driver_args=("--marker", HVC_MARKER, "--send", HVC_INPUT, "--"),
    timeout=300,
)

SNAPSHOT = GuestRun(
    name="virtio-blk-snapshot",
    case_script="\n".join([
        SH_HELPERS,
        "modload virtio_mmio virtio_blk || echo 'case: modload failed'",
        "wait_dev /dev/vda",
        f"seq 1 {SEQ_LAST} > /tmp/base",
        'echo "case: vda size=$(cat /sys/block/vda/size) base=$(wc -c < /tmp/base)"',
        # chunk N: 1 MiB of the base from byte N*STRIDE, written at MiB N with O_DIRECT.
        "i=0",
        f"while [ $i -lt {CHUNKS} ]; do",
        f"  err=$(dd if=/tmp/base of=/dev/vda bs={MIB} count=1 skip=$((i * {STRIDE})) seek=$i iflag=skip_bytes "
        "oflag=direct conv=notrunc 2>&1 >/dev/null)",
        "  st=$?",
        '  [ $st = 0 ] || { echo "case: chunk $i failed exit=$st $(echo "$err" | grep -v records | head -n 1)"; break; }',
        '  echo "case: chunk $i written"',
        "  i=$((i + 1))",
        "done",
        'echo "case: dd done chunks=$i"',
        f"got=$(dd if=/dev/vda bs={MIB} count={CHUNKS} iflag=direct 2>/dev/null | sha)",
        f"want=$(j=0; while [ $j -lt {CHUNKS} ]; do dd if=/tmp/base bs={MIB} count=1 skip=$((j * {STRIDE})) "
        "iflag=skip_bytes 2>/dev/null; j=$((j + 1)); done | sha)",
        'echo "case: readback sha=$got expected=$want match=$([ -n "$got" ] && [ "$got" = "$want" ] && echo yes || echo no)"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=virtio-blk-snapshot",
    driver="virtio_snapshot_driver.py",
    timeout=600,
)

GUEST_RUNS = [NET, CONSOLE, SNAPSHOT]

PANIC_WORDS = ("Kernel panic", "Oops", "BUG:", "Call Trace")


def summary(r) -> dict:
    if not r.artifact("summary.json").exists():
        r.fail("the driver left no summary.json")
    return r.artifact_json("summary.json")


def assert_no_panic(r) -> None:
    for bad in PANIC_WORDS:
        r.check(r.index_of(bad) < 0, f"the console shows {bad!r}")


def bound_device(r, device_id: str, driver: str) -> dict:
    """The one virtio device of that ID, bound to that driver on an ACPI LNRO0005 virtio-mmio device."""
    devs = [d for d in vdevs(r) if d["id"] == device_id]
    r.check(len(devs) == 1 and devs[0]["driver"] == driver,
            f"expected one virtio device {device_id} bound to {driver}: {vdevs(r)}")
    r.check(re.fullmatch(r"LNRO0005:[0-9A-Fa-f]{2}", devs[0]["parent"]) is not None,
            f"the {driver} device does not sit on an ACPI LNRO0005 device: {devs[0]}")
    return devs[0]


# -- virtio-net -----------------------------------------------------------------------------------

PING = re.compile(r"^exit=(\d+) (\d+) packets transmitted, (\d+) packets received")


def ping_result(r, label: str) -> tuple[int, int, int]:
    """(exit status, transmitted, received) of the guest's `case: ping-LABEL ...` line."""
    v = r.value(f"case: ping-{label} ")
    r.check(v is not None, f"the guest printed no 'case: ping-{label}' line")
    m = PING.match(v)
    if not m:
        st = re.match(r"exit=(\d+)", v)
        r.check(st is not None, f"cannot read the ping-{label} line: {v!r}")
        return int(st.group(1)), 0, 0  # no statistics line (e.g. ping could not send at all)
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_virtio_net_run_is_clean(guest):
    r = guest("virtio-net")
    r.assert_clean_run()
    for bad in ("case: modload failed", "case: ip link set eth0 up failed", "case: ip addr add failed", "driver: error="):
        r.check(r.index_of(bad) < 0, f"the console shows {bad!r}: {r.lines[r.index_of(bad)]!r}")
    r.check(r.index_of("case: done") >= 0, "the case script did not get to its end")
    assert_no_panic(r)
    s = summary(r)
    r.check(s.get("qmp_connected") is True, f"the driver did not connect to the VMM's QMP socket: {s}")
    r.check(s.get("tap_deleted") is True, f"the driver could not delete its tap device {s.get('tap')}")


def test_virtio_net_binds_over_acpi(guest):
    r = guest("virtio-net")
    r.assert_printed_good_lines()
    bound_device(r, VIRTIO_NET, "virtio_net")


def test_virtio_net_guest_pings_the_host_over_the_tap(guest):
    r = guest("virtio-net")
    r.assert_printed_good_lines()
    r.check(case_value(r, "carrier-start") == "1", f"eth0's carrier is {case_value(r, 'carrier-start')!r} after "
                                                   "`ip link set eth0 up` (20 s), expected 1")
    st, sent, got = ping_result(r, "first")
    r.check(st == 0 and got >= 1, f"ping -c 3 {HOST_IP} from the guest: exit {st}, {sent} sent, {got} received")
    stats = summary(r).get("tap_stats") or {}
    r.check((stats.get("rx_packets") or 0) >= 3 and (stats.get("tx_packets") or 0) >= 3,
            f"the tap's statistics do not show the pings both ways (rx: from the guest, tx: to it): {stats}")


def test_virtio_net_mac_is_query_rx_filter_main_mac(guest):
    r = guest("virtio-net")
    r.assert_printed_good_lines()
    mac = case_value(r, "eth0 address")
    r.check(re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) is not None, f"eth0's address reads {mac!r}")
    main = r.value("driver: main-mac=")
    r.check(main is not None, "the driver printed no 'driver: main-mac=' (query-rx-filter failed?)")
    r.check(main.strip().lower() == mac, f"query-rx-filter's main-mac is {main!r}, the guest's eth0 has {mac!r}")
    r.check(mac.startswith("52:54:00:") and int(mac[:2], 16) & 1 == 0,
            f"the default MAC {mac} is not a unicast 52:54:00:xx:xx:xx address")


def test_virtio_net_set_link_down_and_up(guest):
    r = guest("virtio-net")
    r.assert_printed_good_lines()
    for up in ("false", "true"):
        r.check(r.index_of(f"driver: set_link up={up} done") >= 0, f"set_link up={up} did not succeed over QMP")
    r.assert_in_order("case: carrier-start=", "case: carrier-down=", "case: ping-down ", "case: carrier-up=",
                      "case: ping-again ")
    r.check(case_value(r, "carrier-down") == "0",
            f"eth0's carrier reads {case_value(r, 'carrier-down')!r} 20 s after set_link up=false, expected 0")
    st, sent, got = ping_result(r, "down")
    r.check(st != 0 and got == 0, f"ping with the link down: exit {st}, {sent} sent, {got} received (expected none)")
    r.check(case_value(r, "carrier-up") == "1",
            f"eth0's carrier reads {case_value(r, 'carrier-up')!r} 20 s after set_link up=true, expected 1")
    st, sent, got = ping_result(r, "again")
    r.check(st == 0 and got >= 1, f"ping with the link up again: exit {st}, {sent} sent, {got} received")


# -- virtio-console -------------------------------------------------------------------------------

def test_virtio_console_run_is_clean(guest):
    r = guest("virtio-console")
    r.assert_clean_run()
    for bad in ("case: modload failed", "case: cannot open /dev/hvc0"):
        r.check(r.index_of(bad) < 0, f"the console shows {bad!r}")
    r.check(r.index_of("case: done") >= 0, "the case script did not get to its end")
    assert_no_panic(r)


def test_virtio_console_binds_over_acpi(guest):
    r = guest("virtio-console")
    r.assert_printed_good_lines()
    bound_device(r, VIRTIO_CONSOLE, "virtio_console")
    r.check(case_value(r, "hvc0") == "present", "/dev/hvc0 did not appear")


def test_virtio_console_guest_output_reaches_stdout(guest):
    """The line the guest writes to /dev/hvc0 (and nowhere else) is on the VMM's standard output, once."""
    r = guest("virtio-console")
    r.assert_printed_good_lines()
    hits = [line for line in r.lines if HVC_MARKER in line]
    r.check(len(hits) == 1, f"the guest's hvc0 line {HVC_MARKER!r} is on standard output {len(hits)} times: {hits}")
    r.check(hits[0].strip() == HVC_MARKER, f"the hvc0 line arrived as {hits[0]!r}")
    r.check(summary(r).get("marker_seen") is True, "the driver did not see the hvc0 line")


def test_virtio_console_host_input_reaches_the_guest(guest):
    """The line written to the VMM's standard input is what the guest reads from /dev/hvc0."""
    r = guest("virtio-console")
    r.assert_printed_good_lines()
    r.check(summary(r).get("sent") is True, f"the driver did not write its line to the VMM: {summary(r)}")
    r.check(r.index_of("case: hvc-in-timeout") < 0, "the guest read nothing from /dev/hvc0 within 60 s")
    got = r.value("case: hvc-in=")
    r.check(got == HVC_INPUT, f"the guest read {got!r} from /dev/hvc0, the host wrote {HVC_INPUT!r}")
    r.check(r.index_of("case: ttyS0-in-none") >= 0,
            f"the host's input reached the serial console too: {r.value('case: ttyS0-in=')!r}")


# -- virtio-blk-snapshot --------------------------------------------------------------------------

PATTERN = None


def full_pattern() -> bytes:
    global PATTERN
    if PATTERN is None:
        PATTERN = pattern()
    return PATTERN


class Scenario:
    def __init__(self, guest):
        self.r = guest("virtio-blk-snapshot")
        self.s = summary(self.r)

    def need(self, *keys: str):
        missing = [k for k in keys if k not in self.s]
        if missing:
            self.r.fail(f"the scenario did not get that far (stopped at step {self.s.get('step')!r}: "
                        f"{self.s.get('error')!r}; missing {missing})")
        return self.s[keys[0]] if len(keys) == 1 else [self.s[k] for k in keys]

    def part(self, name: str):
        p = self.r.part(name)
        if not p.ran:
            self.r.fail(f"the driver left no console of {name} (stopped at step {self.s.get('step')!r})")
        return p

    def chunks(self, name: str) -> list[int]:
        """The chunk numbers of the whole `case: chunk N written` lines on a process's console."""
        return [int(m.group(1)) for line in self.part(name).lines if (m := CHUNK_LINE.match(line))]

    def first_clone_chunk(self) -> int:
        c = self.chunks("clone")
        if not c:
            self.part("clone").fail("the clone printed no whole 'case: chunk N written' line")
        return c[0]


@pytest.fixture
def vsnap(guest) -> Scenario:
    return Scenario(guest)


def test_vsnap_scenario_runs_to_the_end(vsnap):
    r = vsnap.r
    r.check(r.index_of("driver: scenario complete") >= 0,
            f"the driver stopped at step {vsnap.s.get('step')!r}: {vsnap.s.get('error')!r}")
    r.assert_exit(0)
    orig = vsnap.part("orig")
    orig.check(orig.status == 0, f"the original exited {orig.status} after QMP quit, expected 0")
    orig.check(orig.index_of(MARKER_INIT) >= 0, "the original guest did not reach /init")
    clone = vsnap.part("clone")
    clone.check(clone.status == 0, f"the clone exited {clone.status} after its guest's power-off, expected 0")
    for p in (orig, clone):
        assert_no_panic(p)


def test_vsnap_snapshot_taken_while_the_dd_ran(vsnap):
    """snapshot-create came after chunk TRIGGER, the guest (paused for the save) went on after it, and
    the clone took the dd over at the next chunk: the original's chunks 0..K, the clone's K'..47 with
    K' > K, each run consecutive."""
    at_request, at_reply, status = vsnap.need("chunks_at_request", "chunks_at_reply", "orig_status_after_snapshot")
    r = vsnap.r
    k = max(at_request)
    r.check(at_request == list(range(k + 1)), f"the original's chunks before the snapshot: {at_request}")
    r.check(TRIGGER <= k < CHUNKS - 1, f"the snapshot was requested after chunk {k}: not during the dd")
    r.check(status == "running", f"query-status after snapshot-create (running guest): {status!r}")
    clone_chunks = vsnap.chunks("clone")
    first = vsnap.first_clone_chunk()
    vsnap.part("clone").check(clone_chunks == list(range(first, CHUNKS)),
                              f"the clone's chunks are not consecutive up to {CHUNKS - 1}: {clone_chunks}")
    vsnap.part("clone").check(first > k, f"the clone wrote chunk {first} again: the original had printed up to {k} "
                                         "before it asked for the snapshot")
    orig_chunks = vsnap.chunks("orig")
    vsnap.part("orig").check(orig_chunks[:first - 1] == list(range(first - 1)),
                             f"the original's chunks do not run from 0 to {first - 2}: {orig_chunks}")


def test_vsnap_restored_guest_completes_dd_and_reads_the_pattern(vsnap):
    clone = vsnap.part("clone")
    clone.assert_in_order("case: dd done chunks=", "case: readback ", "swiftvmm-guest: case exit=", MARKER_POWEROFF)
    clone.check(clone.value("case: dd done chunks=") == str(CHUNKS),
                f"the clone's dd stopped after {clone.value('case: dd done chunks=')} chunks "
                f"({[line for line in clone.lines if 'failed' in line]})")
    kv = dict(item.split("=", 1) for item in clone.value("case: readback ").split() if "=" in item)
    want = hashlib.sha256(full_pattern()).hexdigest()
    clone.check(kv.get("expected") == want, f"the guest computed {kv.get('expected')} for the pattern, the host {want}")
    clone.check(kv.get("sha") == want and kv.get("match") == "yes",
                f"the guest read back sha256 {kv.get('sha')} from /dev/vda, the pattern's is {want}")
    clone.check(clone.value("swiftvmm-guest: case exit=") == "0", "the case script failed in the clone")


def test_vsnap_clone_image_holds_the_whole_pattern(vsnap):
    img = vsnap.need("clone_image")
    r = vsnap.r
    r.check(img["size"] == CHUNKS * MIB, f"the clone's image is {img['size']} bytes, expected {CHUNKS * MIB}")
    bad = {c: m for c, m in enumerate(img["chunks"]) if m != "p"}
    r.check(not bad, f"the clone's image ({img['path']}) differs from the pattern in chunks {sorted(bad)} "
                     f"(p pattern, z zeros, x other per 4 KiB block): {dict(list(bad.items())[:3])}")
    r.check(img["sha256"] == hashlib.sha256(full_pattern()).hexdigest(), "the clone's image's sha256 is not the pattern's")


def test_vsnap_snapshot_drive_is_the_disk_at_the_pause(vsnap):
    """drive0.img: the chunks the guest had finished before the pause hold the pattern, the one it was
    writing holds pattern or zeros block by block, the later ones zeros."""
    img = vsnap.need("snap_drive_after_save")
    first = vsnap.first_clone_chunk()
    r = vsnap.r
    r.check(img["size"] == CHUNKS * MIB, f"drive0.img is {img['size']} bytes, expected {CHUNKS * MIB}")
    for c, m in enumerate(img["chunks"]):
        if c < first:
            r.check(m == "p", f"drive0.img chunk {c} (the guest finished it before the pause) is {m!r}, not the pattern")
        elif c == first:
            r.check(set(m) <= {"p", "z"}, f"drive0.img chunk {c} (in flight at the pause) has foreign blocks: {m!r}")
        else:
            r.check(m == "z", f"drive0.img chunk {c} (written after the pause) is {m!r}, expected zeros")


def test_vsnap_clone_touches_neither_the_original_image_nor_the_snapshot(vsnap):
    before, after, at_request = vsnap.need("disk_after_orig", "disk_after_clone", "chunks_at_request")
    r = vsnap.r
    k = max(at_request)
    bad = [c for c in range(k + 1) if before["chunks"][c] != "p"]
    r.check(not bad, f"the original image lacks chunks {bad} that the guest had written before the snapshot")
    r.check((after["sha256"], after["mtime_ns"]) == (before["sha256"], before["mtime_ns"]),
            "the original image changed while the clone ran (it must write only to its copy)")
    save, later = vsnap.need("snap_drive_after_save", "snap_drive_after_clone")
    r.check((later["sha256"], later["mtime_ns"]) == (save["sha256"], save["mtime_ns"]),
            "the snapshot's drive0.img changed while the clone ran")


def test_vsnap_query_block_names_each_vms_image(vsnap):
    orig_qb, clone_qb, disk, copy = vsnap.need("orig_query_block", "clone_query_block", "disk", "clone_image_path")
    r = vsnap.r
    for what, qb, path in (("original", orig_qb, disk), ("clone", clone_qb, copy)):
        r.check(isinstance(qb, list) and len(qb) == 1, f"query-block on the {what}: {qb!r}")
        d = qb[0]
        ins = d.get("inserted") or {}
        r.check(d.get("device") == "drive0", f"query-block on the {what}: device {d.get('device')!r}, expected drive0")
        r.check(ins.get("file") == path, f"query-block on the {what} names {ins.get('file')!r}, expected {path}")
        r.check(ins.get("ro") is False, f"query-block on the {what}: ro is {ins.get('ro')!r}")
        size = (ins.get("image") or {}).get("virtual-size")
        r.check(size == CHUNKS * MIB, f"query-block on the {what}: virtual-size {size!r}, expected {CHUNKS * MIB}")


def test_vsnap_snapshot_files_and_verify(vsnap):
    ret, usage, verify = vsnap.need("snapshot_return", "snapshot_usage", "verify_status")
    r = vsnap.r
    r.check(isinstance(ret, dict) and ret.get("path", "").endswith("/snap"), f"snapshot-create returned {ret!r}")
    files = usage["files"]
    r.check({"state.bin", "memory.bin", "drive0.img"} <= set(files), f"the snapshot holds {sorted(files)}")
    r.check(files["drive0.img"]["size"] == CHUNKS * MIB, f"drive0.img: {files['drive0.img']}")
    r.check(verify == 0, f"`swiftvmm snapshot verify` exited {verify}: {vsnap.r.part('verify').output.strip()[-500:]!r}")


@pytest.mark.parametrize("name,needle", [("restore_no_drive", "--drive"), ("restore_small", "")], ids=["no-drive", "small-image"])
def test_vsnap_restore_refuses_missing_or_mismatched_drive(vsnap, name, needle):
    res = vsnap.need(name)
    err = res["stderr"]
    what = f"`{' '.join(res['argv'])}`: status {res['status']!r}, stderr {err!r}, stdout {res['stdout'][:300]!r}"
    r = vsnap.r
    r.check(res["status"] == 1, f"{what}: expected exit status 1")
    r.check(res["stdout"] == "", f"{what}: something on stdout")
    r.check(err.endswith("\n") and err.count("\n") == 1 and err.startswith("swiftvmm: error: "),
            f"{what}: not one `swiftvmm: error: ...` line")
    if needle:
        r.check(needle in err, f"{what}: the error does not mention {needle}")
    else:
        r.check(re.search(r"size|bytes|MiB", err, re.IGNORECASE) is not None,
                f"{what}: the error does not say that the size ({SMALL_MIB} MiB vs {CHUNKS} MiB) is wrong")


# -- bad input (swiftvmm on this machine, no guest) ----------------------------------------------

def test_virtio_net_bad_tap_missing(cli):
    p = cli.run("--net", "tap=doesnotexist0")
    assert_one_error_line(p, "doesnotexist0", pattern=r"no tap|does not exist|no such")
    assert not os.path.exists("/sys/class/net/doesnotexist0"), "swiftvmm created the tap device doesnotexist0"


def test_virtio_net_bad_not_a_tap(cli):
    p = cli.run("--net", "tap=lo")  # an interface, but not a tap
    assert_one_error_line(p, "not a tap", pattern=r"\blo\b")


def test_virtio_net_bad_unknown_option(cli):
    p = cli.run("--net", "bogus=1")
    assert_one_error_line(p, "bogus", pattern=r"unknown")


def test_virtio_net_bad_tap_and_fd(cli):
    p = cli.run("--net", "tap=x,fd=3")
    assert_one_error_line(p, "tap=", "fd=", pattern=r"not both|one of")


def test_virtio_net_bad_multicast_mac(cli):
    p = cli.run("--net", "tap=x,mac=01:00:00:00:00:01")
    assert_one_error_line(p, "01:00:00:00:00:01", pattern=r"multicast")


def test_virtio_net_bad_malformed_mac(cli):
    p = cli.run("--net", "tap=x,mac=52:54:00:zz:00:01")
    assert_one_error_line(p, "52:54:00:zz:00:01", pattern=r"hex|mac")


def test_virtio_net_bad_fd_set_not_a_tap(cli):
    """`--net fd=N` whose fd set holds a regular file, not a tap descriptor."""
    f = cli.image("not-a-tap.img")
    fd = os.open(f, os.O_RDWR)
    try:
        argv = [cli.binary, "run", "--kernel", cli.kernel, "--cmdline", CLI_CMDLINE,
                "--add-fd", f"fd={fd},set=5", "--net", "fd=5"]
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=CLI_TIMEOUT, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert_one_error_line(p, pattern=r"not .*tap")


TUNSETIFF, IFF_TUN, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0001, 0x0002, 0x1000


class TransientTun:
    """A tun or tap device that lives while this object's descriptor is open (not persistent)."""

    def __init__(self, prefix: str, flags: int):
        self.name = f"{prefix}{os.getpid() % 100000}"
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            pytest.skip(f"cannot open /dev/net/tun here: {e}")
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", self.name.encode(), flags | IFF_NO_PI))
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EPERM, errno.EACCES):
                pytest.skip(f"cannot create a tun/tap device here: {e}")
            raise

    def __enter__(self) -> "TransientTun":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
        assert not Path(f"/sys/class/net/{self.name}").exists(), f"{self.name} outlived this test's descriptor"


def test_virtio_net_bad_tap_in_use(cli):
    """A tap that another process holds."""
    with TransientTun("svmmbusy", IFF_TAP) as t:
        p = cli.run("--net", f"tap={t.name}")
        assert_one_error_line(p, t.name, pattern=r"in use|busy")


def test_virtio_net_bad_tun_not_tap(cli):
    """A tun device (layer 3) where a tap is needed."""
    with TransientTun("svmmtun", IFF_TUN) as t:
        p = cli.run("--net", f"tap={t.name}")
        assert_one_error_line(p, t.name, pattern=r"\btun\b")
