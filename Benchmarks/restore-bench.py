#!/usr/bin/env python3
"""Snapshot restore latency of swiftvmm against QEMU (run by restore-bench.sh, where the VMMs run).

The guest (the test kernel + an initramfs whose case script prints `t<N>` every ~5 ms, counting in
guest memory) is booted once per VMM with a QMP socket; once it ticks, a snapshot is taken:
  swiftvmm  QMP snapshot-create {"path": DIR} on the running guest (pauses, writes, resumes);
            figures: its reply's time-ms and pause-ms, the command's round trip, its reply's size,
            du of DIR; then a second, live snapshot of the same guest ({"live": true}): its
            time-ms and pause-ms (the guest pause, against QEMU's downtime)
  QEMU      QMP migrate {"uri": "exec:cat > FILE"} on the running guest (QEMU 7.2 has no
            `file:` migration URI), polled with query-migrate until completed; max-bandwidth is
            raised first so that QEMU's default throttle does not count; figures: total-time,
            downtime (the part the guest was paused), the wall time until completed, file size, du
Then the original quits and the snapshot is restored N times per VMM, in rounds whose order rotates
(a restore can be slowed by the teardown of the one before):
  swiftvmm  swiftvmm restore DIR --qmp SOCK --log-level info (swiftvmm-nows: plus --no-working-set;
            the first swiftvmm restore records the working set, later ones prefetch it)
  QEMU      the same command line as the original plus -incoming "exec:cat FILE", with its QMP
            socket in wait=on mode (QEMU waits for this client before it starts, so no event is
            missed); the source was running, so QEMU resumes the guest by itself after loading
Measured per restore, from just before the process is spawned:
  running   swiftvmm: the number in its log line "vCPUs entering the guest ... N ms after process
            start"; QEMU: the timestamp of its RESUME event minus the spawn time (both wall clock)
  prints    the arrival of the first `t<N>` line on the VMM's stdout (the restored guest printing)
  memory in swiftvmm: the resident size of its memory.bin mapping after that line (/proc/PID/smaps),
            the part of the snapshot's memory the restore brought in (QEMU reads its whole file)
then a few more ticks are awaited (the guest keeps running) and the VMM is told to quit.
After each round: process start-up alone, spawn to exit of /bin/true and of each VMM's --version
(in the emulated test host a process start costs hundreds of milliseconds, which every restore pays).
Prints per-run lines, min/median per VMM, the ratios swiftvmm/QEMU and the snapshot figures.

--snapshot-after SECONDS is for a host whose /dev/kvm cannot boot Linux in useful time (kvm_pvm):
the originals are snapshotted that long after they start, wherever the guest is (early in the
kernel, printing nothing), swiftvmm gets --allow-slow-kvm, and only process start -> running is
measured (each restore runs for half a second, then quits).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

TICK = re.compile(rb"^t(\d+)\s*$")
ENTERING = re.compile(r"vCPUs entering the guest.*?([0-9]+(?:\.[0-9]+)?) ?ms after process start")


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


class QMP:
    """A minimal synchronous QMP client that keeps the events it reads."""

    def __init__(self, path: str, deadline: float, alive: Callable[[], bool]):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or not alive():
                    raise RuntimeError(f"could not connect to the QMP socket {path}")
                time.sleep(0.001)
        self.s = s
        self.buf = b""
        self.events: list[dict] = []
        self.greeting = self._message()
        if "QMP" not in self.greeting:
            raise RuntimeError(f"not a QMP greeting: {self.greeting}")
        self.command("qmp_capabilities")

    def _message(self, timeout: Optional[float] = 120) -> dict:
        self.s.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def command(self, name: str, args: Optional[dict] = None, timeout: float = 300):
        msg: dict = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            m = self._message(timeout)
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise RuntimeError(f"QMP {name} failed: {m['error']}")
            elif "return" in m:
                return m["return"]

    def wait_event(self, name: str, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                m = self._message(left)
            except (socket.timeout, TimeoutError):
                return None
            if "event" in m:
                self.events.append(m)

    def quit(self) -> None:
        try:
            self.command("quit", timeout=30)
        except (EOFError, OSError, RuntimeError):
            pass
        self.s.close()


class VMM:
    """A VMM process: stdout (the guest's console) and stderr read by threads, each line kept with
    its arrival time (time.monotonic); spawn time kept as both monotonic and wall clock."""

    def __init__(self, cmd: list[str], name: str, workdir: str):
        self.name = name
        self.cmd = cmd
        self.out: list[tuple[float, bytes]] = []
        self.err: list[tuple[float, bytes]] = []
        self.cond = threading.Condition()
        self.t0_wall = time.time()
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.threads = [threading.Thread(target=self._pump, args=(self.p.stdout, self.out), daemon=True),
                        threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True)]
        for t in self.threads:
            t.start()
        self.workdir = workdir

    def _pump(self, stream, into: list) -> None:
        for line in stream:
            with self.cond:
                into.append((time.monotonic(), line))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait_for(self, pred: Callable[[bytes], bool], timeout: float, stream: str = "out",
                 start: int = 0) -> Optional[tuple[int, float, bytes]]:
        """The first line at index >= start of stdout (or stderr) matching pred: (index, time, line)."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(lines):
                    t, line = lines[i]
                    if pred(line):
                        return i, t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not any(t.is_alive() for t in self.threads)):
                    return None
                self.cond.wait(min(left, 0.5))

    def ticks(self) -> list[int]:
        with self.cond:
            return [int(m.group(1)) for _, line in self.out if (m := TICK.match(line))]

    def tail(self, n: int = 15) -> str:
        with self.cond:
            out = [line.decode("utf-8", "replace").rstrip() for _, line in self.out[-n:]]
            err = [line.decode("utf-8", "replace").rstrip() for _, line in self.err[-n:]]
        return "\n".join([f"--- last stdout lines of {self.name}:", *out, f"--- last stderr lines of {self.name}:", *err])

    def finish(self, qmp: Optional[QMP]) -> int:
        if qmp is not None:
            qmp.quit()
        try:
            return self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def connect(vmm: VMM, sock: str) -> QMP:
    try:
        return QMP(sock, time.monotonic() + 60, vmm.alive)
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        time.sleep(0.2)
        raise RuntimeError(f"{vmm.name}: QMP: {type(e).__name__}: {e}\n{vmm.tail()}") from e


