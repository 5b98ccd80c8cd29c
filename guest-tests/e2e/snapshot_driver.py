"""Scenario driver for the snapshot end-to-end test (a GuestRun.driver; see test_snapshot.py).

Started inside the test host as `python3 snapshot_driver.py VMM run --kernel ... (the VMM command)`,
it runs several swiftvmm processes, in sequence and in parallel, each a swiftvmm-kit VM
(python/swiftvmm_kit: the real qemu.qmp client underneath):

  orig      VMM-COMMAND --qmp S: boots the guest; once it has printed `tick 10`: query-vm-generation-id,
            stop, snapshot-create {"path": SNAP1} (while stopped: it must stay stopped), quit.
            `swiftvmm snapshot inspect SNAP1`; memory.bin's size and mtime are noted.
  clone-a   swiftvmm restore SNAP1 --qmp SA --log-level info } started together; each: the generation
  clone-b   swiftvmm restore SNAP1 --qmp SB --log-level info } ID over QMP, the guest's "restored" line,
            --clock host (clone-b only)                           }
            a line sent to its standard input that the guest must echo back (`case: input=...`),
            >= 20 ticks after the restore.
            clone-a: snapshot-create {"path": SNAP2, "live": true} while it runs (it must keep running
            and ticking; its memory is written by a child process while the guest runs), then quit.
  clone-a2  swiftvmm restore SNAP2 --qmp SA2 --log-level info: the same checks (second generation);
            then clone-a2 and clone-b quit, memory.bin of SNAP1 is stat'ed again, the files of SNAP1
            listed (the first restore recorded the working set beside it) and
            `swiftvmm snapshot verify SNAP1` and `... SNAP2` run.
The clones of SNAP1 start CLOCK_GAP seconds after it was saved; the host's time when the guest's
`case: ready` (orig) and `case: restored` lines arrived is noted (`*_line_host_time`): the tests compare
the guest's clocks with it.

Files in $E2E_ARTIFACTS (the harness sets it; default a new temporary directory):
  NAME.out      the raw console (stdout) of process NAME, exactly as received
  NAME.err      its standard error (the restores' info log)
  NAME.status   its exit status
  inspect.out / verify.out (+ .status)   the snapshot subcommands' output
  summary.json  what the tests check besides the consoles: QMP answers and events per process,
                snapshot-create returns, memory.bin stats, ticks seen when snapshots were requested
The driver's own stdout is a log of its steps (`driver: ... [seconds since the driver started]`).
Exit status 0 when the whole scenario ran, 1 when a step failed (the log says which; summary.json
has what was gathered).
Snapshots live in a private directory under $TMPDIR (tmpfs in the test host), removed at the end;
each VM's QMP socket is the kit's. SIGTERM (the harness's timeout) ends every VMM this driver started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from guestrun import vm_from_command
from swiftvmm_kit import VM, KitError, QMPError, RestoredVM, Snapshot

TICK = re.compile(r"^tick (\d+) (\d+\.\d\d)")
ORIG_TICKS = 10          # the original is snapshotted after this tick
CLONE_TICKS = 20         # every clone must print at least this many ticks after its restore
BOOT_TIMEOUT = 240.0     # the original's boot to its first ticks
CLOCK_GAP = 6.0          # seconds between snapshot 1's save and its restores
RESTORE_TIMEOUT = 150.0  # a restore to its "restored" line and CLONE_TICKS ticks
QMP_TIMEOUT = 300.0      # one QMP command (snapshot-create of 256 MiB in the emulated test host)


T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"driver: {msg} [{time.monotonic() - T0:.1f} s]", flush=True)


class StepFailed(Exception):
    pass


class Proc:
    """One VMM process of the scenario (a kit VM) and what the tests read of it: NAME.out (its
    console), NAME.err, NAME.status, and its summary."""

    all: list["Proc"] = []

    def __init__(self, name: str, vm: VM, art: Path):
        self.name, self.vm, self.art = name, vm, art
        self.status: Optional[int] = None
        Proc.all.append(self)

    def start(self) -> "Proc":
        try:
            self.vm.start()
        except KitError as e:
            raise StepFailed(f"{self.name}: did not start: {e}") from None
        log(f"{self.name}: started pid {self.vm.process.pid}: {' '.join(self.vm.argv)}")
        return self

    # -- the console ---------------------------------------------------------------------------
    def lines(self) -> list[str]:
        return self.vm.console.text.split("\n")

    def ticks(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines() if (m := TICK.match(line))]

    def tick_times(self) -> list[list[float]]:
        """[tick number, guest uptime, host time.time() when the line's newline arrived] per whole tick line."""
        out, end = [], 0
        for line in self.lines()[:-1]:
            end += len(line) + 1
            m = TICK.match(line)
            t = self.vm.console.arrival_time(end - 1) if m else None
            if m and t is not None:
                out.append([int(m.group(1)), float(m.group(2)), t])
        return out

    def line_time(self, prefix: str) -> Optional[float]:
        """The host's time.time() when the newline of the first whole line starting with prefix arrived."""
        end = 0
        for line in self.lines()[:-1]:
            end += len(line) + 1
            if line.startswith(prefix):
                return self.vm.console.arrival_time(end - 1)
        return None

    def value_line(self, prefix: str) -> Optional[str]:
        """The first whole line (its newline received) that starts with prefix."""
        return next((line for line in self.lines()[:-1] if line.startswith(prefix)), None)

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        try:
            self.vm.console.wait_until(lambda _text: cond(), timeout, what)
        except KitError as e:
            # The guest's last lines say where it was (a hang at boot, a panic): they go to the
            # driver's output, which a failing test prints, the first line to the step's reason.
            tail = getattr(e, "console_tail", "").rstrip("\n").split("\n")[-12:]
            for line in tail:
                log(f"{self.name} console: {line}")
            for line in self.vm.threads().split("\n"):
                log(f"{self.name} thread {line}")
            raise StepFailed(str(e).splitlines()[0]) from None

    def ticks_after(self, n: int) -> int:
        return sum(1 for t in self.ticks() if t > n)

    # -- QMP -----------------------------------------------------------------------------------
    def cmd(self, name: str, args: Optional[dict] = None) -> object:
        try:
            return self.vm.qmp(name, args, timeout=QMP_TIMEOUT)
        except (QMPError, KitError) as e:
            raise StepFailed(f"{self.name}: {e}") from None

    def quit(self) -> int:
        """QMP quit, then the exit status (the kit ends the VMM if it has not exited 60 s later)."""
        try:
            self.status = self.vm.quit(60)
        except KitError as e:
            log(f"{self.name}: {e}")
        self.finish()
        log(f"{self.name}: exited {self.status}")
        return self.status if self.status is not None else -1

    def finish(self) -> None:
        """Ends the VMM if it still runs and writes its files."""
        self.vm.close()
        if self.status is None:
            self.status = self.vm.exit_status()
        if self.vm.process is not None:
            (self.art / f"{self.name}.out").write_bytes(self.vm.console.raw)
            (self.art / f"{self.name}.err").write_text(self.vm.stderr)
            (self.art / f"{self.name}.status").write_text(f"{self.status}\n")

    def summary(self) -> dict:
        err_lines = self.vm.stderr.splitlines()
        entering = next((line for line in err_lines if "vCPUs entering the guest" in line), None)
        ms = None
        if entering:
            m = re.search(r"([0-9]+(?:\.[0-9]+)?) ?ms after process start", entering)
            ms = float(m.group(1)) if m else None
        events = [{"event": e["event"], "data": e["data"]} for e in self.vm.events.all]
        return {"argv": self.vm.argv, "status": self.status, "events": events,
                "entering_line": entering, "entering_ms": ms, "tick_times": self.tick_times()}


def restored_info(p: Proc, gen: int) -> Optional[dict]:
    """The guest's `case: restored gen=N k=v ...` line for generation gen, parsed (whole lines only:
    one still arriving would lack its last fields)."""
    for line in p.lines()[:-1]:
        if line.startswith("case: restored gen="):
            kv = dict(item.split("=", 1) for item in line[len("case: "):].split() if "=" in item)
            if kv.get("gen") == str(gen):
                return kv
    return None


def file_stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blocks": st.st_blocks}


def dir_usage(path: Path) -> dict:
    files = {f.name: file_stat(f) for f in sorted(path.iterdir()) if f.is_file()}
    return {"files": files, "apparent": sum(f["size"] for f in files.values()),
            "allocated": sum(f["blocks"] * 512 for f in files.values())}


def run_tool(vmm: str, args: list[str], art: Path, name: str, timeout: float = 300) -> int:
    """`swiftvmm ARGS` (no VM: a subcommand, or a start that must be refused), its output in NAME.out."""
    p = subprocess.run([vmm, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    (art / f"{name}.out").write_bytes(p.stdout)
    (art / f"{name}.status").write_text(f"{p.returncode}\n")
    log(f"{name}: `swiftvmm {' '.join(args)}` exited {p.returncode}")
    return p.returncode


def scenario(cmd: list[str], art: Path, tmp: Path, summary: dict) -> None:
    vmm = cmd[0]
    snap1, snap2 = tmp / "snap1", tmp / "snap2"
    mem1 = snap1 / "memory.bin"

    # -- the original ---------------------------------------------------------------------------
    summary["step"] = "original"
    orig = Proc("orig", vm_from_command(cmd, name="orig"), art).start()
    orig.wait_until("'case: ready' line", lambda: orig.value_line("case: ready ") is not None, BOOT_TIMEOUT)
    summary["orig_ready_line_host_time"] = orig.line_time("case: ready ")
    orig.wait_until(f"tick {ORIG_TICKS}", lambda: ORIG_TICKS in orig.ticks(), BOOT_TIMEOUT)
    summary["orig_guid"] = orig.cmd("query-vm-generation-id")["guid"]
    orig.cmd("stop")
    summary["orig_status_stopped"] = orig.cmd("query-status")["status"]
    time.sleep(0.5)  # the console output from before the pause reaches us
    summary["orig_last_tick_before_snapshot"] = max(orig.ticks())
    summary["step"] = "snapshot-create (stopped)"
    t = time.monotonic()
    summary["snap1_requested_host_time"] = time.time()
    summary["snap1_return"] = orig.cmd("snapshot-create", {"path": str(snap1)})
    summary["snap1_saved_host_time"] = time.time()
    summary["snap1_wall_ms"] = (time.monotonic() - t) * 1000
    summary["orig_status_after_snapshot"] = orig.cmd("query-status")["status"]
    time.sleep(0.5)
    summary["orig_ticks_while_stopped"] = [n for n in orig.ticks() if n > summary["orig_last_tick_before_snapshot"]]
    summary["snap1_usage"] = dir_usage(snap1)
    summary["mem1_before"] = file_stat(mem1)
    log(f"snapshot 1: {summary['snap1_return']} in {summary['snap1_wall_ms']:.0f} ms; files {summary['snap1_usage']['files']}")
    orig.quit()
    summary["inspect_status"] = run_tool(vmm, ["snapshot", "inspect", str(snap1)], art, "inspect")

    # -- two clones in parallel -------------------------------------------------------------------
    summary["step"] = "restores of snapshot 1"
    s1 = Snapshot(snap1, vmm)
    info = ["--log-level", "info"]
    a = Proc("clone-a", RestoredVM(s1, vmgenid=None, extra_args=info, name="clone-a"), art)
    b = Proc("clone-b", RestoredVM(s1, vmgenid=None, clock="host", extra_args=info, name="clone-b"), art)
    # The snapshot waits on disk a while: --clock saved must not let that time pass for clone-a's
    # guest, --clock host must for clone-b's.
    time.sleep(max(0.0, summary["snap1_requested_host_time"] + CLOCK_GAP - time.time()))
    summary["clones_started_host_time"] = time.time()
    a.start()
    b.start()
    last = summary["orig_last_tick_before_snapshot"]
    for p in (a, b):
        summary[f"{p.name}_guid"] = p.cmd("query-vm-generation-id")["guid"]
        summary[f"{p.name}_status_at_start"] = p.cmd("query-status")["status"]

    def restored(p: Proc, gen: int) -> None:
        p.wait_until(f"'case: restored gen={gen}' line", lambda: restored_info(p, gen) is not None, RESTORE_TIMEOUT)
        summary[f"{p.name}_restored_line_host_time"] = p.line_time(f"case: restored gen={gen} ")

    def echoed_and_ticking(p: Proc, gen: int, base_tick: int) -> None:
        p.vm.console.send(f"poke-{p.name}\n")
        p.wait_until("echo of the input line", lambda: p.value_line(f"case: input=poke-{p.name}") is not None, 60)
        p.wait_until(f"{CLONE_TICKS} ticks after the restore", lambda: p.ticks_after(base_tick) >= CLONE_TICKS,
                     RESTORE_TIMEOUT)
        log(f"{p.name}: restored ({restored_info(p, gen)}), {p.ticks_after(base_tick)} ticks since")

    # Both clones run side by side; each one's "restored" line is timed by when it arrived.
    restored(a, 1)
    restored(b, 1)
    echoed_and_ticking(a, 1, last)
    echoed_and_ticking(b, 1, last)

    # -- a snapshot of a running clone, and its restore ---------------------------------------------
    summary["step"] = "snapshot-create (running clone-a)"
    summary["clone-a_last_tick_before_snapshot"] = max(a.ticks())
    t = time.monotonic()
    summary["snap2_return"] = a.cmd("snapshot-create", {"path": str(snap2), "live": True})
    summary["snap2_wall_ms"] = (time.monotonic() - t) * 1000
    summary["clone-a_last_tick_at_reply"] = max(a.ticks())
    summary["clone-a_status_after_snapshot"] = a.cmd("query-status")["status"]
    summary["snap2_usage"] = dir_usage(snap2)
    log(f"snapshot 2: {summary['snap2_return']} in {summary['snap2_wall_ms']:.0f} ms")
    at_reply = summary["clone-a_last_tick_at_reply"]
    a.wait_until("5 ticks after the snapshot", lambda: a.ticks_after(at_reply) >= 5, 60)
    a.quit()

    summary["step"] = "restore of snapshot 2"
    a2 = Proc("clone-a2", RestoredVM(Snapshot(snap2, vmm), vmgenid=None, extra_args=info, name="clone-a2"), art).start()
    summary["clone-a2_guid"] = a2.cmd("query-vm-generation-id")["guid"]
    summary["clone-a2_status_at_start"] = a2.cmd("query-status")["status"]
    restored(a2, 2)
    echoed_and_ticking(a2, 2, summary["clone-a_last_tick_before_snapshot"])
    a2.quit()
    b.quit()

    summary["step"] = "checking snapshot 1 after its restores"
    summary["mem1_after"] = file_stat(mem1)
    if summary["mem1_after"]["blocks"] != summary["mem1_before"]["blocks"]:
        log(f"snapshot 1: memory.bin's allocation went from {summary['mem1_before']['blocks'] * 512} to "
            f"{summary['mem1_after']['blocks'] * 512} bytes (size and mtime "
            f"{'unchanged' if summary['mem1_after']['mtime_ns'] == summary['mem1_before']['mtime_ns'] else 'CHANGED'})")
    summary["verify_status"] = run_tool(vmm, ["snapshot", "verify", str(snap1)], art, "verify")
    summary["verify2_status"] = run_tool(vmm, ["snapshot", "verify", str(snap2)], art, "verify2")
    summary["snap1_files_after"] = sorted(f.name for f in snap1.iterdir())
    summary["step"] = "done"


class Terminated(Exception):
    pass


def run_scenario(scenario_fn: Callable[[Path, Path, dict], None], art_prefix: str, tmp: Optional[Path] = None,
                 cleanup: Optional[Callable[[], None]] = None) -> int:
    """The frame of a scenario driver: an artifacts directory ($E2E_ARTIFACTS), a private directory
    (removed at the end), SIGTERM ending the scenario, every VMM ended and its files written
    whatever happened, summary.json; the log says where it stopped. Exit status 0 when complete."""
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix=art_prefix))
    art.mkdir(parents=True, exist_ok=True)
    tmp = tmp or Path(tempfile.mkdtemp(prefix="swiftvmm-snap-"))
    log(f"artifacts in {art}, private files in {tmp}")
    summary: dict = {"step": "start"}

    def terminate(_sig: int, _frame: object) -> None:
        raise Terminated()
    signal.signal(signal.SIGTERM, terminate)
    status = 1
    try:
        scenario_fn(art, tmp, summary)
        status = 0
    except StepFailed as e:
        log(f"FAILED at step {summary.get('step')}: {e}")
        summary["error"] = str(e)
    except Terminated:
        log(f"terminated at step {summary.get('step')}")
        summary["error"] = "terminated"
    except Exception as e:  # noqa: BLE001 - reported, the VMMs are still cleaned up
        log(f"FAILED at step {summary.get('step')}: {type(e).__name__}: {e}")
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for p in Proc.all:
            if p.vm.running:
                log(f"{p.name}: still running: ended")
            p.finish()
        if cleanup is not None:
            cleanup()
        summary["processes"] = {p.name: p.summary() for p in Proc.all}
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"scenario {'complete' if status == 0 else 'incomplete'}")
    return status


if __name__ == "__main__":
    sys.exit(run_scenario(lambda art, tmp, summary: scenario(sys.argv[1:], art, tmp, summary),
                          "swiftvmm-snapshot-e2e-"))
