"""Scenario driver for the TPM-in-a-snapshot end-to-end test (a GuestRun.driver; see tpm_snapshot_scenario.py).

    python3 tpm_snapshot_driver.py --backend builtin|swtpm [--] swiftvmm run --kernel ... (the VMM command)

It reuses snapshot_driver.py's Proc (a swiftvmm-kit VM: console, stderr, standard input, QMP) and
tpm_driver.py's Swtpm (one swtpm process), and runs, for one TPM backend:

  orig       VMM-COMMAND --tpm T --qmp S --log-level info; T is `builtin,state=orig.state` (a new file)
             or `swtpm,socket=...` of a new swtpm with its own state directory. The guest defines an NV
             index, writes V0, prints `case: nv ready`, then runs `tpm2cmd loop createprimary` in the
             background (a CreatePrimary is in flight most of the time). After `loop i=3`:
             snapshot-create snap1 (the guest runs on); two iterations later snapshot-create snap2;
             then QMP quit. The original's TPM state is hashed (builtin: the state file; swtpm: every
             file of its state directory) once it has exited, and again at the end.
  inspect    `swiftvmm snapshot inspect snap1`
  refused    (builtin) `swiftvmm restore snap1 --tpm builtin,state=orig.state`: that file holds a TPM,
             the restore must be refused (exit 1, "already holds a TPM's state")
  clone-1    swiftvmm restore snap1 --tpm <clone-1's own TPM> --qmp S --log-level info } together
  clone-mem  swiftvmm restore snap1 --qmp S --log-level info (no --tpm: in memory)  }
  clone-mem  (builtin only: a swtpm snapshot needs --tpm swtpm; restores across backends are refused)
  clone-2a   swiftvmm restore snap2 --tpm <its own TPM> ...                          } together
  clone-2b   swiftvmm restore snap2 --tpm <its own TPM> ...                          }
             A clone's own TPM: builtin a new state file clone-N.state; swtpm a new swtpm process with a
             new, empty state directory. In every clone the loop must go on: LOOP_AFTER loop lines
             (the first one is the command that was in flight, answered after the restore). Then, by
             lines sent to the guest's standard input (its console): `stop` (the loop ends after its
             iteration), `read after-restore` (NV_Read: V0). clone-2a and clone-2b then each write
             their own value (`write own HEX`), read it back (`read own`), and once BOTH have
             written, read again (`read again`): each sees its own value. `done`: the guest powers
             off and the VMM exits by itself.
             The clones of one snapshot run side by side; the driver takes each step for each of
             them in turn. A clone that fails (its VMM exits early, a step times out) is ended and
             its error kept in summary.json (`clone_errors`); the other clones go on, and the
             scenario then counts as failed.

The guest's commands are answered by lines `tpm: LABEL exit=N <tpm2cmd's line>`; the loop prints
`loop i=N rc=0x000 key=HEX8`, and `case: loop exit=N` when it has ended.

Files in $E2E_ARTIFACTS: NAME.out / NAME.err / NAME.status of every process above (the consoles are
the guest's serial output), NAME.swtpm.log (swtpm backend), summary.json (snapshot-create replies and
wall times, loop counters when the snapshots were asked for and answered, state hashes, the refused
restore's status). The driver's stdout is a log of its steps; `driver: scenario complete` at the end,
exit status 0; 1 when a step failed (`driver: FAILED at step ...`).
The private directory (snapshots, state files, sockets) is under /run (tmpfs in the test host), removed
at the end; SIGTERM (the harness's timeout) kills every process the driver started.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import tpm_driver
from guestrun import vm_from_command
from snapshot_driver import Proc, StepFailed, dir_usage, log, run_scenario, run_tool
from swiftvmm_kit import ExpectTimeout, KitError, RestoredVM, Snapshot
from tpm_driver import Swtpm, private_dir

LOOP = re.compile(r"^loop i=(\d+) rc=(0x[0-9a-f]+)(.*)$")
NV_INDEX = "0x01500001"
NV_SIZE = 8
V0 = "7630206f72696721"                      # "v0 orig!"
CLONE_VALUES = {"clone-2a": "2a2a2a2a00000001", "clone-2b": "2b2b2b2b00000002"}
LOOP_BEFORE = 3       # loop iterations before snapshot 1
LOOP_BETWEEN = 2      # iterations between the two snapshots
LOOP_AFTER = 3        # loop lines every clone must print after its restore (the in-flight one + 2)
BOOT_TIMEOUT = 300.0
STEP_TIMEOUT = 180.0  # a restore to LOOP_AFTER loop lines; one console command's answer
EXIT_TIMEOUT = 120.0  # the guest's power-off after `done`


def loop_lines(p: Proc) -> list[tuple[int, str, str]]:
    """The loop's lines so far, whole lines only (a line still arriving would look like a bad rc)."""
    return [(int(m.group(1)), m.group(2), m.group(3).strip()) for line in p.lines()[:-1] if (m := LOOP.match(line))]


