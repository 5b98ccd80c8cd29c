"""Driver for the virtio-blk / virtio-rng end-to-end tests (a GuestRun.driver; see test_virtio.py).

    python3 virtio_driver.py [--drive SPEC]... [--no-rng] [--kill-on TEXT] [--] VMM-COMMAND...

VMM-COMMAND is the harness's command for the case (`swiftvmm run --kernel K --initrd I --cmdline C
--memory 256M`, or with E2E_VMM=qemu a `qemu-system-x86_64 -M microvm ...` command line). The driver
makes the drive images, adds the devices to the command, runs the VMM once, and passes the VMM's
standard output (the guest console) through to its own; the VMM's standard error goes to the
driver's standard error.

  --drive name=NAME,mib=N,seed=S[,readonly=on][,id=ID]   (repeatable, in guest order: vda, vdb, ...)
        a raw image NAME.img of N MiB filled with host_pattern(S, N MiB), in a private directory
        under /run (tmpfs in the test host; $TMPDIR where /run is not writable). The VMM gets:
          swiftvmm  --drive file=PATH[,readonly=on][,id=ID]
          QEMU      -drive file=PATH,format=raw,if=none,id=dK[,readonly=on]
                    -device virtio-blk-device,drive=dK[,serial=ID]
  --no-rng      swiftvmm: --no-rng (its virtio-rng is there by default); QEMU: no virtio-rng-device
                (without it the driver adds -device virtio-rng-device after the drives)
  --kill-on TEXT
                SIGKILL the VMM as soon as a console line containing TEXT has been read (the guest
                prints it after an fsync'd write); the driver then exits 0 if it killed the VMM that
                way and 1 if the VMM exited by itself first

After the VMM has ended, every image is copied to $E2E_ARTIFACTS/NAME.img (the harness sets it;
default: a new temporary directory, printed) for the tests to inspect, and summary.json there holds
the VMM kind, its argv, its exit status (negative: killed by that signal), whether and when the
driver killed it, and per drive: name, path, size, seed, readonly, id, sha256 before and after.
Exit status: the VMM's (without --kill-on), see --kill-on, 1 when a step of the driver failed
(`driver: FAILED ...` says which), 2 for a usage error. SIGTERM (the harness's timeout) kills the VMM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

MIB = 1 << 20
T0 = time.monotonic()


def host_pattern(seed: int, size: int) -> bytes:
    """The content the host writes into a drive image: SHAKE-256 of a seed-dependent string, so that
    every 512-byte sector differs from every other (a misplaced sector changes the checksums)."""
    return hashlib.shake_256(f"swiftvmm-e2e-virtio-{seed}".encode()).digest(size)


def guest_pattern(first: int, length: int) -> bytes:
    """What the guest's `seq FIRST $((FIRST + 100000)) | head -c LENGTH` writes."""
    out = bytearray()
    i = first
    while len(out) < length:
        out += f"{i}\n".encode()
        i += 1
    return bytes(out[:length])


def log(msg: str) -> None:
    sys.stdout.buffer.write(f"driver: {msg} [{time.monotonic() - T0:.1f} s]\n".encode())
    sys.stdout.buffer.flush()


class StepFailed(Exception):
    pass


def vmm_kind(cmd: list[str]) -> str:
    kind = os.environ.get("E2E_VMM", "")
    if kind in ("swiftvmm", "qemu"):
        return kind
    return "qemu" if "qemu-system" in os.path.basename(cmd[0]) else "swiftvmm"


def parse_drive(spec: str) -> dict:
    d: dict = {"readonly": False, "id": None}
    for item in spec.split(","):
        k, eq, v = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--drive {spec}: {item!r} is not KEY=VALUE")
        if k == "name":
            d["name"] = v
        elif k == "mib":
            d["size"] = int(v) * MIB
        elif k == "seed":
            d["seed"] = int(v)
        elif k == "readonly":
            if v not in ("on", "off"):
                raise argparse.ArgumentTypeError(f"--drive {spec}: readonly={v}")
            d["readonly"] = v == "on"
        elif k == "id":
            d["id"] = v
        else:
            raise argparse.ArgumentTypeError(f"--drive {spec}: unknown key {k}")
    for k in ("name", "size", "seed"):
        if k not in d:
            raise argparse.ArgumentTypeError(f"--drive {spec}: {k}= is required")
    return d


