"""Scenario driver for the snapshot-during-a-write end-to-end test (a GuestRun.driver; see
test_virtio_more.py). swiftvmm only.

    python3 virtio_snapshot_driver.py VMM run --kernel ... (the harness's swiftvmm command)

The guest writes a deterministic pattern (pattern_chunk below, computed in the guest from `seq`) to
/dev/vda with `dd oflag=direct`, one 1 MiB chunk per dd, printing `case: chunk N written` after each.

  orig      VMM-COMMAND --drive file=DISK --qmp S (DISK: CHUNKS MiB of zeros): query-block; once the
            guest printed `case: chunk TRIGGER written`: snapshot-create {"path": SNAP,
            "copy-drives": true} while it runs (the guest is paused for the save and goes on after
            it), then quit.
  restore-no-drive   `swiftvmm restore SNAP` without --drive (must be refused)
  restore-small      `swiftvmm restore SNAP --drive file=SMALL` (an image of another size: refused)
  clone     SNAP/drive0.img is copied to CLONE; `swiftvmm restore SNAP --drive file=CLONE --qmp S2
            --log-level info`: query-block; the guest finishes its dd, reads the whole drive back,
            compares checksums and powers off by itself.
  verify    `swiftvmm snapshot verify SNAP`
Every image (DISK after orig, SNAP/drive0.img after the save, CLONE, and DISK and SNAP/drive0.img
again after the clone) is described in summary.json by image_info(): size, sha256, mtime and, per
1 MiB chunk, what each 4 KiB block holds: `p` the pattern, `z` zeros, `x` anything else (a chunk
whose blocks are all alike is one letter).

Each VMM is a swiftvmm-kit VM (snapshot_driver.Proc).
Files in $E2E_ARTIFACTS: NAME.out / NAME.err / NAME.status per process (as snapshot_driver.py),
verify.out/.status, summary.json. The driver's stdout is a log of its steps. Exit status 0 when the
whole scenario ran, 1 when a step failed (the log says which). Images and the snapshot live in a
private directory under /run (tmpfs in the test host; $TMPDIR where /run is not writable), removed
at the end. SIGTERM (the harness's timeout) kills every VMM this driver started.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from guestrun import vm_from_command
from snapshot_driver import Proc, StepFailed, dir_usage, log, run_scenario, run_tool
from swiftvmm_kit import ExpectTimeout, RestoredVM, Snapshot
from tpm_driver import private_dir

MIB = 1 << 20
BLOCK = 4096
CHUNKS = 48          # the drive's size in MiB and the guest's number of 1 MiB writes
TRIGGER = 10         # snapshot-create once the guest printed this chunk
SEQ_LAST = 220000    # the guest's base: `seq 1 SEQ_LAST` (1.43 MB)
STRIDE = 4099        # chunk N is the base's 1 MiB at byte N * STRIDE (odd: no 512-byte sector repeats)
SMALL_MIB = 32
BOOT_TIMEOUT = 300.0
RESTORE_TIMEOUT = 300.0
CHUNK_LINE = re.compile(r"^case: chunk (\d+) written$")


def pattern_base() -> bytes:
    """What the guest's `seq 1 SEQ_LAST` prints."""
    return "".join(f"{n}\n" for n in range(1, SEQ_LAST + 1)).encode()


def pattern_chunk(base: bytes, n: int) -> bytes:
    """What `dd if=BASE bs=1M count=1 skip=N*STRIDE iflag=skip_bytes` reads."""
    return base[n * STRIDE:n * STRIDE + MIB]


def pattern() -> bytes:
    base = pattern_base()
    assert len(base) >= (CHUNKS - 1) * STRIDE + MIB
    return b"".join(pattern_chunk(base, n) for n in range(CHUNKS))