def last_loop(p: Proc) -> int:
    ls = loop_lines(p)
    return ls[-1][0] if ls else 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_hash(path: Path) -> dict:
    """File name -> sha256 of the state file, or of every file of a state directory."""
    if path.is_file():
        return {path.name: sha256(path)}
    if path.is_dir():
        return {f.name: sha256(f) for f in sorted(path.iterdir()) if f.is_file()}
    return {}


class Backend:
    """Makes each VMM process's own TPM: a new state file, or a new swtpm with a new state directory."""

    def __init__(self, kind: str, tmp: Path, art: Path):
        self.kind, self.tmp, self.art = kind, tmp, art
        self.swtpms: dict[str, Swtpm] = {}

    def other(self) -> str:
        return "swtpm" if self.kind == "builtin" else "builtin"

    def state_of(self, name: str, kind: Optional[str] = None) -> Path:
        return self.tmp / (f"{name}.state" if (kind or self.kind) == "builtin" else f"{name}-swtpm")

    def tpm_args(self, name: str, kind: Optional[str] = None) -> list[str]:
        if (kind or self.kind) == "builtin":
            return ["--tpm", f"builtin,state={self.state_of(name, 'builtin')}"]
        d = self.state_of(name, "swtpm")
        d.mkdir()
        sock = self.tmp / f"{name}.swtpm.sock"
        sw = Swtpm(sock, d, self.art / f"{name}.swtpm.log")
        sw.start()
        self.swtpms[name] = sw
        return ["--tpm", f"swtpm,socket={sock}"]

    def release(self, name: str) -> Optional[dict]:
        sw = self.swtpms.pop(name, None)
        return sw.stop(5.0) if sw is not None else None


def wait_exit(p: Proc, timeout: float) -> int:
    """The exit status of a VMM whose guest powers off by itself (QMP quit if it has not after timeout)."""
    try:
        p.status = p.vm.wait(timeout)
    except ExpectTimeout:
        log(f"{p.name}: still running {timeout:.0f} s after the guest was told to finish: QMP quit")
        return p.quit()
    p.finish()
    log(f"{p.name}: exited {p.status}")
    return p.status


def console_cmd(p: Proc, line: str, answer_prefix: str) -> str:
    """Sends one line to the guest's console and waits for the line that answers it."""
    p.vm.console.send(line + "\n")
    p.wait_until(f"an answer {answer_prefix!r} to {line!r}", lambda: p.value_line(answer_prefix) is not None,
                 STEP_TIMEOUT)
    ans = p.value_line(answer_prefix) or ""
    log(f"{p.name}: {line!r} -> {ans}")
    return ans


