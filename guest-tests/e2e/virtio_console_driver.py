"""Driver for the virtio-console end-to-end test (a GuestRun.driver; see test_virtio_more.py).

    python3 virtio_console_driver.py --marker TEXT --send LINE [--] VMM-COMMAND...

Runs the VMM with a virtio console that has the host's standard input:
  swiftvmm  VMM-COMMAND --console virtio
  QEMU      VMM-COMMAND with `-serial stdio` replaced by a multiplexed stdio character device that
            the serial port and a virtconsole share: -chardev stdio,mux=on,id=con0 -serial chardev:con0
            -device virtio-serial-device -device virtconsole,chardev=con0 (the virtconsole, added
            last, has the mux's input focus)
and passes the VMM's output (serial console and hvc0 alike) through. As soon as an output line
contains TEXT (the guest writes it to /dev/hvc0 only), LINE and a newline are written to the VMM's
standard input, once; the guest reads it from /dev/hvc0 and prints it on its serial console.
The VMM's standard input stays open until it exits.
$E2E_ARTIFACTS/summary.json: the VMM kind, argv, exit status, whether and when the marker was seen
and the line sent. When the VMM prints nothing for SILENCE seconds, the state of its threads
(/proc/PID/task/*: stat, wchan, syscall, kernel stack) and the host kernel's last log lines go to
$E2E_ARTIFACTS/silence.txt (once), for a hang to be told from a slow guest.
Exit status: the VMM's; 1 when a step of the driver failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.monotonic()
SILENCE = 60.0


def log(msg: str) -> None:
    sys.stdout.buffer.write(f"driver: {msg} [{time.monotonic() - T0:.1f} s]\n".encode())
    sys.stdout.buffer.flush()


def vmm_kind(cmd: list[str]) -> str:
    kind = os.environ.get("E2E_VMM", "")
    if kind in ("swiftvmm", "qemu"):
        return kind
    return "qemu" if "qemu-system" in os.path.basename(cmd[0]) else "swiftvmm"


def console_argv(kind: str, cmd: list[str]) -> list[str]:
    if kind != "qemu":
        return cmd + ["--console", "virtio"]
    out, i, replaced = [], 0, False
    while i < len(cmd):
        if cmd[i] == "-serial" and i + 1 < len(cmd) and cmd[i + 1] == "stdio":
            out += ["-chardev", "stdio,mux=on,id=con0", "-serial", "chardev:con0"]
            replaced = True
            i += 2
            continue
        out.append(cmd[i])
        i += 1
    if not replaced:
        raise SystemExit(f"driver: the QEMU command has no `-serial stdio` to share with the virtconsole: {cmd}")
    return out + ["-device", "virtio-serial-device", "-device", "virtconsole,chardev=con0"]


def thread_report(pid: int) -> str:
    """The state of every thread of process pid, and the kernel's last log lines."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda t: int(t.name)):
        out.append(f"--- thread {task.name}")
        for f in ("comm", "stat", "wchan", "syscall", "stack"):
            try:
                out.append(f"{f}: {(task / f).read_text(errors='replace').strip()}")
            except OSError as e:
                out.append(f"{f}: ({e.strerror})")
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, errors="replace")
    out.append("--- dmesg (last 40 lines)")
    out += (dmesg.stdout or dmesg.stderr).splitlines()[-40:]
    return "\n".join(out) + "\n"


def watch_silence(p: subprocess.Popen, last: list[float], art: Path) -> None:
    """Writes silence.txt once when p has printed nothing for SILENCE seconds."""
    while p.poll() is None:
        time.sleep(1)
        if time.monotonic() - last[0] > SILENCE and p.poll() is None:
            try:
                report = thread_report(p.pid)
            except OSError as e:
                report = f"cannot read /proc/{p.pid}: {e}\n"
            (art / "silence.txt").write_text(report)
            log(f"the VMM printed nothing for {SILENCE:.0f} s: its threads' state is in silence.txt")
            return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--marker", required=True)
    ap.add_argument("--send", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no VMM command")
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix="virtio-console-driver-"))
    art.mkdir(parents=True, exist_ok=True)
    kind = vmm_kind(cmd)
    argv = console_argv(kind, cmd)
    summary: dict = {"vmm": kind, "argv": argv, "marker_seen": False, "sent": False}

    def on_term(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    status = 1
    last = [time.monotonic()]
    threading.Thread(target=watch_silence, args=(p, last, art), daemon=True).start()
    try:
        assert p.stdout is not None and p.stdin is not None
        needle = args.marker.encode()
        for line in iter(p.stdout.readline, b""):
            last[0] = time.monotonic()
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            if not summary["sent"] and needle in line:
                summary["marker_seen"] = True
                summary["marker_after_s"] = round(time.monotonic() - started, 3)
                try:
                    p.stdin.write(args.send.encode() + b"\n")
                    p.stdin.flush()
                    summary["sent"] = True
                    log(f"marker seen; sent {args.send!r} to the VMM's standard input")
                except OSError as e:
                    log(f"FAILED to write to the VMM's standard input: {e}")
                    summary["send_error"] = str(e)
        vmm_status = p.wait()
        summary["status"] = vmm_status
        log(f"the VMM exited {vmm_status}" + ("" if summary["sent"] else f"; its output never held {args.marker!r}"))
        status = vmm_status if vmm_status >= 0 else 128 - vmm_status
    except SystemExit as e:
        log("terminated (signal)")
        summary["error"] = "terminated"
        status = e.code if isinstance(e.code, int) else 1
    finally:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        try:
            p.stdin.close()
        except OSError:
            pass
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
