"""Scenario driver for the snapshot end-to-end test (a GuestRun.driver; see test_snapshot.py).

Started inside the test host as `python3 snapshot_driver.py VMM run --kernel ... (the VMM command)`,
it runs several swiftvmm processes, in sequence and in parallel, talking to each with the real QMP
client library (qemu.qmp):

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
Snapshots and QMP sockets live in a private directory under $TMPDIR (tmpfs in the test host), removed
at the end. SIGTERM (the harness's timeout) kills every VMM this driver started.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from qemu.qmp import QMPClient

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


class VMProc:
    """One VMM process: console to NAME.out (and kept in memory), stderr to NAME.err, a QMP client."""

    all: list["VMProc"] = []

    def __init__(self, name: str, argv: list[str], sock: str, art: Path):
        self.name, self.argv, self.sock, self.art = name, argv, sock, art
        self.raw = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (len(raw) after a chunk, host time.time() of it)
        self.err_lines: list[str] = []
        self.events: list[dict] = []
        self.qmp: Optional[QMPClient] = None
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.status: Optional[int] = None
        self.tasks: list[asyncio.Task] = []
        self.listener: Optional[asyncio.Task] = None
        self.t0 = 0.0
        VMProc.all.append(self)

    async def start(self) -> None:
        self.t0 = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        log(f"{self.name}: started pid {self.proc.pid}: {' '.join(self.argv)}")
        self.tasks.append(asyncio.create_task(self._pump_out()))
        self.tasks.append(asyncio.create_task(self._pump_err()))
        self.qmp = QMPClient(f"e2e-{self.name}")
        deadline = time.monotonic() + 120
        while True:
            try:
                await self.qmp.connect(self.sock)
                break
            except Exception as e:  # noqa: BLE001 - the socket appears once the VMM is up
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    raise StepFailed(f"{self.name}: could not connect to its QMP socket ({e}); "
                                     f"exit status {self.proc.returncode}") from e
                await asyncio.sleep(0.05)
        self.listener = asyncio.create_task(self._listen())

    async def _pump_out(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.art / f"{self.name}.out", "wb") as f:
            while chunk := await self.proc.stdout.read(65536):
                self.raw += chunk
                self.arrivals.append((len(self.raw), time.time()))
                f.write(chunk)
                f.flush()

    async def _pump_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.art / f"{self.name}.err", "wb") as f:
            async for line in self.proc.stderr:
                self.err_lines.append(line.decode("utf-8", "replace").rstrip("\n"))
                f.write(line)
                f.flush()

    async def _listen(self) -> None:
        assert self.qmp is not None
        async for ev in self.qmp.events:
            self.events.append({"event": ev["event"], "data": ev.get("data", {})})

    # -- the console ---------------------------------------------------------------------------
    def lines(self) -> list[str]:
        return self.raw.decode("utf-8", "replace").replace("\r", "").split("\n")

    def ticks(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines() if (m := TICK.match(line))]

    def tick_times(self) -> list[list[float]]:
        """[tick number, guest uptime, host time.time() when the line's newline arrived] per whole tick line."""
        out, end = [], 0
        text = self.raw.decode("utf-8", "replace")
        for line in text.split("\n")[:-1]:
            end += len(line.encode("utf-8", "replace")) + 1
            m = TICK.match(line.replace("\r", ""))
            if m:
                t = next((t for n, t in self.arrivals if n >= end), None)
                if t is not None:
                    out.append([int(m.group(1)), float(m.group(2)), t])
        return out

    def value_line(self, prefix: str) -> Optional[str]:
        """The first whole line (its newline received) that starts with prefix."""
        for line in self.lines()[:-1]:
            if line.startswith(prefix):
                return line
        return None

    async def wait_until(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc is not None and self.proc.returncode is not None:
                await asyncio.sleep(0.2)  # the last output
                if cond():
                    return
                err = " | ".join(line for line in self.err_lines[-8:] if line.strip())
                raise StepFailed(f"{self.name}: exited {self.proc.returncode} before {what}; its last stderr lines: {err or '(none)'}")
            if time.monotonic() > deadline:
                raise StepFailed(f"{self.name}: no {what} within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def ticks_after(self, n: int) -> int:
        return sum(1 for t in self.ticks() if t > n)

    async def send_input(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        await self.proc.stdin.drain()

    # -- QMP -----------------------------------------------------------------------------------
    async def cmd(self, name: str, args: Optional[dict] = None) -> object:
        assert self.qmp is not None
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args), QMP_TIMEOUT)
        except asyncio.TimeoutError as e:
            raise StepFailed(f"{self.name}: QMP {name} did not answer within {QMP_TIMEOUT:.0f} s") from e
        except Exception as e:  # noqa: BLE001 - an error reply (ExecuteError) or a lost connection
            raise StepFailed(f"{self.name}: QMP {name} {json.dumps(args) if args else ''} failed: "
                             f"{type(e).__name__}: {e}") from e

    async def quit(self) -> int:
        """QMP quit, then the exit status (the VMM is killed if it has not exited 60 s later)."""
        assert self.proc is not None
        try:
            await self.cmd("quit")
        except StepFailed as e:
            log(f"{self.name}: {e}")
        try:
            self.status = await asyncio.wait_for(self.proc.wait(), 60)
        except asyncio.TimeoutError:
            log(f"{self.name}: still running 60 s after quit: killed")
            self.proc.kill()
            self.status = await self.proc.wait()
        await asyncio.sleep(0.1)
        await self.close()
        (self.art / f"{self.name}.status").write_text(f"{self.status}\n")
        log(f"{self.name}: exited {self.status}")
        return self.status

    async def close(self) -> None:
        if self.qmp is not None:
            try:
                await self.qmp.disconnect()
            except Exception:  # noqa: BLE001
                pass
        if self.listener is not None:
            self.listener.cancel()  # the event iterator does not end by itself
        for t in self.tasks:  # the output pumps end with the process
            try:
                await asyncio.wait_for(t, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                t.cancel()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def summary(self) -> dict:
        entering = next((line for line in self.err_lines if "vCPUs entering the guest" in line), None)
        ms = None
        if entering:
            m = re.search(r"([0-9]+(?:\.[0-9]+)?) ?ms after process start", entering)
            ms = float(m.group(1)) if m else None
        return {"argv": self.argv, "status": self.status, "events": self.events,
                "entering_line": entering, "entering_ms": ms, "tick_times": self.tick_times()}


def restored_info(p: VMProc, gen: int) -> Optional[dict]:
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


async def run_tool(vmm: str, args: list[str], art: Path, name: str) -> int:
    p = await asyncio.create_subprocess_exec(vmm, *args, stdin=asyncio.subprocess.DEVNULL,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), 300)
    (art / f"{name}.out").write_bytes(out)
    (art / f"{name}.status").write_text(f"{p.returncode}\n")
    log(f"{name}: `swiftvmm {' '.join(args)}` exited {p.returncode}")
    return p.returncode


async def scenario(cmd: list[str], art: Path, tmp: Path, summary: dict) -> None:
    if len(cmd) < 2 or cmd[1] != "run":
        raise StepFailed(f"expected a `swiftvmm run ...` command, got {cmd}")
    vmm = cmd[0]
    snap1, snap2 = tmp / "snap1", tmp / "snap2"
    mem1 = snap1 / "memory.bin"

    # -- the original ---------------------------------------------------------------------------
    summary["step"] = "original"
    orig = VMProc("orig", [*cmd, "--qmp", str(tmp / "orig.sock")], str(tmp / "orig.sock"), art)
    await orig.start()
    await orig.wait_until("'case: ready' line", lambda: orig.value_line("case: ready ") is not None, BOOT_TIMEOUT)
    summary["orig_ready_line_host_time"] = time.time()
    await orig.wait_until(f"tick {ORIG_TICKS}", lambda: ORIG_TICKS in orig.ticks(), BOOT_TIMEOUT)
    summary["orig_guid"] = (await orig.cmd("query-vm-generation-id"))["guid"]
    await orig.cmd("stop")
    summary["orig_status_stopped"] = (await orig.cmd("query-status"))["status"]
    await asyncio.sleep(0.5)  # the console output from before the pause reaches us
    summary["orig_last_tick_before_snapshot"] = max(orig.ticks())
    summary["step"] = "snapshot-create (stopped)"
    t = time.monotonic()
    summary["snap1_requested_host_time"] = time.time()
    summary["snap1_return"] = await orig.cmd("snapshot-create", {"path": str(snap1)})
    summary["snap1_saved_host_time"] = time.time()
    summary["snap1_wall_ms"] = (time.monotonic() - t) * 1000
    summary["orig_status_after_snapshot"] = (await orig.cmd("query-status"))["status"]
    await asyncio.sleep(0.5)
    summary["orig_ticks_while_stopped"] = [n for n in orig.ticks() if n > summary["orig_last_tick_before_snapshot"]]
    summary["snap1_usage"] = dir_usage(snap1)
    summary["mem1_before"] = file_stat(mem1)
    log(f"snapshot 1: {summary['snap1_return']} in {summary['snap1_wall_ms']:.0f} ms; files {summary['snap1_usage']['files']}")
    await orig.quit()
    summary["inspect_status"] = await run_tool(vmm, ["snapshot", "inspect", str(snap1)], art, "inspect")

    # -- two clones in parallel -------------------------------------------------------------------
    summary["step"] = "restores of snapshot 1"
    restore_args = ["--log-level", "info"]
    a = VMProc("clone-a", [vmm, "restore", str(snap1), "--qmp", str(tmp / "a.sock"), *restore_args], str(tmp / "a.sock"), art)
    b = VMProc("clone-b", [vmm, "restore", str(snap1), "--qmp", str(tmp / "b.sock"), "--clock", "host", *restore_args],
               str(tmp / "b.sock"), art)
    # The snapshot waits on disk a while: --clock saved must not let that time pass for clone-a's
    # guest, --clock host must for clone-b's.
    await asyncio.sleep(max(0.0, summary["snap1_requested_host_time"] + CLOCK_GAP - time.time()))
    summary["clones_started_host_time"] = time.time()
    await asyncio.gather(a.start(), b.start())
    last = summary["orig_last_tick_before_snapshot"]
    for p in (a, b):
        summary[f"{p.name}_guid"] = (await p.cmd("query-vm-generation-id"))["guid"]
        summary[f"{p.name}_status_at_start"] = (await p.cmd("query-status"))["status"]

    async def restored_and_ticking(p: VMProc, gen: int, base_tick: int) -> None:
        await p.wait_until(f"'case: restored gen={gen}' line", lambda: restored_info(p, gen) is not None, RESTORE_TIMEOUT)
        summary[f"{p.name}_restored_line_host_time"] = time.time()
        await p.send_input(f"poke-{p.name}\n")
        await p.wait_until("echo of the input line", lambda: p.value_line(f"case: input=poke-{p.name}") is not None, 60)
        await p.wait_until(f"{CLONE_TICKS} ticks after the restore",
                           lambda: p.ticks_after(base_tick) >= CLONE_TICKS, RESTORE_TIMEOUT)
        log(f"{p.name}: restored ({restored_info(p, gen)}), {p.ticks_after(base_tick)} ticks since")

    await asyncio.gather(restored_and_ticking(a, 1, last), restored_and_ticking(b, 1, last))

    # -- a snapshot of a running clone, and its restore ---------------------------------------------
    summary["step"] = "snapshot-create (running clone-a)"
    summary["clone-a_last_tick_before_snapshot"] = max(a.ticks())
    t = time.monotonic()
    summary["snap2_return"] = await a.cmd("snapshot-create", {"path": str(snap2), "live": True})
    summary["snap2_wall_ms"] = (time.monotonic() - t) * 1000
    summary["clone-a_last_tick_at_reply"] = max(a.ticks())
    summary["clone-a_status_after_snapshot"] = (await a.cmd("query-status"))["status"]
    summary["snap2_usage"] = dir_usage(snap2)
    log(f"snapshot 2: {summary['snap2_return']} in {summary['snap2_wall_ms']:.0f} ms")
    at_reply = summary["clone-a_last_tick_at_reply"]
    await a.wait_until("5 ticks after the snapshot", lambda: a.ticks_after(at_reply) >= 5, 60)
    await a.quit()

    summary["step"] = "restore of snapshot 2"
    a2 = VMProc("clone-a2", [vmm, "restore", str(snap2), "--qmp", str(tmp / "a2.sock"), *restore_args], str(tmp / "a2.sock"), art)
    await a2.start()
    summary["clone-a2_guid"] = (await a2.cmd("query-vm-generation-id"))["guid"]
    summary["clone-a2_status_at_start"] = (await a2.cmd("query-status"))["status"]
    await restored_and_ticking(a2, 2, summary["clone-a_last_tick_before_snapshot"])
    await a2.quit()
    await b.quit()

    summary["step"] = "checking snapshot 1 after its restores"
    summary["mem1_after"] = file_stat(mem1)
    if summary["mem1_after"]["blocks"] != summary["mem1_before"]["blocks"]:
        log(f"snapshot 1: memory.bin's allocation went from {summary['mem1_before']['blocks'] * 512} to "
            f"{summary['mem1_after']['blocks'] * 512} bytes (size and mtime "
            f"{'unchanged' if summary['mem1_after']['mtime_ns'] == summary['mem1_before']['mtime_ns'] else 'CHANGED'})")
    summary["verify_status"] = await run_tool(vmm, ["snapshot", "verify", str(snap1)], art, "verify")
    summary["verify2_status"] = await run_tool(vmm, ["snapshot", "verify", str(snap2)], art, "verify2")
    summary["snap1_files_after"] = sorted(f.name for f in snap1.iterdir())
    summary["step"] = "done"


async def main(cmd: list[str]) -> int:
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix="swiftvmm-snapshot-e2e-"))
    art.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="swiftvmm-snap-"))
    log(f"artifacts in {art}, snapshots in {tmp}")
    summary: dict = {"step": "start"}
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    loop.add_signal_handler(signal.SIGTERM, lambda: main_task.cancel() if main_task else None)
    status = 1
    try:
        await scenario(cmd, art, tmp, summary)
        status = 0
    except StepFailed as e:
        log(f"FAILED at step {summary.get('step')}: {e}")
    except asyncio.CancelledError:
        log(f"terminated at step {summary.get('step')}")
    except Exception as e:  # noqa: BLE001 - reported, the VMMs are still cleaned up
        log(f"FAILED at step {summary.get('step')}: {type(e).__name__}: {e}")
    finally:
        for p in VMProc.all:
            if p.proc is not None and p.proc.returncode is None:
                log(f"{p.name}: still running: killed")
            p.kill()
        summary["processes"] = {p.name: p.summary() for p in VMProc.all}
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"scenario {'complete' if status == 0 else 'incomplete'}")
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