def clone_goes_on(p: Proc, summary: dict) -> None:
    """The loop carries on after the restore; then it is stopped and V0 is read."""
    p.wait_until(f"{LOOP_AFTER} loop lines after the restore", lambda: len(loop_lines(p)) >= LOOP_AFTER
                 or any(rc != "0x000" for _, rc, _ in loop_lines(p)), STEP_TIMEOUT)
    bad = [f"i={i} rc={rc} {rest}" for i, rc, rest in loop_lines(p) if rc != "0x000"]
    if bad:
        raise StepFailed(f"{p.name}: the loop got a non-zero response code after the restore: {bad}")
    log(f"{p.name}: loop lines since the restore: {[i for i, _, _ in loop_lines(p)]}")
    console_cmd(p, "stop", "case: loop exit=")
    console_cmd(p, "read after-restore", "tpm: read-after-restore exit=")
    summary[f"{p.name}_loop"] = [i for i, _, _ in loop_lines(p)]


def scenario(args: argparse.Namespace, cmd: list[str], art: Path, tmp: Path, summary: dict) -> None:
    if len(cmd) < 2 or cmd[1] != "run":
        raise StepFailed(f"expected a `swiftvmm run ...` command, got {cmd}")
    vmm = cmd[0]
    be = Backend(args.backend, tmp, art)
    summary.update({"backend": args.backend, "private_dir": str(tmp), "v0": V0, "clone_values": CLONE_VALUES})
    snap1, snap2 = tmp / "snap1", tmp / "snap2"
    info = ["--log-level", "info"]

    # -- the original -------------------------------------------------------------------------------
    summary["step"] = "original"
    orig = Proc("orig", vm_from_command(cmd, [*be.tpm_args("orig"), *info], name="orig"), art).start()
    orig.wait_until(f"loop i={LOOP_BEFORE}", lambda: last_loop(orig) >= LOOP_BEFORE
                          or orig.value_line("case: nv failed") is not None, BOOT_TIMEOUT)
    if orig.value_line("case: nv ready") is None:
        raise StepFailed("orig: the guest could not set up its NV index (see orig.out)")

    for n, snap in ((1, snap1), (2, snap2)):
        summary["step"] = f"snapshot-create {n}"
        if n == 2:
            target = summary["snap1_loop_at_reply"] + LOOP_BETWEEN
            orig.wait_until(f"loop i={target}", lambda: last_loop(orig) >= target, STEP_TIMEOUT)
        summary[f"snap{n}_loop_before"] = last_loop(orig)
        t = time.monotonic()
        summary[f"snap{n}_return"] = orig.cmd("snapshot-create", {"path": str(snap)})
        summary[f"snap{n}_wall_ms"] = round((time.monotonic() - t) * 1000, 1)
        summary[f"snap{n}_loop_at_reply"] = last_loop(orig)
        summary[f"snap{n}_status_after"] = orig.cmd("query-status")["status"]
        summary[f"snap{n}_usage"] = dir_usage(snap)
        ret = summary[f"snap{n}_return"]
        log(f"snapshot {n}: time-ms {ret.get('time-ms')} (wall {summary[f'snap{n}_wall_ms']} ms), size "
            f"{ret.get('size')}, loop i={summary[f'snap{n}_loop_before']} when asked, "
            f"i={summary[f'snap{n}_loop_at_reply']} at the reply")
    target = summary["snap2_loop_at_reply"] + 1
    orig.wait_until(f"loop i={target}", lambda: last_loop(orig) >= target, STEP_TIMEOUT)
    summary["step"] = "quit of the original"
    orig.quit()
    summary["orig_swtpm"] = be.release("orig")
    summary["orig_state_after_exit"] = state_hash(be.state_of("orig"))
    log(f"orig: TPM state {summary['orig_state_after_exit']}")

    summary["inspect_status"] = run_tool(vmm, ["snapshot", "inspect", str(snap1)], art, "inspect")

    if args.backend == "builtin":
        summary["step"] = "restore onto a state file that holds a TPM"
        try:
            summary["refused_status"] = run_tool(vmm, ["restore", str(snap1), "--tpm",
                                                       f"builtin,state={be.state_of('orig')}",
                                                       "--qmp", str(tmp / "refused.qmp")], art, "refused", 150)
        except subprocess.TimeoutExpired:
            raise StepFailed("refused: the restore onto the original's state file did not exit within 150 s")
        summary["orig_state_after_refused"] = state_hash(be.state_of("orig"))

    # -- restores of snapshot 1: with a TPM of its own, in memory, and on the other backend -------------
    summary["step"] = "restores of snapshot 1"
    summary["clone_errors"] = {}
    summary["clone_x_backend"] = be.other()
    clones: dict[str, Proc] = {}
    clone_failures = (StepFailed, tpm_driver.StepFailed, KitError)

    def failed(name: str, e: Exception) -> None:
        log(f"{name}: FAILED: {e}")
        summary["clone_errors"][name] = str(e).splitlines()[0]
        if name in clones:
            clones[name].finish()

    def step(names: list[str], what: Callable[[Proc], None]) -> None:
        """Runs one step for each clone still going; a failure is recorded and that clone ended."""
        for name in names:
            p = clones.get(name)
            if p is None or name in summary["clone_errors"]:
                continue
            try:
                what(p)
            except clone_failures as e:
                failed(name, e)

    def restore(name: str, snap: Path, tpm: Optional[str]) -> None:
        """Restores snap as `name` (tpm: a backend kind, or None for no --tpm)."""
        try:
            targs = be.tpm_args(name, tpm) if tpm else []
            vm = RestoredVM(Snapshot(snap, vmm), vmgenid=None, extra_args=[*targs, *info], name=name)
            clones[name] = Proc(name, vm, art).start()
        except clone_failures as e:
            failed(name, e)

    def finish(names: list[str]) -> None:
        step(names, lambda p: p.vm.console.send("done\n"))
        step(names, lambda p: wait_exit(p, EXIT_TIMEOUT) and None)
        for name in names:
            if name in clones:
                clones[name].finish()
            summary[f"{name}_swtpm"] = be.release(name)

    # (A snapshot's TPM state is in its backend's format: libtpms's blobs or swtpm's, which wrap
    # them in swtpm's header; a restore onto the other backend is refused, so there is no clone-x.
    # Without --tpm the state runs in memory in the builtin libtpms: only for builtin snapshots.)
    firsts = ["clone-1"] + (["clone-mem"] if be.kind == "builtin" else [])
    restore("clone-1", snap1, be.kind)
    if be.kind == "builtin":
        restore("clone-mem", snap1, None)
    step(firsts, lambda p: clone_goes_on(p, summary))
    finish(firsts)

    # -- two clones of snapshot 2, each with a TPM of its own, writing different values -----------------
    summary["step"] = "restores of snapshot 2"
    seconds = list(CLONE_VALUES)
    for name in seconds:
        restore(name, snap2, be.kind)
    step(seconds, lambda p: clone_goes_on(p, summary))
    step(seconds, lambda p: console_cmd(p, f"write own {CLONE_VALUES[p.name]}", "tpm: write-own exit=") and None)
    step(seconds, lambda p: console_cmd(p, "read own", "tpm: read-own exit=") and None)
    # Both clones have written (or one failed): each reads again.
    step(seconds, lambda p: console_cmd(p, "read again", "tpm: read-again exit=") and None)
    finish(seconds)

    summary["step"] = "checking the TPM states"
    summary["orig_state_at_end"] = state_hash(be.state_of("orig"))
    summary["clone_states"] = {n: state_hash(be.state_of(n)) for n in ("clone-1", "clone-2a", "clone-2b")}
    if summary["clone_errors"]:
        raise StepFailed(f"clones failed: {summary['clone_errors']}")
    summary["step"] = "done"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("builtin", "swtpm"), required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no VMM command")

    def cleanup() -> None:
        for c in tpm_driver.CHILDREN:
            tpm_driver.kill_tree(c)
    return run_scenario(lambda art, tmp, summary: scenario(args, cmd, art, tmp, summary),
                        "swiftvmm-tpm-snapshot-e2e-", private_dir(), cleanup)


if __name__ == "__main__":
    sys.exit(main())
