"""Scenario driver for the TPM-in-a-snapshot end-to-end test (a GuestRun.driver; see tpm_snapshot_scenario.py).

    python3 tpm_snapshot_driver.py --backend builtin|swtpm [--] swiftvmm run --kernel ... (the VMM command)

It reuses snapshot_driver.py's VMProc (a swiftvmm process with its console, stderr, standard input and
a qemu.qmp client) and tpm_driver.py's Swtpm (one swtpm process), and runs, for one TPM backend:

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
             A clone that fails (its VMM exits early, a step times out) is killed and its error kept
             in summary.json (`clone_errors`); the other clones go on, and the scenario then
             counts as failed.

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
import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import tpm_driver
from snapshot_driver import VMProc, StepFailed, dir_usage, log, run_tool
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


def loop_lines(p: VMProc) -> list[tuple[int, str, str]]:
    """The loop's lines so far, whole lines only (a line still arriving would look like a bad rc)."""
    return [(int(m.group(1)), m.group(2), m.group(3).strip()) for line in p.lines()[:-1] if (m := LOOP.match(line))]


def last_loop(p: VMProc) -> int:
    ls = loop_lines(p)
    return ls[-1][0] if ls else 0


def complete_line(p: VMProc, prefix: str) -> Optional[str]:
    """The first whole console line (its newline received) that starts with prefix."""
    for line in p.lines()[:-1]:
        if line.startswith(prefix):
            return line
    return None


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

    async def tpm_args(self, name: str, kind: Optional[str] = None) -> list[str]:
        if (kind or self.kind) == "builtin":
            return ["--tpm", f"builtin,state={self.state_of(name, 'builtin')}"]
        d = self.state_of(name, "swtpm")
        d.mkdir()
        sock = self.tmp / f"{name}.swtpm.sock"
        sw = Swtpm(sock, d, self.art / f"{name}.swtpm.log")
        await asyncio.to_thread(sw.start)
        self.swtpms[name] = sw
        return ["--tpm", f"swtpm,socket={sock}"]

    async def release(self, name: str) -> Optional[dict]:
        sw = self.swtpms.pop(name, None)
        return await asyncio.to_thread(sw.stop, 5.0) if sw is not None else None


async def wait_exit(p: VMProc, timeout: float) -> int:
    """The exit status of a VMM whose guest powers off by itself (QMP quit if it has not after timeout)."""
    assert p.proc is not None
    try:
        p.status = await asyncio.wait_for(p.proc.wait(), timeout)
    except asyncio.TimeoutError:
        log(f"{p.name}: still running {timeout:.0f} s after the guest was told to finish: QMP quit")
        return await p.quit()
    await asyncio.sleep(0.1)
    await p.close()
    (p.art / f"{p.name}.status").write_text(f"{p.status}\n")
    log(f"{p.name}: exited {p.status}")
    return p.status


async def console_cmd(p: VMProc, line: str, answer_prefix: str) -> str:
    """Sends one line to the guest's console and waits for the line that answers it."""
    await p.send_input(line + "\n")
    await p.wait_until(f"an answer {answer_prefix!r} to {line!r}", lambda: complete_line(p, answer_prefix) is not None,
                       STEP_TIMEOUT)
    ans = complete_line(p, answer_prefix) or ""
    log(f"{p.name}: {line!r} -> {ans}")
    return ans


async def clone_goes_on(p: VMProc, summary: dict) -> None:
    """The loop carries on after the restore; then it is stopped and V0 is read."""
    await p.wait_until(f"{LOOP_AFTER} loop lines after the restore", lambda: len(loop_lines(p)) >= LOOP_AFTER
                       or any(rc != "0x000" for _, rc, _ in loop_lines(p)), STEP_TIMEOUT)
    bad = [f"i={i} rc={rc} {rest}" for i, rc, rest in loop_lines(p) if rc != "0x000"]
    if bad:
        raise StepFailed(f"{p.name}: the loop got a non-zero response code after the restore: {bad}")
    log(f"{p.name}: loop lines since the restore: {[i for i, _, _ in loop_lines(p)]}")
    await console_cmd(p, "stop", "case: loop exit=")
    await console_cmd(p, "read after-restore", "tpm: read-after-restore exit=")
    summary[f"{p.name}_loop"] = [i for i, _, _ in loop_lines(p)]


