"""virtio-blk and virtio-rng over virtio-mmio, described to the guest in the DSDT (LNRO0005), end to end
(issue 17): the stock kernel's virtio_mmio, virtio_blk and virtio_rng modules bind the devices, and the
guest reads and writes drive images that the host made and checks.

Each guest case is one virtio_driver.py run: the driver makes the drive images (a seeded pattern,
host_pattern) in the test host's tmpfs, adds `--drive file=IMG[,readonly=on][,id=ID]` (and `--no-rng`)
to the swiftvmm command, runs the VMM (a swiftvmm-kit VM) and copies the images into the case's
artifacts afterwards:
  virtio-blk-rng     an 8 MiB writable drive with an id (vda), a 1 MiB readonly=on drive (vdb), the
                     default rng: the devices bind over ACPI; sizes, serial, the host's pattern read
                     back; two guest writes (buffered + fsync, O_DIRECT) found in the image after the
                     power-off; vdb refuses writes and its image is unchanged; /dev/hwrng is virtio_rng.
  virtio-blk-sigkill the guest writes with fsync, says so, and sleeps: the driver SIGKILLs the VMM at
                     that line; the write is in the image.
  virtio-no-rng      --no-rng: no virtio rng device, no bytes from /dev/hwrng.
The bad-input tests at the end run the built swiftvmm on this machine (no guest): a missing image, an
unknown --drive option, a --drive without file=, an image given twice, an image that a running
swiftvmm holds: exit status 1 and one error line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from guestrun import MARKER_INIT, GuestRun
from virtio_driver import MIB, guest_pattern, host_pattern

SECTOR = 512
BLOCK = 4096
WRITE_LEN = 64 * 1024  # every guest write: 16 blocks of `seq FIRST ... | head -c 65536`

# The drives and the guest's writes: (first number of the guest's seq, 4 KiB block it is written at).
VDA = {"name": "vda", "mib": 8, "seed": 1701, "id": "e2e-vda-17"}
VDB = {"name": "vdb", "mib": 1, "seed": 1702}
WRITE_FSYNC = (1, 1283)      # buffered, dd conv=fsync: at 5 MiB + 12 KiB
WRITE_DIRECT = (500000, 130)  # dd oflag=direct: at 520 KiB
ODD_SECTOR, ODD_COUNT = 12345, 7  # a read of 7 sectors at an odd sector (O_DIRECT: one request)
DURABLE = {"name": "vda", "mib": 8, "seed": 1703}
WRITE_DURABLE = (700000, 777)
DURABLE_MARKER = "case: durable pattern written"
NORNG = {"name": "vda", "mib": 1, "seed": 1704}

SH_HELPERS = "\n".join([
    'wait_dev() { i=0; while [ ! -b "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; }',
    "sha() { sha256sum | cut -d' ' -f1; }",
    # w LABEL FIRST SEEK DD-FLAGS...: the guest pattern FIRST at 4 KiB block SEEK of /dev/vda
    "w() {",
    "  label=$1 first=$2 seek=$3; shift 3",
    f"  err=$(seq $first $((first + 100000)) | head -c {WRITE_LEN} | "
    "dd of=/dev/vda bs=4096 seek=$seek iflag=fullblock \"$@\" 2>&1 >/dev/null)",
    "  st=$?",
    '  echo "case: write-$label exit=$st $(echo "$err" | grep -v records | head -n 1)"',
    "}",
    # One line per virtio device: its virtio device ID, the driver bound to it, the platform device under it.
    "vdevs() { for d in /sys/bus/virtio/devices/*; do [ -e \"$d\" ] || continue; "
    'echo "case: vdev $(basename $d) id=$(cat $d/device) driver=$(basename "$(readlink $d/driver)") '
    'parent=$(basename "$(dirname "$(readlink -f $d)")")"; done; }',
    'rng() { r=/sys/class/misc/hw_random; echo "case: rng current=$(cat $r/rng_current 2>/dev/null)"; '
    'echo "case: rng bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"; }',
])


def _blocks(d: dict) -> int:
    return d["mib"] * MIB // BLOCK


BASIC = GuestRun(
    name="virtio-blk-rng",
    case_script="\n".join([
        SH_HELPERS,
        "modload virtio_mmio virtio_blk virtio_rng || echo 'case: modload failed'",
        "wait_dev /dev/vda; wait_dev /dev/vdb",
        "echo \"case: mmio=$(ls /sys/bus/platform/drivers/virtio-mmio | grep : | tr '\\n' ' ')\"",
        "vdevs",
        'for b in vda vdb; do echo "case: $b size=$(cat /sys/block/$b/size 2>/dev/null) ro=$(cat /sys/block/$b/ro 2>/dev/null)"; done',
        'echo "case: vda serial=$(cat /sys/block/vda/serial 2>/dev/null)"',
        # The host's pattern: the whole drive, a small O_DIRECT read at an odd sector, the last block.
        'echo "case: vda sha-all=$(sha < /dev/vda)"',
        f'echo "case: vda sha-odd=$(dd if=/dev/vda bs={SECTOR} skip={ODD_SECTOR} count={ODD_COUNT} iflag=direct 2>/dev/null | sha)"',
        f'echo "case: vda sha-last=$(dd if=/dev/vda bs={BLOCK} skip={_blocks(VDA) - 1} count=1 iflag=direct 2>/dev/null | sha)"',
        # The guest's writes, then read back from the device (O_DIRECT: not the guest's page cache).
        f"w fsync {WRITE_FSYNC[0]} {WRITE_FSYNC[1]} conv=fsync",
        f"w direct {WRITE_DIRECT[0]} {WRITE_DIRECT[1]} oflag=direct",
        "sync",
        *[f'echo "case: vda readback-{label}=$(dd if=/dev/vda bs={BLOCK} skip={seek} count={WRITE_LEN // BLOCK} '
          f'iflag=direct 2>/dev/null | sha)"'
          for label, (_, seek) in (("fsync", WRITE_FSYNC), ("direct", WRITE_DIRECT))],
        # The read-only drive: an O_DIRECT write and a buffered write + fsync both fail; content unchanged.
        'echo "case: vdb sha-before=$(sha < /dev/vdb)"',
        "for how in oflag=direct conv=fsync; do",
        "  err=$(seq 1 2000 | head -c 4096 | dd of=/dev/vdb bs=4096 seek=3 iflag=fullblock $how 2>&1 >/dev/null)",
        "  st=$?",
        '  echo "case: vdb write-${how%%=*} exit=$st $(echo "$err" | grep -v records | head -n 1)"',
        "done",
        'echo "case: vdb sha-after=$(dd if=/dev/vdb bs=65536 iflag=direct 2>/dev/null | sha)"',
        "rng",
        "for i in 1 2; do echo \"case: rng hex$i=$(dd if=/dev/hwrng bs=32 count=1 iflag=fullblock 2>/dev/null "
        "| od -An -tx1 | tr -d ' \\n')\"; done",
        # Complaints of the drivers (vdb's refused writes aside).
        "dmesg | grep -iE 'virtio|vd[a-z]|hwrng|hw_random' | grep -iE 'error|fail|warn|bug|unable|invalid|timeout' "
        "| grep -v 'dev vdb' | head -n 5 | sed 's/^/case: bad-dmesg: /'",
        'echo "case: done"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=virtio-blk-rng",
    driver="virtio_driver.py",
    driver_args=("--drive", "name={name},mib={mib},seed={seed},id={id}".format(**VDA),
                 "--drive", "name={name},mib={mib},seed={seed},readonly=on".format(**VDB), "--"),
    timeout=300,
)

SIGKILL = GuestRun(
    name="virtio-blk-sigkill",
    case_script="\n".join([
        SH_HELPERS,
        "modload virtio_mmio virtio_blk || echo 'case: modload failed'",
        "wait_dev /dev/vda",
        f"w durable {WRITE_DURABLE[0]} {WRITE_DURABLE[1]} conv=fsync",
        f'[ "$st" = 0 ] && echo "{DURABLE_MARKER}"',
        "sleep 60",
        'echo "case: not killed within 60 s"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=virtio-blk-sigkill",
    driver="virtio_driver.py",
    driver_args=("--drive", "name={name},mib={mib},seed={seed}".format(**DURABLE), "--kill-on", DURABLE_MARKER, "--"),
    timeout=300,
)

NO_RNG = GuestRun(
    name="virtio-no-rng",
    case_script="\n".join([
        SH_HELPERS,
        "modload virtio_mmio virtio_blk virtio_rng || echo 'case: modload failed'",
        "wait_dev /dev/vda",
        'echo "case: rng-module=$([ -d /sys/module/virtio_rng ] && echo loaded)"',
        'echo "case: vda size=$(cat /sys/block/vda/size 2>/dev/null)"',
        "vdevs",
        "rng",
        'echo "case: done"',
    ]),
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=virtio-no-rng",
    driver="virtio_driver.py",
    driver_args=("--drive", "name={name},mib={mib},seed={seed}".format(**NORNG), "--no-rng", "--"),
    timeout=300,
)

GUEST_RUNS = [BASIC, SIGKILL, NO_RNG]

VIRTIO_BLK, VIRTIO_RNG = "0x0002", "0x0004"


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def expected_image(d: dict, *writes: tuple[int, int]) -> bytes:
    img = bytearray(host_pattern(d["seed"], d["mib"] * MIB))
    for first, seek in writes:
        img[seek * BLOCK:seek * BLOCK + WRITE_LEN] = guest_pattern(first, WRITE_LEN)
    return bytes(img)


def summary(r) -> dict:
    return r.artifact_json("summary.json")


def image_after(r, name: str) -> bytes:
    p = r.artifact(f"{name}.img")
    if not p.exists():
        s = summary(r)
        r.fail(f"the driver left no copy of {name}.img (step {s.get('step')!r}: {s.get('error')!r})")
    return p.read_bytes()


def compare_image(r, name: str, got: bytes, want: bytes, what: str) -> None:
    if got == want:
        return
    if len(got) != len(want):
        r.fail(f"{name}.img is {len(got)} bytes after the run, expected {len(want)} ({what})")
    diff = [b for b in range(len(want) // BLOCK) if got[b * BLOCK:(b + 1) * BLOCK] != want[b * BLOCK:(b + 1) * BLOCK]]
    r.fail(f"{name}.img differs from {what} in {len(diff)} 4 KiB block(s), the first ones: {diff[:12]}")


def vdevs(r) -> list[dict]:
    out = []
    for line in r.lines:
        m = re.match(r"^case: vdev (\S+) id=(\S*) driver=(\S*) parent=(\S*)$", line)
        if m:
            out.append({"dev": m.group(1), "id": m.group(2), "driver": m.group(3), "parent": m.group(4)})
    return out


def case_value(r, key: str) -> str:
    v = r.value(f"case: {key}=")
    r.check(v is not None, f"the guest printed no 'case: {key}=' line")
    return v.strip()


def write_line(r, label: str) -> tuple[int, str]:
    """(exit status, dd's first error line) of the guest's `case: LABEL exit=N ...` line."""
    for line in r.lines:
        m = re.match(rf"^case: {re.escape(label)} exit=(\d+) ?(.*)$", line)
        if m:
            return int(m.group(1)), m.group(2)
    r.fail(f"the guest printed no 'case: {label} exit=' line")
    raise AssertionError  # not reached


# -- virtio-blk-rng -------------------------------------------------------------------------------

def test_virtio_run_is_clean(guest):
    r = guest("virtio-blk-rng")
    r.assert_clean_run()
    r.check(r.index_of("case: modload failed") < 0, "modload virtio_mmio virtio_blk virtio_rng failed")
    r.check(r.index_of("case: done") >= 0, "the case script did not get to its end")
    for bad in ("Kernel panic", "Oops", "BUG:", "Call Trace"):
        r.check(r.index_of(bad) < 0, f"the console shows {bad!r}")
    bad = [line for line in r.lines if line.startswith("case: bad-dmesg: ")]
    r.check(not bad, f"the guest kernel complained about its virtio devices: {bad}")


def test_virtio_devices_bind_over_acpi(guest):
    """Two virtio-blk devices and one virtio-rng, each bound to its driver, each on a virtio-mmio
    transport that the DSDT described (an ACPI platform device LNRO0005:NN bound to virtio-mmio)."""
    r = guest("virtio-blk-rng")
    r.assert_printed_good_lines()
    devs = vdevs(r)
    mmio = case_value(r, "mmio").split()
    kinds = sorted((d["id"], d["driver"]) for d in devs)
    r.check(kinds.count((VIRTIO_BLK, "virtio_blk")) == 2 and kinds.count((VIRTIO_RNG, "virtio_rng")) == 1,
            f"expected two virtio-blk devices bound to virtio_blk and one virtio-rng bound to virtio_rng: {devs}")
    for d in devs:
        r.check(re.fullmatch(r"LNRO0005:[0-9A-Fa-f]{2}", d["parent"]) is not None,
                f"{d['dev']} does not sit on an ACPI LNRO0005 device: {d}")
        r.check(d["parent"] in mmio, f"{d['parent']} (under {d['dev']}) is not bound to virtio-mmio: {mmio}")


def test_virtio_blk_sizes_and_serial(guest):
    r = guest("virtio-blk-rng")
    r.assert_printed_good_lines()
    for d in (VDA, VDB):
        line = r.value(f"case: {d['name']} size=") or ""
        size = line.split()[0] if line else ""
        r.check(size == str(d["mib"] * MIB // SECTOR),
                f"/sys/block/{d['name']}/size is {size!r} sectors, expected {d['mib'] * MIB // SECTOR} ({d['mib']} MiB)")
    r.check(case_value(r, "vda serial") == VDA["id"],
            f"/sys/block/vda/serial is {case_value(r, 'vda serial')!r}, expected the drive's id {VDA['id']!r}")


def test_virtio_blk_guest_reads_the_host_pattern(guest):
    r = guest("virtio-blk-rng")
    r.assert_printed_good_lines()
    vda = host_pattern(VDA["seed"], VDA["mib"] * MIB)
    odd = vda[ODD_SECTOR * SECTOR:(ODD_SECTOR + ODD_COUNT) * SECTOR]
    for key, want, what in (("vda sha-odd", sha(odd), f"{ODD_COUNT} sectors at sector {ODD_SECTOR} (O_DIRECT)"),
                            ("vda sha-last", sha(vda[-BLOCK:]), "the last 4 KiB block (O_DIRECT)"),
                            ("vda sha-all", sha(vda), "the whole of /dev/vda"),
                            ("vdb sha-before", sha(host_pattern(VDB["seed"], VDB["mib"] * MIB)), "the whole of /dev/vdb")):
        r.check(case_value(r, key) == want, f"{what}: the guest read sha256 {case_value(r, key)}, the host wrote {want}")


def test_virtio_blk_guest_writes_reach_the_image(guest):
    """A buffered write with fsync and an O_DIRECT write: the guest reads both back from the device, and
    after the power-off (the VMM exited 0) the image holds them and nothing else changed."""
    r = guest("virtio-blk-rng")
    r.assert_exit(0)
    for label, (first, _) in (("fsync", WRITE_FSYNC), ("direct", WRITE_DIRECT)):
        st, err = write_line(r, f"write-{label}")
        r.check(st == 0, f"the guest's {label} write to /dev/vda failed (dd exit {st}: {err})")
        want = sha(guest_pattern(first, WRITE_LEN))
        r.check(case_value(r, f"vda readback-{label}") == want,
                f"the guest read back sha256 {case_value(r, f'vda readback-{label}')} after its {label} write, wrote {want}")
    compare_image(r, "vda", image_after(r, "vda"), expected_image(VDA, WRITE_FSYNC, WRITE_DIRECT),
                  "the host's pattern with the guest's two writes")


def test_virtio_blk_readonly_drive_refuses_writes(guest):
    r = guest("virtio-blk-rng")
    r.assert_exit(0)
    for how in ("oflag", "conv"):
        st, err = write_line(r, f"vdb write-{how}")
        r.check(st != 0, f"a write to the read-only /dev/vdb ({'O_DIRECT' if how == 'oflag' else 'buffered + fsync'}) "
                         f"succeeded in the guest")
    r.check(case_value(r, "vdb sha-after") == case_value(r, "vdb sha-before"),
            "the guest reads different content from /dev/vdb after the refused writes")
    compare_image(r, "vdb", image_after(r, "vdb"), host_pattern(VDB["seed"], VDB["mib"] * MIB),
                  "the image the host made (readonly=on)")


def test_virtio_blk_readonly_drive_is_read_only_in_the_guest(guest):
    """readonly=on offers VIRTIO_BLK_F_RO (QEMU does too): the kernel marks vdb read-only and a write
    fails before it reaches the device (EPERM), and vda stays writable."""
    r = guest("virtio-blk-rng")
    r.assert_printed_good_lines()
    ro = {b: (r.value(f"case: {b} size=") or "").partition(" ro=")[2] for b in ("vda", "vdb")}
    r.check(ro == {"vda": "0", "vdb": "1"}, f"/sys/block/*/ro: {ro}, expected vda 0 and vdb 1")
    st, err = write_line(r, "vdb write-oflag")
    r.check(st != 0 and "Operation not permitted" in err, f"the O_DIRECT write to vdb: dd exit {st}, {err!r} "
                                                          "(expected EPERM: the kernel refuses it)")


def test_virtio_rng_gives_random_bytes(guest):
    r = guest("virtio-blk-rng")
    r.assert_printed_good_lines()
    cur = case_value(r, "rng current")
    r.check(cur.startswith("virtio_rng"), f"/sys/class/misc/hw_random/rng_current is {cur!r}, not virtio_rng")
    r.check(case_value(r, "rng bytes") == "64", f"64 bytes from /dev/hwrng gave {case_value(r, 'rng bytes')!r}")
    h1, h2 = case_value(r, "rng hex1"), case_value(r, "rng hex2")
    for h in (h1, h2):
        r.check(re.fullmatch(r"[0-9a-f]{64}", h) is not None, f"32 bytes from /dev/hwrng read as {h!r}")
        r.check(h != "0" * 64, "/dev/hwrng gave 32 zero bytes")
    r.check(h1 != h2, f"two reads of /dev/hwrng gave the same 32 bytes: {h1}")


# -- virtio-blk-sigkill ---------------------------------------------------------------------------

def test_virtio_blk_fsynced_write_survives_sigkill(guest):
    r = guest("virtio-blk-sigkill")
    s = summary(r)
    r.check(r.index_of(MARKER_INIT) >= 0, "the guest did not reach /init")
    st, err = write_line(r, "write-durable")
    r.check(st == 0, f"the guest's write + fsync failed (dd exit {st}: {err})")
    r.check(s.get("killed") is True, f"the driver did not SIGKILL the VMM at {DURABLE_MARKER!r}: {s}")
    r.check(s.get("status") == -9, f"the VMM's status is {s.get('status')}, expected -9 (SIGKILL)")
    r.check(r.index_of("swiftvmm-guest: case exit=") < 0, "the case script ended before the VMM was killed")
    r.assert_exit(0)  # the driver's: it killed the VMM at the marker and copied the image
    compare_image(r, "vda", image_after(r, "vda"), expected_image(DURABLE, WRITE_DURABLE),
                  "the host's pattern with the guest's fsync'd write (the VMM was SIGKILLed after the fsync)")



# -- virtio-no-rng --------------------------------------------------------------------------------

def test_virtio_no_rng_leaves_the_rng_out(guest):
    r = guest("virtio-no-rng")
    r.assert_clean_run()
    r.check(r.index_of("case: modload failed") < 0, "modload virtio_mmio virtio_blk virtio_rng failed")
    r.check(case_value(r, "rng-module") == "loaded", "the virtio_rng module is not loaded (the check would be void)")
    devs = vdevs(r)
    r.check([(d["id"], d["driver"]) for d in devs if d["id"] == VIRTIO_BLK] == [(VIRTIO_BLK, "virtio_blk")],
            f"expected the one drive as a virtio-blk device bound to virtio_blk: {devs}")
    r.check(case_value(r, "vda size") == str(NORNG["mib"] * MIB // SECTOR), f"vda size {case_value(r, 'vda size')!r}")
    r.check(not [d for d in devs if d["id"] == VIRTIO_RNG], f"a virtio-rng device is there: {devs}")
    cur = case_value(r, "rng current")
    r.check(not cur.startswith("virtio"), f"rng_current is {cur!r}")
    r.check(case_value(r, "rng bytes") == "0", f"/dev/hwrng gave {case_value(r, 'rng bytes')} bytes without an rng")


# -- bad input (swiftvmm on this machine, no guest) ----------------------------------------------

CLI_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
CLI_TIMEOUT = 60


class Cli:
    def __init__(self, binary: str, kernel: str, tmp: Path):
        self.binary = binary
        self.kernel = kernel
        self.tmp = tmp

    def run(self, *args: str) -> subprocess.CompletedProcess:
        argv = [self.binary, "run", "--kernel", self.kernel, "--cmdline", CLI_CMDLINE, *args]
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{shlex.join(argv)} did not exit within {CLI_TIMEOUT} s (it took the drive and booted?)",
                        pytrace=False)

    def image(self, name: str, mib: int = 1, seed: int = 1799) -> Path:
        p = self.tmp / name
        p.write_bytes(host_pattern(seed, mib * MIB))
        return p

    def state(self) -> dict:
        """Every file under the directory: size, sha256, mtime (to show that nothing was written)."""
        out = {}
        for p in sorted(self.tmp.rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, sha(p.read_bytes()) if p.is_file() else None)
        return out


@pytest.fixture(scope="module")
def cli_kernel(guest_vmlinuz: Path) -> str:
    """The e2e guest's kernel (a valid bzImage: the drive, not the kernel, must be what is refused)."""
    return str(guest_vmlinuz)


@pytest.fixture
def cli(cli_kernel: str, guest_session, tmp_path: Path) -> Cli:
    d = tmp_path / "drives"
    d.mkdir()
    return Cli(guest_session.vmm, cli_kernel, d)


def assert_one_error_line(p: subprocess.CompletedProcess, *needles: str, pattern: str = "") -> str:
    """Exit status 1, nothing on stdout, exactly one line `swiftvmm: error: ...` on stderr holding every
    needle (and matching pattern, case-insensitive)."""
    err = p.stderr.decode(errors="replace")
    what = f"{shlex.join(p.args)}\n  exit {p.returncode}\n  stderr: {err!r}\n  stdout: {p.stdout[:500]!r}"
    assert p.returncode == 1, f"exit status {p.returncode}, expected 1: {what}"
    assert p.stdout == b"", f"something on stdout: {what}"
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line on stderr: {what}"
    assert err.startswith("swiftvmm: error: "), f"not `swiftvmm: error: ...`: {what}"
    for n in needles:
        assert n in err, f"the error does not name {n!r}: {what}"
    if pattern:
        assert re.search(pattern, err, re.IGNORECASE), f"the error does not say /{pattern}/: {what}"
    return err


def test_virtio_bad_drive_missing_image(cli):
    before = cli.state()
    missing = cli.tmp / "missing.img"
    p = cli.run("--drive", f"file={missing}")
    assert_one_error_line(p, str(missing), pattern=r"no such file|not found|does not exist")
    assert not missing.exists(), f"{missing} was created"
    assert cli.state() == before


def test_virtio_bad_drive_unknown_option(cli):
    img = cli.image("disk.img")
    before = cli.state()
    p = cli.run("--drive", f"file={img},bogus=1")
    assert_one_error_line(p, "bogus", pattern=r"unknown")
    assert cli.state() == before, "the image or its directory changed"


def test_virtio_bad_drive_without_file(cli):
    before = cli.state()
    p = cli.run("--drive", "readonly=on")
    assert_one_error_line(p, "file=")
    assert cli.state() == before


def test_virtio_bad_drive_same_image_twice(cli):
    img = cli.image("disk.img")
    before = cli.state()
    p = cli.run("--drive", f"file={img}", "--drive", f"file={img}")
    assert_one_error_line(p, str(img), pattern=r"lock|in use")
    assert cli.state() == before, "the image or its directory changed"


def _qmp(f, command: dict) -> dict:
    f.write(json.dumps(command).encode() + b"\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            raise EOFError(f"the QMP socket closed while waiting for the reply to {command}")
        m = json.loads(line)
        if "event" not in m:
            return m


def test_virtio_bad_drive_image_held_by_a_running_vm(cli):
    """A second swiftvmm is refused an image that a running swiftvmm has open writable, and the first
    keeps running. The first runs a guest that never touches the drive (no initrd; panic=0 hangs on
    the panic), stopped over QMP once it is up; --allow-slow-kvm lets it run where /dev/kvm is emulated."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine: no swiftvmm can run to hold the image")
    img = cli.image("disk.img")
    before = cli.state()
    sockdir = Path(tempfile.mkdtemp(prefix="swiftvmm-virtio-", dir="/tmp"))  # short: sun_path has 108 bytes
    sock = sockdir / "qmp.sock"
    errf = open(sockdir / "first.err", "w+b")
    first_argv = [cli.binary, "run", "--kernel", cli.kernel, "--cmdline", "console=ttyS0 pci=off quiet panic=0",
                  "--drive", f"file={img}", "--qmp", str(sock), "--allow-slow-kvm"]
    first = subprocess.Popen(first_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)

    def first_err() -> str:
        errf.seek(0)
        return errf.read().decode(errors="replace")

    s = None
    try:
        s = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 30
        while True:
            if first.poll() is not None:
                pytest.fail(f"the first swiftvmm exited {first.returncode} at start: {first_err()!r}\n"
                            f"  {shlex.join(first_argv)}", pytrace=False)
            try:
                s.connect(str(sock))
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the first swiftvmm made no QMP socket within 30 s: {first_err()!r}", pytrace=False)
                time.sleep(0.02)
        s.settimeout(30)
        f = s.makefile("rwb")
        f.readline()  # greeting
        _qmp(f, {"execute": "qmp_capabilities"})
        _qmp(f, {"execute": "stop"})
        status = _qmp(f, {"execute": "query-status"})  # the machine, drives included, exists
        fds = []
        for fd in os.listdir(f"/proc/{first.pid}/fd"):
            try:
                fds.append(os.readlink(f"/proc/{first.pid}/fd/{fd}"))
            except OSError:
                pass
        assert str(img.resolve()) in fds, f"the first swiftvmm ({status}) does not have {img} open: {fds}"

        p = cli.run("--drive", f"file={img}")
        assert_one_error_line(p, str(img), pattern=r"lock|in use")
        assert first.poll() is None, f"the first swiftvmm exited {first.returncode}: {first_err()!r}"
        assert cli.state() == before, "the image or its directory changed"
        _qmp(f, {"execute": "quit"})
        assert first.wait(30) == 0, f"the first swiftvmm exited {first.returncode} after quit: {first_err()!r}"
    finally:
        if s is not None:
            s.close()
        if first.poll() is None:
            first.kill()
            first.wait()
        errf.close()
        for p in sockdir.iterdir():
            p.unlink()
        sockdir.rmdir()