def device_args(kind: str, drives: list[dict], no_rng: bool) -> list[str]:
    out: list[str] = []
    for n, d in enumerate(drives):
        if kind == "qemu":
            out += ["-drive", f"file={d['path']},format=raw,if=none,id=d{n}" + (",readonly=on" if d["readonly"] else ""),
                    "-device", f"virtio-blk-device,drive=d{n}" + (f",serial={d['id']}" if d["id"] else "")]
        else:
            out += ["--drive", f"file={d['path']}" + (",readonly=on" if d["readonly"] else "")
                    + (f",id={d['id']}" if d["id"] else "")]
    if kind == "qemu":
        if not no_rng:
            out += ["-device", "virtio-rng-device"]
    elif no_rng:
        out += ["--no-rng"]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def run_vmm(argv: list[str], kill_on: Optional[str], summary: dict) -> int:
    """Runs the VMM, passing its console through; SIGKILLs it at the first line holding kill_on."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    summary["vmm_pid"] = p.pid
    summary["killed"] = False
    started = time.monotonic()
    needle = kill_on.encode() if kill_on else None
    try:
        assert p.stdout is not None
        for line in iter(p.stdout.readline, b""):
            if needle is not None and not summary["killed"] and needle in line:
                os.kill(p.pid, signal.SIGKILL)
                summary["killed"] = True
                summary["killed_after_s"] = round(time.monotonic() - started, 3)
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
        status = p.wait()
        if summary["killed"]:
            try:  # anything the VMM started goes with it, as on a real crash
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
    finally:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
    summary["status"] = status
    summary["vmm_seconds"] = round(time.monotonic() - started, 3)
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drive", type=parse_drive, action="append", default=[])
    ap.add_argument("--no-rng", action="store_true")
    ap.add_argument("--kill-on", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no VMM command")
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix="virtio-driver-"))
    art.mkdir(parents=True, exist_ok=True)
    if "E2E_ARTIFACTS" not in os.environ:
        log(f"artifacts in {art}")

    def on_term(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    base = "/run" if os.access("/run", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="swiftvmm-virtio-", dir=base))
    kind = vmm_kind(cmd)
    summary: dict = {"step": "images", "vmm": kind, "private_dir": str(tmp), "drives": []}
    status = 1
    try:
        for d in args.drive:
            d["path"] = str(tmp / f"{d['name']}.img")
            data = host_pattern(d["seed"], d["size"])
            with open(d["path"], "wb") as f:
                f.write(data)
            d["sha256_before"] = hashlib.sha256(data).hexdigest()
            summary["drives"].append(d)
        argv = cmd + device_args(kind, args.drive, args.no_rng)
        summary["argv"] = argv
        summary["step"] = "vmm"
        log(f"{kind}: {len(args.drive)} drive(s) in {tmp}, rng {'off' if args.no_rng else 'on'}"
            + (f", SIGKILL on {args.kill_on!r}" if args.kill_on else ""))
        vmm_status = run_vmm(argv, args.kill_on, summary)
        summary["step"] = "images after"
        for d in args.drive:
            d["sha256_after"] = sha256_file(Path(d["path"]))
            shutil.copyfile(d["path"], art / f"{d['name']}.img")
        if args.kill_on:
            log(f"the VMM {'was killed' if summary['killed'] else 'exited by itself'} (status {vmm_status})")
            if not summary["killed"]:
                raise StepFailed(f"no console line with {args.kill_on!r}: the VMM exited {vmm_status} by itself")
            status = 0
        else:
            log(f"the VMM exited {vmm_status}")
            status = vmm_status if vmm_status >= 0 else 128 - vmm_status
        summary["step"] = "done"
    except StepFailed as e:
        log(f"FAILED at step {summary.get('step')}: {e}")
        summary["error"] = str(e)
    except OSError as e:
        log(f"FAILED at step {summary.get('step')}: {e}")
        summary["error"] = str(e)
    except SystemExit as e:
        log(f"terminated (signal) at step {summary.get('step')}")
        summary["error"] = "terminated"
        status = e.code if isinstance(e.code, int) else 1
    finally:
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
