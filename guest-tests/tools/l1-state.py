#!/usr/bin/env python3
"""l1-state.py QMP-SOCKET PID [KALLSYMS]: where the test host's vCPUs are, for a session that
locked up (guest-tests/testhost.sh runs it before it ends such a session).

PID is QEMU's, or that of the `timeout` process that runs it. Takes three samples a second apart. Each says, per QEMU thread, its state and the CPU it used since
the previous sample (a TCG vCPU thread at ~100% spins; at 0% it waits, e.g. for QEMU's global
lock), and per vCPU its instruction pointer, privilege level, HLT state and CR3 as QEMU's monitor
reports them (`info registers -a` over QMP), the instruction pointer named from KALLSYMS (the test
host's /proc/kallsyms, which testhost.sh caches per kernel version; the test host boots with
nokaslr so that its addresses hold from one session to the next). A vCPU whose address is not in
the test host's kernel runs user space or a nested (L2) guest. A QMP that does not answer within
5 s is reported as such (QEMU's main loop is then stuck too). Never fails: what it cannot learn, it
says.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import socket
import sys
import time


def load_symbols(path: str) -> tuple[list[int], list[str]]:
    addrs: list[int] = []
    names: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in ("t", "T"):
                    continue
                try:
                    a = int(parts[0], 16)
                except ValueError:
                    continue
                if a == 0:
                    continue
                addrs.append(a)
                names.append(parts[2] + (f" {parts[3]}" if len(parts) > 3 else ""))
    except OSError:
        return [], []
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


def symbolize(rip: int, addrs: list[int], names: list[str]) -> str:
    if not addrs or rip < 0xFFFF_8000_0000_0000:
        return "not in the test host's kernel (user space or the nested guest)"
    i = bisect.bisect_right(addrs, rip) - 1
    if i < 0 or rip - addrs[i] > 0x10000:
        return "not in the test host's kernel text (the nested guest's kernel?)"
    return f"{names[i]}+{rip - addrs[i]:#x}"


class QMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""
        self._read()  # the greeting
        self.call("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QMP closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, cmd: str, **args: object) -> object:
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise OSError(f"{cmd}: {reply['error'].get('desc', reply['error'])}")


def threads(pid: int) -> dict[int, tuple[str, str, int]]:
    """tid → (name, state, utime+stime in clock ticks)."""
    out: dict[int, tuple[str, str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        out[int(t)] = (name, rest[0], int(rest[11]) + int(rest[12]))
    return out


def qemu_pid(pid: int) -> int:
    """PID, or its QEMU child when PID is the `timeout` that started QEMU."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("qemu"):
                return pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
        return int(children[0]) if children else pid
    except OSError:
        return pid


CPU_RE = re.compile(r"^CPU#(\d+)", re.M)


def registers(text: str) -> list[tuple[int, str]]:
    """(cpu index, one summary line) per CPU in `info registers -a` output."""
    out = []
    parts = CPU_RE.split(text)
    for i in range(1, len(parts) - 1, 2):
        cpu, body = int(parts[i]), parts[i + 1]
        rip = re.search(r"[RE]IP=([0-9a-f]+)", body)
        cpl = re.search(r"CPL=(\d)", body)
        hlt = re.search(r"HLT=(\d)", body)
        cr3 = re.search(r"CR3=([0-9a-f]+)", body)
        out.append((cpu, " ".join([
            f"RIP={rip.group(1) if rip else '?'}", f"CPL={cpl.group(1) if cpl else '?'}",
            f"HLT={hlt.group(1) if hlt else '?'}", f"CR3={cr3.group(1) if cr3 else '?'}"])))
    return out


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    sock_path, pid = sys.argv[1], qemu_pid(int(sys.argv[2]))
    addrs, names = load_symbols(sys.argv[3]) if len(sys.argv) > 3 else ([], [])
    if not addrs:
        print("(no symbols for the test host's kernel: addresses only)")
    qmp = None
    try:
        qmp = QMP(sock_path)
    except (OSError, ValueError) as e:
        print(f"QEMU's QMP does not answer ({e}): its main loop is stuck, or QEMU is gone")
    tick = os.sysconf("SC_CLK_TCK")
    before = threads(pid)
    vcpu_threads: dict[int, int] = {}
    if qmp is not None:
        try:
            for c in qmp.call("query-cpus-fast"):  # type: ignore[union-attr]
                vcpu_threads[int(c["thread-id"])] = int(c["cpu-index"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"query-cpus-fast failed: {e}")
    for sample in range(1, 4):
        time.sleep(1)
        now = threads(pid)
        print(f"-- sample {sample} at {time.strftime('%H:%M:%S')}")
        for tid, (name, state, ticks) in sorted(now.items()):
            used = (ticks - before.get(tid, (name, state, ticks))[2]) * 100 // tick
            if used == 0 and state == "S" and tid not in vcpu_threads:
                continue  # idle helper threads: not interesting
            role = f" vCPU {vcpu_threads[tid]}" if tid in vcpu_threads else ""
            print(f"   thread {tid} ({name}){role}: state {state}, {used}% CPU over the last second")
        before = now
        if qmp is None:
            continue
        try:
            text = qmp.call("human-monitor-command", **{"command-line": "info registers -a"})
        except (OSError, ValueError) as e:
            print(f"   info registers: {e}")
            qmp = None
            continue
        for cpu, line in registers(str(text)):
            rip = re.search(r"[RE]IP=([0-9a-f]+)", line)
            where = symbolize(int(rip.group(1), 16), addrs, names) if rip else "?"
            print(f"   vCPU {cpu}: {line} {where}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a diagnostic aid: never the reason a session's report is lost
        print(f"l1-state.py: {type(e).__name__}: {e}")
        sys.exit(0)
