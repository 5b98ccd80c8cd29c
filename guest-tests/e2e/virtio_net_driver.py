"""Driver for the virtio-net end-to-end test (a GuestRun.driver; see test_virtio_more.py).

    python3 virtio_net_driver.py [--tap NAME] [--host-ip A.B.C.D/PREFIX] [--] VMM-COMMAND...

Creates a persistent tap device NAME (default: svmm-e2e-PID) on this machine, the test host
(/dev/net/tun: TUNSETIFF IFF_TAP|IFF_NO_PI, TUNSETPERSIST), gives it the host address (default
10.0.2.1/24) and brings it up, then runs the VMM with a virtio-net device on that tap and a QMP
socket:
  swiftvmm  VMM-COMMAND --net tap=NAME --qmp SOCK         (the MAC derived from the tap's name)
  QEMU      VMM-COMMAND -netdev tap,id=n0,ifname=NAME,script=no,downscript=no
                        -device virtio-net-device,netdev=n0,id=net0 -qmp unix:SOCK,server=on,wait=off
The VMM's output (the guest console) is passed through. The guest asks for QMP actions with console
lines `swiftvmm-net: ACTION`; the driver answers with `driver: KEY=VALUE` lines:
  query-mac   query-rx-filter {"name": "net0"}      → driver: main-mac=MAC
  link-down   set_link {"name": "net0", "up": false} → driver: set_link up=false done
  link-up     set_link {"name": "net0", "up": true}  → driver: set_link up=true done
A failed QMP command prints `driver: error=...`. After the VMM has exited, the tap's statistics are
read (rx: frames the guest sent, tx: frames sent to the guest) and the tap is deleted.
$E2E_ARTIFACTS/summary.json: the VMM kind, argv, exit status, the tap's name and statistics, every
QMP reply. Exit status: the VMM's; 1 when a step of the driver failed (`driver: FAILED ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

T0 = time.monotonic()
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
IFREQ_SIZE = 40
NET_ID = "net0"  # swiftvmm's name of its first network device; the QEMU device gets this id


def log(msg: str) -> None:
    print(f"driver: {msg} [{time.monotonic() - T0:.1f} s]", flush=True)


class StepFailed(Exception):
    pass


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(IFREQ_SIZE - 16, b"\0")


def _tap_fd(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", IFF_TAP | IFF_NO_PI)))
    except OSError:
        os.close(fd)
        raise
    return fd


def create_tap(name: str, host_ip: str) -> None:
    """A persistent tap NAME with address host_ip (A.B.C.D/PREFIX), up (no descriptor kept open:
    the VMM attaches to it)."""
    fd = _tap_fd(name)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
    iface = ipaddress.IPv4Interface(host_ip)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        def sockaddr(addr: ipaddress.IPv4Address) -> bytes:
            return struct.pack("H2s4s8x", socket.AF_INET, b"\0\0", addr.packed)

        fcntl.ioctl(s, SIOCSIFADDR, _ifreq(name, sockaddr(iface.ip)))
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(name, sockaddr(iface.network.netmask)))
        flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
    finally:
        s.close()


def delete_tap(name: str) -> None:
    fd = _tap_fd(name)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)  # the last descriptor of a non-persistent tap: the device goes


def tap_stats(name: str) -> dict:
    out = {}
    for key in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped"):
        try:
            out[key] = int(Path(f"/sys/class/net/{name}/statistics/{key}").read_text())
        except (OSError, ValueError):
            out[key] = None
    return out


def vmm_kind(cmd: list[str]) -> str:
    kind = os.environ.get("E2E_VMM", "")
    if kind in ("swiftvmm", "qemu"):
        return kind
    return "qemu" if "qemu-system" in os.path.basename(cmd[0]) else "swiftvmm"


def device_args(kind: str, tap: str, sock: str) -> list[str]:
    if kind == "qemu":
        return ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=n0,id={NET_ID}", "-qmp", f"unix:{sock},server=on,wait=off"]
    return ["--net", f"tap={tap}", "--qmp", sock]


async def run_vmm(argv: list[str], sock: str, summary: dict) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    summary["vmm_pid"] = proc.pid
    actions: asyncio.Queue[str] = asyncio.Queue()

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.flush()
            text = raw.decode("utf-8", "replace").replace("\r", "").strip()
            if text.startswith("swiftvmm-net: "):
                await actions.put(text[len("swiftvmm-net: "):].strip())

    pump_task = asyncio.create_task(pump())
    qmp = QMPClient("swiftvmm-e2e-net")
    connected = False
    deadline = time.monotonic() + 60
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            await qmp.connect(sock)
            connected = True
            break
        except Exception:  # noqa: BLE001 - the socket appears once the VMM is up
            await asyncio.sleep(0.05)
    summary["qmp_connected"] = connected
    if not connected:
        log(f"FAILED: could not connect to the QMP socket {sock}")
    replies: list[dict] = []
    summary["qmp"] = replies

    async def execute(name: str, args: dict) -> object:
        try:
            r = await asyncio.wait_for(qmp.execute(name, args), 60)
            replies.append({"command": name, "arguments": args, "return": r})
            return r
        except Exception as e:  # noqa: BLE001 - reported to the test
            replies.append({"command": name, "arguments": args, "error": f"{type(e).__name__}: {e}"})
            print(f"driver: error={name} {json.dumps(args)}: {type(e).__name__}: {e}", flush=True)
            return None

    async def serve() -> None:
        while True:
            action = await actions.get()
            if not connected:
                print(f"driver: error=no QMP connection for {action}", flush=True)
            elif action == "query-mac":
                r = await execute("query-rx-filter", {"name": NET_ID})
                if isinstance(r, list) and r:
                    print(f"driver: main-mac={r[0].get('main-mac')}", flush=True)
            elif action in ("link-down", "link-up"):
                up = action == "link-up"
                if await execute("set_link", {"name": NET_ID, "up": up}) is not None:
                    print(f"driver: set_link up={'true' if up else 'false'} done", flush=True)
            else:
                print(f"driver: error=unknown action {action}", flush=True)

    server = asyncio.create_task(serve())
    try:
        status = await proc.wait()
        await pump_task
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            await proc.wait()
        server.cancel()
        if connected:
            try:
                await qmp.disconnect()
            except Exception:  # noqa: BLE001
                pass
    return status


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tap", default=f"svmm-e2e-{os.getpid() % 100000}")
    ap.add_argument("--host-ip", default="10.0.2.1/24")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no VMM command")
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix="virtio-net-driver-"))
    art.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="swiftvmm-net-"))
    sock = str(tmp / "qmp.sock")
    kind = vmm_kind(cmd)
    summary: dict = {"step": "tap", "vmm": kind, "tap": args.tap, "host_ip": args.host_ip}
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    loop.add_signal_handler(signal.SIGTERM, lambda: main_task.cancel() if main_task else None)
    status = 1
    tap_made = False
    try:
        try:
            create_tap(args.tap, args.host_ip)
            tap_made = True
        except OSError as e:
            raise StepFailed(f"cannot create the tap device {args.tap} with {args.host_ip}: {e} "
                             "(needs /dev/net/tun, the tun module and CAP_NET_ADMIN)") from e
        if shutil.which("ip"):
            shown = subprocess.run(["ip", "-br", "addr", "show", "dev", args.tap], capture_output=True, text=True)
            summary["ip_addr"] = shown.stdout.strip()
        log(f"tap {args.tap} created, {args.host_ip}, up ({summary.get('ip_addr', '')})")
        argv = cmd + device_args(kind, args.tap, sock)
        summary["argv"] = argv
        summary["step"] = "vmm"
        vmm_status = await run_vmm(argv, sock, summary)
        summary["status"] = vmm_status
        summary["step"] = "tap statistics"
        summary["tap_stats"] = tap_stats(args.tap)
        log(f"the VMM exited {vmm_status}; tap {args.tap}: {summary['tap_stats']}")
        status = vmm_status if vmm_status >= 0 else 128 - vmm_status
        summary["step"] = "done"
    except StepFailed as e:
        log(f"FAILED at step {summary['step']}: {e}")
        summary["error"] = str(e)
    except asyncio.CancelledError:
        log(f"terminated at step {summary['step']}")
        summary["error"] = "terminated"
    finally:
        if tap_made:
            try:
                delete_tap(args.tap)
                summary["tap_deleted"] = not os.path.exists(f"/sys/class/net/{args.tap}")
            except OSError as e:
                log(f"cannot delete the tap {args.tap}: {e}")
                summary["tap_deleted"] = False
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
