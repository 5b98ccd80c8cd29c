#!/usr/bin/env python3
"""QMP start-up and vmgenid-change latency of swiftvmm against QEMU (run by qmp-bench.sh).

For each VMM, N times: start it with a QMP socket and the test guest, connect as soon as the socket
exists, and measure
  * greeting: wall time from process start to the QMP greeting, and the VMM's CPU time (all its
    threads, from /proc/PID/task/*/schedstat, nanoseconds) at that moment;
  * change (swiftvmm only): the round trip of set-vm-generation-id, from sending it to its reply,
    once query-status has answered (the machine is built: swiftvmm greets before it is, and a
    machine command sent earlier waits for it).
    swiftvmm writes the new GUID to guest memory and raises GPE 5 before replying, so this bounds
    "command to GPE raised". QEMU has no runtime change of the generation ID (its vmgenid `guid`
    property cannot be set after the device is realized), so there is no peer figure;
then `quit`. Prints min/median per VMM and the ratios swiftvmm/QEMU.

With --native, only swiftvmm runs, with --allow-slow-kvm (for a host whose /dev/kvm emulates guest
code, e.g. kvm_pvm: the guest does not boot in useful time, but the greeting is served), and only
the greeting figures are printed (min/median/max wall and CPU time).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time


def cpu_ns(pid: int) -> int:
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        pass
    return total


class Conn:
    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""

    def message(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def command(self, name: str, args: dict | None = None) -> dict:
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            m = self.message()
            if "return" in m or "error" in m:
                return m


def run_one(cmd: list[str], sock: str, change: tuple[str, dict] | None) -> tuple[float, float, float]:
    start = time.monotonic_ns()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        conn = None
        while conn is None:
            try:
                conn = Conn(sock)
            except OSError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError(f"no QMP socket from {cmd[0]}")
                time.sleep(0.0002)
        greeting = conn.message()
        greet_ms = (time.monotonic_ns() - start) / 1e6
        cpu_ms = cpu_ns(p.pid) / 1e6
        assert "QMP" in greeting, greeting
        conn.command("qmp_capabilities")
        change_ms = float("nan")
        if change is not None:
            # A machine command that arrives before the machine is built waits for it (swiftvmm
            # greets first): query-status first, so the change is timed on a built machine.
            if "error" in conn.command("query-status"):
                raise RuntimeError("query-status failed")
            t0 = time.monotonic_ns()
            r = conn.command(*change)
            change_ms = (time.monotonic_ns() - t0) / 1e6
            if "error" in r:
                raise RuntimeError(f"{change[0]} failed: {r}")
        try:
            conn.command("quit")
        except EOFError:
            pass
        p.wait(timeout=30)
        return greet_ms, cpu_ms, change_ms
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--swiftvmm", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--native", action="store_true", help="swiftvmm alone, with --allow-slow-kvm: greeting figures")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="qmp-bench-")
    sock = os.path.join(d, "qmp.sock")
    append = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
    if a.native:
        cmd = [a.swiftvmm, "run", "--kernel", a.kernel, "--initrd", a.initrd, "--cmdline", append,
               "--memory", "256M", "--qmp", sock, "--allow-slow-kvm"]
        runs = []
        for i in range(a.runs):
            if os.path.exists(sock):
                os.unlink(sock)
            r = run_one(cmd, sock, None)
            runs.append(r)
            print(f"# run {i + 1}: greeting {r[0]:.2f} ms (CPU {r[1]:.2f} ms)", flush=True)
        for j, what in enumerate(["greeting wall ms", "CPU to greeting ms"]):
            xs = [x[j] for x in runs]
            print(f"{what}: min {min(xs):.2f} median {statistics.median(xs):.2f} max {max(xs):.2f}")
        return
    vmms = {
        "swiftvmm": ([a.swiftvmm, "run", "--kernel", a.kernel, "--initrd", a.initrd, "--cmdline", append,
                      "--memory", "256M", "--qmp", sock],
                     ("set-vm-generation-id", {"guid": "auto"})),
        "qemu": (["qemu-system-x86_64", "-M", "pc", "-enable-kvm", "-cpu", "host", "-m", "256M", "-nodefaults",
                  "-no-user-config", "-nographic", "-serial", "null", "-kernel", a.kernel, "-initrd", a.initrd,
                  "-append", append, "-device", "vmgenid,id=vgid", "-qmp", f"unix:{sock},server=on,wait=off"],
                 None),
    }
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in vmms}
    for i in range(a.runs):
        for name, (cmd, change) in vmms.items():
            if os.path.exists(sock):
                os.unlink(sock)
            r = run_one(cmd, sock, change)
            results[name].append(r)
            print(f"# {name} run {i + 1}: greeting {r[0]:.2f} ms (CPU {r[1]:.2f} ms), change round trip {r[2]:.3f} ms", flush=True)
    med = {k: [statistics.median(x[j] for x in v) for j in range(3)] for k, v in results.items()}
    mins = {k: [min(x[j] for x in v) for j in range(3)] for k, v in results.items()}
    print(f"{'VMM':10} {'greeting min/med ms':>22} {'CPU to greeting min/med ms':>28} {'change min/med ms':>20}")
    for k in vmms:
        print(f"{k:10} {mins[k][0]:>10.2f}/{med[k][0]:<10.2f} {mins[k][1]:>13.2f}/{med[k][1]:<13.2f} {mins[k][2]:>9.3f}/{med[k][2]:<9.3f}")
    for j, what in enumerate(["greeting wall time", "CPU time to greeting"]):
        print(f"ratio swiftvmm/qemu, median {what}: {med['swiftvmm'][j] / med['qemu'][j]:.2f}")


if __name__ == "__main__":
    main()