def chunk_map(data: bytes, want: bytes) -> list[str]:
    """Per 1 MiB chunk of data: one letter per 4 KiB block (p: as want, z: zeros, x: other), or one
    letter for the whole chunk when all its blocks are alike."""
    zero = bytes(BLOCK)
    out = []
    for c in range((len(data) + MIB - 1) // MIB):
        letters = []
        for b in range(c * MIB, min(len(data), (c + 1) * MIB), BLOCK):
            got = data[b:b + BLOCK]
            letters.append("p" if got == want[b:b + BLOCK] else "z" if got == zero[:len(got)] else "x")
        s = "".join(letters)
        out.append(s[0] if s and s == s[0] * len(s) else s)
    return out


def image_info(path: Path, want: bytes) -> dict:
    data = path.read_bytes()
    st = path.stat()
    return {"path": str(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "mtime_ns": st.st_mtime_ns, "chunks": chunk_map(data, want)}


def chunks_printed(p: Proc) -> list[int]:
    """The chunk numbers of the whole `case: chunk N written` lines of p's console."""
    return [int(m.group(1)) for line in p.lines()[:-1] if (m := CHUNK_LINE.match(line))]


def try_restore(vmm: str, args: list[str], art: Path, name: str) -> dict:
    """Runs `swiftvmm restore ARGS` that must be refused: its status, stdout and stderr (killed
    after 60 s: a restore that was not refused would run the guest)."""
    p = subprocess.Popen([vmm, "restore", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=60)
        status: object = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        status = "still running after 60 s (killed)"
    (art / f"{name}.out").write_bytes(out)
    (art / f"{name}.err").write_bytes(err)
    (art / f"{name}.status").write_text(f"{status if isinstance(status, int) else 124}\n")
    log(f"{name}: `swiftvmm restore {' '.join(args)}`: {status}, stderr {err.decode(errors='replace').strip()!r}")
    return {"argv": [vmm, "restore", *args], "status": status, "stdout": out.decode(errors="replace"),
            "stderr": err.decode(errors="replace")}


def scenario(cmd: list[str], art: Path, tmp: Path, summary: dict) -> None:
    vmm = cmd[0]
    want = pattern()
    summary["pattern_sha256"] = hashlib.sha256(want).hexdigest()
    disk, small, clone_img, snap = tmp / "disk.img", tmp / "small.img", tmp / "clone.img", tmp / "snap"
    with open(disk, "wb") as f:
        f.truncate(CHUNKS * MIB)
    with open(small, "wb") as f:
        f.truncate(SMALL_MIB * MIB)
    summary["disk"], summary["clone_image_path"] = str(disk), str(clone_img)

    # -- the original: snapshot-create while the guest's dd runs ----------------------------------
    summary["step"] = "original"
    orig = Proc("orig", vm_from_command(cmd, ["--drive", f"file={disk}"], name="orig"), art).start()
    summary["orig_query_block"] = orig.cmd("query-block")
    orig.wait_until(f"'case: chunk {TRIGGER} written'", lambda: TRIGGER in chunks_printed(orig), BOOT_TIMEOUT)
    summary["chunks_at_request"] = chunks_printed(orig)
    summary["step"] = "snapshot-create (running, copy-drives)"
    t = time.monotonic()
    summary["snapshot_return"] = orig.cmd("snapshot-create", {"path": str(snap), "copy-drives": True})
    summary["snapshot_wall_ms"] = (time.monotonic() - t) * 1000
    summary["chunks_at_reply"] = chunks_printed(orig)
    summary["orig_status_after_snapshot"] = orig.cmd("query-status")["status"]
    summary["snapshot_usage"] = dir_usage(snap)
    log(f"snapshot: {summary['snapshot_return']}; chunks printed at the request {max(summary['chunks_at_request'])}, "
        f"at the reply {max(summary['chunks_at_reply'])}")
    orig.quit()
    summary["chunks_orig_total"] = chunks_printed(orig)
    summary["disk_after_orig"] = image_info(disk, want)
    if not (snap / "drive0.img").exists():
        raise StepFailed(f"the snapshot has no drive0.img: {sorted(f.name for f in snap.iterdir())}")
    summary["snap_drive_after_save"] = image_info(snap / "drive0.img", want)

    # -- restores that must be refused -----------------------------------------------------------
    summary["step"] = "refused restores"
    summary["restore_no_drive"] = try_restore(vmm, [str(snap)], art, "restore-no-drive")
    summary["restore_small"] = try_restore(vmm, [str(snap), "--drive", f"file={small}"], art, "restore-small")

    # -- the clone, on a copy of the snapshot's drive ----------------------------------------------
    summary["step"] = "restore"
    shutil.copyfile(snap / "drive0.img", clone_img)
    clone = Proc("clone", RestoredVM(Snapshot(snap, vmm), vmgenid=None, drives=[f"file={clone_img}"],
                                     extra_args=["--log-level", "info"], name="clone"), art).start()
    summary["clone_query_block"] = clone.cmd("query-block")
    clone.wait_until("'case: readback' line", lambda: clone.value_line("case: readback ") is not None, RESTORE_TIMEOUT)
    summary["step"] = "clone power-off"
    try:
        clone.status = clone.vm.wait(120)
    except ExpectTimeout:
        raise StepFailed("clone: did not exit within 120 s of its readback line (no power-off)") from None
    clone.finish()
    log(f"clone: exited {clone.status}")

    summary["step"] = "images after the clone"
    summary["clone_image"] = image_info(clone_img, want)
    summary["disk_after_clone"] = image_info(disk, want)
    summary["snap_drive_after_clone"] = image_info(snap / "drive0.img", want)
    summary["verify_status"] = run_tool(vmm, ["snapshot", "verify", str(snap)], art, "verify")
    summary["step"] = "done"


if __name__ == "__main__":
    sys.exit(run_scenario(lambda art, tmp, summary: scenario(sys.argv[1:], art, tmp, summary),
                          "swiftvmm-virtio-snapshot-e2e-", private_dir("swiftvmm-vsnap-")))