async def scenario(args: argparse.Namespace, cmd: list[str], art: Path, tmp: Path, summary: dict) -> None:
    if len(cmd) < 2 or cmd[1] != "run":
        raise StepFailed(f"expected a `swiftvmm run ...` command, got {cmd}")
    vmm = cmd[0]
    be = Backend(args.backend, tmp, art)
    summary.update({"backend": args.backend, "private_dir": str(tmp), "v0": V0, "clone_values": CLONE_VALUES})
    snap1, snap2 = tmp / "snap1", tmp / "snap2"
    info = ["--log-level", "info"]

    # -- the original -------------------------------------------------------------------------------
    summary["step"] = "original"
    orig = VMProc("orig", [*cmd, *(await be.tpm_args("orig")), "--qmp", str(tmp / "orig.qmp"), *info],
                  str(tmp / "orig.qmp"), art)
    await orig.start()
    await orig.wait_until(f"loop i={LOOP_BEFORE}", lambda: last_loop(orig) >= LOOP_BEFORE
                          or orig.value_line("case: nv failed") is not None, BOOT_TIMEOUT)
    if orig.value_line("case: nv ready") is None:
        raise StepFailed("orig: the guest could not set up its NV index (see orig.out)")

    for n, snap in ((1, snap1), (2, snap2)):
        summary["step"] = f"snapshot-create {n}"
        if n == 2:
            target = summary["snap1_loop_at_reply"] + LOOP_BETWEEN
            await orig.wait_until(f"loop i={target}", lambda: last_loop(orig) >= target, STEP_TIMEOUT)
        summary[f"snap{n}_loop_before"] = last_loop(orig)
        t = time.monotonic()
        summary[f"snap{n}_return"] = await orig.cmd("snapshot-create", {"path": str(snap)})
        summary[f"snap{n}_wall_ms"] = round((time.monotonic() - t) * 1000, 1)
        summary[f"snap{n}_loop_at_reply"] = last_loop(orig)
        summary[f"snap{n}_status_after"] = (await orig.cmd("query-status"))["status"]
        summary[f"snap{n}_usage"] = dir_usage(snap)
        ret = summary[f"snap{n}_return"]
        log(f"snapshot {n}: time-ms {ret.get('time-ms')} (wall {summary[f'snap{n}_wall_ms']} ms), size "
            f"{ret.get('size')}, loop i={summary[f'snap{n}_loop_before']} when asked, "
            f"i={summary[f'snap{n}_loop_at_reply']} at the reply")
    target = summary["snap2_loop_at_reply"] + 1
    await orig.wait_until(f"loop i={target}", lambda: last_loop(orig) >= target, STEP_TIMEOUT)
    summary["step"] = "quit of the original"
    await orig.quit()
    summary["orig_swtpm"] = await be.release("orig")
    summary["orig_state_after_exit"] = state_hash(be.state_of("orig"))
    log(f"orig: TPM state {summary['orig_state_after_exit']}")

    summary["inspect_status"] = await run_tool(vmm, ["snapshot", "inspect", str(snap1)], art, "inspect")

    if args.backend == "builtin":
        summary["step"] = "restore onto a state file that holds a TPM"
        try:
            summary["refused_status"] = await asyncio.wait_for(
                run_tool(vmm, ["restore", str(snap1), "--tpm", f"builtin,state={be.state_of('orig')}",
                               "--qmp", str(tmp / "refused.qmp")], art, "refused"), 150)
        except asyncio.TimeoutError:
            raise StepFailed("refused: the restore onto the original's state file did not exit within 150 s")
        summary["orig_state_after_refused"] = state_hash(be.state_of("orig"))

    # -- restores of snapshot 1: with a TPM of its own, in memory, and on the other backend -------------
    summary["step"] = "restores of snapshot 1"
    summary["clone_errors"] = {}
    summary["clone_x_backend"] = be.other()
    # Set when a clone of snapshot 2 has written its value (or has failed): the other then reads again.
    written: dict[str, asyncio.Event] = {n: asyncio.Event() for n in CLONE_VALUES}

    async def clone(name: str, snap: Path, tpm: Optional[str], then=None) -> Optional[VMProc]:
        """Restores snap as `name` (tpm: a backend kind, or None for no --tpm), runs the common steps
        and `then`, and has the guest finish. A failure is recorded, not raised."""
        p: Optional[VMProc] = None
        try:
            targs = await be.tpm_args(name, tpm) if tpm else []
            sock = str(tmp / f"{name}.qmp")
            p = VMProc(name, [vmm, "restore", str(snap), *targs, "--qmp", sock, *info], sock, art)
            await p.start()
            await clone_goes_on(p, summary)
            if then is not None:
                await then(p)
            await p.send_input("done\n")
            await wait_exit(p, EXIT_TIMEOUT)
        except (StepFailed, tpm_driver.StepFailed) as e:
            log(f"{name}: FAILED: {e}")
            summary["clone_errors"][name] = str(e)
            if name in written:
                written[name].set()
            if p is not None:
                p.kill()
                if p.proc is not None:
                    p.status = await p.proc.wait()
                    (art / f"{name}.status").write_text(f"{p.status}\n")
                await p.close()
        finally:
            summary[f"{name}_swtpm"] = await be.release(name)
        return p

    # (A snapshot's TPM state is in its backend's format: libtpms's blobs or swtpm's, which wrap
    # them in swtpm's header; a restore onto the other backend is refused, so there is no clone-x.
    # Without --tpm the state runs in memory in the builtin libtpms: only for builtin snapshots.)
    firsts = [clone("clone-1", snap1, be.kind)]
    if be.kind == "builtin":
        firsts.append(clone("clone-mem", snap1, None))
    await asyncio.gather(*firsts)

    # -- two clones of snapshot 2, each with a TPM of its own, writing different values -----------------
    summary["step"] = "restores of snapshot 2"

    async def write_own(p: VMProc) -> None:
        try:
            await console_cmd(p, f"write own {CLONE_VALUES[p.name]}", "tpm: write-own exit=")
            await console_cmd(p, "read own", "tpm: read-own exit=")
        finally:
            written[p.name].set()
        # Both clones have written (or one failed): read again.
        for e in written.values():
            await e.wait()
        await console_cmd(p, "read again", "tpm: read-again exit=")

    await asyncio.gather(*(clone(n, snap2, be.kind, write_own) for n in CLONE_VALUES))

    summary["step"] = "checking the TPM states"
    summary["orig_state_at_end"] = state_hash(be.state_of("orig"))
    summary["clone_states"] = {n: state_hash(be.state_of(n)) for n in ("clone-1", "clone-2a", "clone-2b")}
    if summary["clone_errors"]:
        raise StepFailed(f"clones failed: {summary['clone_errors']}")
    summary["step"] = "done"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("builtin", "swtpm"), required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no VMM command")
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix="swiftvmm-tpm-snapshot-e2e-"))
    art.mkdir(parents=True, exist_ok=True)
    tmp = private_dir()
    log(f"artifacts in {art}, snapshots and TPM states in {tmp}")
    summary: dict = {"step": "start"}
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    loop.add_signal_handler(signal.SIGTERM, lambda: main_task.cancel() if main_task else None)
    status = 1
    try:
        await scenario(args, cmd, art, tmp, summary)
        status = 0
    except (StepFailed, tpm_driver.StepFailed) as e:
        log(f"FAILED at step {summary.get('step')}: {e}")
        summary["error"] = str(e)
    except asyncio.CancelledError:
        log(f"terminated at step {summary.get('step')}")
        summary["error"] = "terminated"
    except Exception as e:  # noqa: BLE001 - reported, the processes are still cleaned up
        log(f"FAILED at step {summary.get('step')}: {type(e).__name__}: {e}")
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        for p in VMProc.all:
            if p.proc is not None and p.proc.returncode is None:
                log(f"{p.name}: still running: killed")
            p.kill()
        for c in tpm_driver.CHILDREN:
            tpm_driver.kill_tree(c)
        summary["processes"] = {p.name: p.summary() for p in VMProc.all}
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"scenario {'complete' if status == 0 else 'incomplete'}")
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