def is_tick(line: bytes) -> bool:
    return TICK.match(line) is not None


def disk_usage(path: str) -> int:
    """Bytes allocated on disk (st_blocks) for a file or every file under a directory."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def apparent_size(path: str) -> int:
    if os.path.isfile(path):
        return os.stat(path).st_size
    return sum(os.stat(os.path.join(r, f)).st_size for r, _, fs in os.walk(path) for f in fs)


def mapped_kib(pid: int, name: str) -> float:
    """Resident KiB of the process's mappings of files called `name` (/proc/PID/smaps): how much
    of the snapshot's memory file the restored guest has brought in."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) >= 6 and head[5].endswith("/" + name)
                elif inside and line.startswith("Rss:"):
                    total += int(head[1])
    except OSError:
        return float("nan")
    return float(total)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = tempfile.mkdtemp(prefix="restore-bench-")
        self.cmdline = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
        self.qemu_base = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", a.qemu_cpu, "-m", a.memory,
                          "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                          "-serial", "stdio", "-kernel", a.kernel, "-initrd", a.initrd, "-append", self.cmdline]
        self.qemu_file = os.path.join(self.work, "qemu-migration.bin")
        self.swift_dir = os.path.join(self.work, "swiftvmm-snapshot")
        self.snap: dict[str, dict] = {}
        self.results: dict[str, list[dict]] = {"swiftvmm": [], "qemu": [], "swiftvmm-nows": []}
        # Process start-up alone in this host, measured in the same rounds: spawn to exit of a
        # trivial program and of each VMM printing its version (parse, print, exit; no VM).
        self.startup: dict[str, list[float]] = {}
        self.slow = ["--allow-slow-kvm"] if a.snapshot_after is not None else []

    def sock(self, name: str) -> str:
        p = os.path.join(self.work, f"{name}.sock")
        if os.path.exists(p):
            os.unlink(p)
        return p

    # -- the originals and their snapshots --------------------------------------------------------
    def boot_until_ticking(self, vmm: VMM) -> int:
        """Waits until the guest has printed a few hundred ticks; returns the last tick seen.
        With --snapshot-after: waits that long and returns 0."""
        if self.a.snapshot_after is not None:
            time.sleep(self.a.snapshot_after)
            if not vmm.alive():
                raise RuntimeError(f"{vmm.name}: exited early\n{vmm.tail()}")
            return 0
        hit = vmm.wait_for(lambda line: (m := TICK.match(line)) is not None and int(m.group(1)) >= 200,
                           self.a.boot_timeout)
        if hit is None:
            raise RuntimeError(f"{vmm.name}: the guest did not tick within {self.a.boot_timeout} s\n{vmm.tail()}")
        return int(TICK.match(hit[2]).group(1))

    def snapshot_qemu(self) -> None:
        sock = self.sock("qemu-orig")
        vmm = VMM(self.qemu_base + ["-qmp", f"unix:{sock},server=on,wait=off"], "qemu original", self.work)
        try:
            qmp = connect(vmm, sock)
            tick = self.boot_until_ticking(vmm)
            boot_s = time.monotonic() - vmm.t0
            # QEMU throttles migration to 128 MiB/s by default; a save to a local file should not be.
            qmp.command("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            t = time.monotonic()
            qmp.command("migrate", {"uri": f"exec:cat > {self.qemu_file}"})
            while True:
                try:
                    st = qmp.command("query-migrate")
                except (OSError, EOFError) as e:
                    # Seen in the test host: QEMU's original ended during the migration.
                    time.sleep(0.2)
                    raise RuntimeError(f"qemu original: stopped answering QMP during the migration "
                                       f"({type(e).__name__}: {e})\n{vmm.tail()}") from e
                if st.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.005)
            wall_ms = (time.monotonic() - t) * 1000
            if st.get("status") != "completed":
                raise RuntimeError(f"QEMU migration to a file failed: {st}")
            if not st.get("total-time"):
                # Seen once: "completed" with total-time and downtime 0; asked again, QEMU has them.
                time.sleep(0.1)
                st = qmp.command("query-migrate")
            if not st.get("total-time"):
                log(f"qemu original: query-migrate gives no total-time ({st}); using the wall time, downtime unknown")
                st = {"total-time": wall_ms, "downtime": float("nan")}
            status = qmp.command("query-status")["status"]
            self.snap["qemu"] = {"time_ms": float(st.get("total-time", "nan")), "downtime_ms": float(st.get("downtime", "nan")),
                                 "wall_ms": wall_ms, "size": apparent_size(self.qemu_file),
                                 "du": disk_usage(self.qemu_file), "tick": tick, "status_after": status}
            log(f"qemu original: snapshotted {boot_s:.1f} s after its start; migrate to file: total-time "
                f"{self.snap['qemu']['time_ms']:.0f} ms, downtime {self.snap['qemu']['downtime_ms']:.0f} ms, "
                f"{wall_ms:.0f} ms until completed, {mib(self.snap['qemu']['size'])} ({mib(self.snap['qemu']['du'])} on disk); "
                f"source status {status}")
            vmm.finish(qmp)
        finally:
            vmm.kill()

    def snapshot_swiftvmm(self) -> None:
        sock = self.sock("swiftvmm-orig")
        vmm = VMM([self.a.swiftvmm, "run", "--kernel", self.a.kernel, "--initrd", self.a.initrd, "--cmdline",
                   self.cmdline, "--memory", self.a.memory, "--qmp", sock, *self.slow], "swiftvmm original", self.work)
        try:
            qmp = connect(vmm, sock)
            tick = self.boot_until_ticking(vmm)
            boot_s = time.monotonic() - vmm.t0
            t = time.monotonic()
            r = qmp.command("snapshot-create", {"path": self.swift_dir})
            wall_ms = (time.monotonic() - t) * 1000
            status = qmp.command("query-status")["status"]
            self.snap["swiftvmm"] = {"time_ms": float(r.get("time-ms", float("nan"))), "wall_ms": wall_ms,
                                     "pause_ms": float(r.get("pause-ms", float("nan"))),
                                     "size": int(r.get("size", -1)), "apparent": apparent_size(self.swift_dir),
                                     "du": disk_usage(self.swift_dir), "tick": tick, "status_after": status}
            s = self.snap["swiftvmm"]
            log(f"swiftvmm original: snapshotted {boot_s:.1f} s after its start; snapshot-create: time-ms {s['time_ms']:.1f}, "
                f"pause-ms {s['pause_ms']:.1f}, round trip {wall_ms:.1f} ms, size {mib(s['size'])} (files {mib(s['apparent'])}, "
                f"{mib(s['du'])} on disk); status afterwards {status}")
            if status != "running":
                raise RuntimeError(f"swiftvmm: after snapshot-create on a running guest the status is {status!r}")
            # The same guest once more, live: the guest pause is what QEMU's downtime measures.
            live_dir = self.swift_dir + "-live"
            r = qmp.command("snapshot-create", {"path": live_dir, "live": True})
            self.snap["swiftvmm-live"] = {"time_ms": float(r.get("time-ms", float("nan"))),
                                          "pause_ms": float(r.get("pause-ms", float("nan"))), "du": disk_usage(live_dir)}
            shutil.rmtree(live_dir, ignore_errors=True)
            s = self.snap["swiftvmm-live"]
            log(f"swiftvmm original: live snapshot-create: time-ms {s['time_ms']:.1f}, pause-ms {s['pause_ms']:.2f}")
            vmm.finish(qmp)
        finally:
            vmm.kill()

    # -- restores -----------------------------------------------------------------------------
    def after_start(self, vmm: VMM, qmp: QMP, tick_at_snapshot: int) -> dict:
        if self.a.snapshot_after is not None:
            time.sleep(0.5)
            if not vmm.alive():
                raise RuntimeError(f"{vmm.name}: exited early\n{vmm.tail()}")
            return {"prints_ms": float("nan"), "first_tick": 0}
        first = vmm.wait_for(is_tick, self.a.restore_timeout)
        if first is None:
            raise RuntimeError(f"{vmm.name}: the restored guest printed nothing within {self.a.restore_timeout} s\n{vmm.tail()}")
        idx, t, line = first
        n = int(TICK.match(line).group(1))
        # A few more ticks: the restored guest keeps running.
        more = vmm.wait_for(lambda l: (m := TICK.match(l)) is not None and int(m.group(1)) >= n + 5, 60, start=idx)
        if more is None:
            raise RuntimeError(f"{vmm.name}: the restored guest stopped ticking after t{n}\n{vmm.tail()}")
        if n <= tick_at_snapshot:
            raise RuntimeError(f"{vmm.name}: the restored guest's first tick t{n} is not after t{tick_at_snapshot}, "
                               f"which the original printed before the snapshot")
        return {"prints_ms": (t - vmm.t0) * 1000, "first_tick": n}

    def restore_qemu(self, run: int) -> dict:
        sock = self.sock("qemu-restore")
        vmm = VMM(self.qemu_base + ["-qmp", f"unix:{sock},server=on,wait=on", "-incoming", f"exec:cat {self.qemu_file}"],
                  f"qemu restore {run}", self.work)
        try:
            qmp = connect(vmm, sock)
            ev = qmp.wait_event("RESUME", self.a.restore_timeout)
            if ev is None:
                st = qmp.command("query-status")
                raise RuntimeError(f"{vmm.name}: no RESUME event within {self.a.restore_timeout} s (status {st})\n{vmm.tail()}")
            ts = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
            r = {"running_ms": (ts - vmm.t0_wall) * 1000}
            r.update(self.after_start(vmm, qmp, self.snap["qemu"]["tick"]))
            r["exit"] = vmm.finish(qmp)
            return r
        finally:
            vmm.kill()

    def restore_swiftvmm(self, run: int, extra: list[str]) -> dict:
        sock = self.sock("swiftvmm-restore")
        vmm = VMM([self.a.swiftvmm, "restore", self.swift_dir, "--qmp", sock, "--log-level", "info", *self.slow,
                   *self.a.restore_arg, *extra],
                  f"swiftvmm restore {run}", self.work)
        try:
            qmp = connect(vmm, sock)
            hit = vmm.wait_for(lambda l: ENTERING.search(l.decode("utf-8", "replace")) is not None,
                               self.a.restore_timeout, stream="err")
            if hit is None:
                raise RuntimeError(f"{vmm.name}: no 'vCPUs entering the guest ... ms after process start' log line\n{vmm.tail()}")
            r = {"running_ms": float(ENTERING.search(hit[2].decode("utf-8", "replace")).group(1)),
                 "log_seen_ms": (hit[1] - vmm.t0) * 1000}
            r.update(self.after_start(vmm, qmp, self.snap["swiftvmm"]["tick"]))
            r["memory_in_kib"] = mapped_kib(vmm.p.pid, "memory.bin")
            r["exit"] = vmm.finish(qmp)
            return r
        finally:
            vmm.kill()

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> int:
        vmms = self.a.vmms
        try:
            if "qemu" in vmms:
                self.snapshot_qemu()
            if "swiftvmm" in vmms or "swiftvmm-nows" in vmms:
                self.snapshot_swiftvmm()
            for i in range(1, self.a.runs + 1):
                # Each round in another order: a restore can be slowed by the teardown of the one before.
                k = (i - 1) % len(vmms)
                for name in vmms[k:] + vmms[:k]:
                    r = (self.restore_qemu(i) if name == "qemu"
                         else self.restore_swiftvmm(i, ["--no-working-set"] if name == "swiftvmm-nows" else []))
                    self.results[name].append(r)
                    extra = f", log line read after {r['log_seen_ms']:.1f} ms" if "log_seen_ms" in r else ""
                    prints = (f", first guest print t{r['first_tick']} after {r['prints_ms']:.2f} ms"
                              if r["prints_ms"] == r["prints_ms"] else "")
                    log(f"{name} restore {i}: running after {r['running_ms']:.2f} ms{prints}{extra}; exit {r['exit']}")
                self.measure_startup(vmms)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        self.report()
        return 0

    def measure_startup(self, vmms: list[str]) -> None:
        cmds = {"/bin/true": ["/bin/true"]}
        if "qemu" in vmms:
            cmds["qemu --version"] = [self.qemu_base[0], "--version"]
        if self.a.swiftvmm:
            cmds["swiftvmm --version"] = [self.a.swiftvmm, "--version"]
        for name, cmd in cmds.items():
            t = time.monotonic()
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            self.startup.setdefault(name, []).append((time.monotonic() - t) * 1000)

    def report(self) -> None:
        def stats(name: str, key: str) -> tuple[float, float]:
            xs = [r[key] for r in self.results[name]]
            return (min(xs), statistics.median(xs)) if xs else (float("nan"), float("nan"))

        print(f"{'VMM':10} {'restores':>8} {'to running min/med ms':>24} {'to first guest print min/med ms':>34}")
        for name in self.a.vmms:
            rmin, rmed = stats(name, "running_ms")
            pmin, pmed = stats(name, "prints_ms")
            prints = f"{pmin:>16.2f}/{pmed:<17.2f}" if pmed == pmed else f"{'-':>34}"
            print(f"{name:10} {len(self.results[name]):>8} {rmin:>11.2f}/{rmed:<12.2f} {prints}")
        if self.startup:
            print("process start-up alone (spawn to exit), median ms: " +
                  ", ".join(f"{name} {statistics.median(xs):.1f}" for name, xs in self.startup.items()))
        if "qemu" in self.snap:
            q = self.snap["qemu"]
            print(f"qemu     snapshot (migrate to file, live): total-time {q['time_ms']:.0f} ms, downtime {q['downtime_ms']:.0f} ms, "
                  f"{q['wall_ms']:.0f} ms until completed; file {mib(q['size'])}, {mib(q['du'])} on disk")
        if "swiftvmm" in self.snap:
            s = self.snap["swiftvmm"]
            print(f"swiftvmm snapshot (snapshot-create, running): time-ms {s['time_ms']:.1f}, round trip {s['wall_ms']:.1f} ms; "
                  f"size {mib(s['size'])} reported, files {mib(s['apparent'])}, {mib(s['du'])} on disk")
            l = self.snap["swiftvmm-live"]
            print(f"swiftvmm snapshot (snapshot-create live): time-ms {l['time_ms']:.1f}, guest paused {l['pause_ms']:.2f} ms")
            kib = [r["memory_in_kib"] for r in self.results["swiftvmm"] if r.get("memory_in_kib", float("nan")) == r.get("memory_in_kib")]
            if kib:
                print(f"swiftvmm restores: memory.bin resident after the first guest print, median {statistics.median(kib) / 1024:.1f} MiB "
                      f"(QEMU reads its whole file, {mib(self.snap['qemu']['size']) if 'qemu' in self.snap else '-'}, before it runs)")
        if self.results["qemu"] and self.results["swiftvmm"]:
            rs, rq = stats("swiftvmm", "running_ms")[1], stats("qemu", "running_ms")[1]
            ps, pq = stats("swiftvmm", "prints_ms")[1], stats("qemu", "prints_ms")[1]
            print(f"ratio swiftvmm/qemu, median restore → running: {rs / rq:.3f}")
            if ps == ps and pq == pq:
                print(f"ratio swiftvmm/qemu, median restore → first guest print: {ps / pq:.3f}")
            s, q = self.snap["swiftvmm"], self.snap["qemu"]
            print(f"ratio swiftvmm/qemu, snapshot time (snapshot-create time-ms / migration total-time): {s['time_ms'] / q['time_ms']:.3f}")
            l = self.snap["swiftvmm-live"]
            print(f"ratio swiftvmm/qemu, live snapshot time (time-ms / migration total-time): {l['time_ms'] / q['time_ms']:.3f}")
            if q["downtime_ms"] > 0:
                print(f"ratio swiftvmm/qemu, guest pause (live pause-ms / migration downtime): {l['pause_ms'] / q['downtime_ms']:.3f}")
            else:
                print(f"ratio swiftvmm/qemu, guest pause: QEMU reports a downtime of {q['downtime_ms']} ms (it rounds to whole ms)")
            print(f"ratio swiftvmm/qemu, snapshot on disk: {s['du'] / q['du']:.3f}")
            met = rs <= 0.2 * rq and rs < 10
            print(f"target restore → running <= 0.2x QEMU and < 10 ms: {'met' if met else 'NOT met'} "
                  f"({rs:.2f} ms, {rs / rq:.3f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--swiftvmm")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True, help="the ticking guest's initramfs (restore-bench.sh makes it)")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--restore-arg", action="append", default=[], help="an extra argument for `swiftvmm restore` (repeatable)")
    ap.add_argument("--vmms", default="qemu,swiftvmm", help="comma-separated: qemu, swiftvmm, swiftvmm-nows (swiftvmm "
                    "restoring with --no-working-set, for an A/B of the working-set prefetch in the same run)")
    ap.add_argument("--boot-timeout", type=float, default=300)
    ap.add_argument("--restore-timeout", type=float, default=120)
    ap.add_argument("--qemu-cpu", default="host", help="QEMU's -cpu (kvm_pvm needs host,arch-capabilities=off)")
    ap.add_argument("--snapshot-after", type=float, metavar="SECONDS",
                    help="snapshot the originals this long after they start instead of once the guest ticks, "
                         "and measure only start -> running (for kvm_pvm hosts; passes --allow-slow-kvm)")
    a = ap.parse_args()
    a.vmms = [v for v in a.vmms.split(",") if v]
    if any(v not in ("qemu", "swiftvmm", "swiftvmm-nows") for v in a.vmms):
        ap.error(f"--vmms: unknown VMM in {a.vmms}")
    if "swiftvmm" in a.vmms and not a.swiftvmm:
        ap.error("--swiftvmm is needed unless --vmms qemu")
    try:
        return Bench(a).run()
    except RuntimeError as e:
        print(f"restore-bench: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
