"""Driver for the virtio-blk / virtio-rng end-to-end tests (a GuestRun.driver; see test_virtio.py).

    python3 virtio_driver.py [--drive SPEC]... [--no-rng] [--kill-on TEXT] [--] VMM-COMMAND...

VMM-COMMAND is the harness's command for the case (`swiftvmm run --kernel K --initrd I --cmdline C
--memory 256M`). The driver makes the drive images, adds the devices to the command, runs the VMM
once as a swiftvmm-kit VM, and passes its console through to its own standard output in whole lines;
the VMM's standard error follows when it has exited.

  --drive name=NAME,mib=N,seed=S[,readonly=on][,id=ID]   (repeatable, in guest order: vda, vdb, ...)
        a raw image NAME.img of N MiB filled with host_pattern(S, N MiB), in a private directory
        under /run (tmpfs in the test host; $TMPDIR where /run is not writable). The VMM gets
        --drive file=PATH[,readonly=on][,id=ID].
  --no-rng      --no-rng (the virtio-rng is there by default)
  --kill-on TEXT
                SIGKILL the VMM as soon as a console line containing TEXT has been read (the guest
                prints it after an fsync'd write); the driver then exits 0 if it killed the VMM that
                way and 1 if the VMM exited by itself first

After the VMM has ended, every image is copied to $E2E_ARTIFACTS/NAME.img (the harness sets it;
default: a new temporary directory, printed) for the tests to inspect, and summary.json there holds
the VMM's argv, its exit status (negative: killed by that signal), whether and when the driver
killed it, and per drive: name, path, size, seed, readonly, id, sha256 before and after.
Exit status: the VMM's (without --kill-on), see --kill-on, 1 when a step of the driver failed
(`driver: FAILED ...` says which), 2 for a usage error. SIGTERM (the harness's timeout) kills the VMM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from guestrun import vm_from_command
from swiftvmm_kit import ExpectTimeout, KitError, VMExited

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


def device_args(drives: list[dict], no_rng: bool) -> list[str]:
    out: list[str] = []
    for d in drives:
        out += ["--drive", f"file={d['path']}" + (",readonly=on" if d["readonly"] else "")
                + (f",id={d['id']}" if d["id"] else "")]
    return out + (["--no-rng"] if no_rng else [])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def run_vmm(cmd: list[str], extra: list[str], kill_on: Optional[str], summary: dict) -> int:
    """Runs the VMM, passing its console through; SIGKILLs it at the first line holding kill_on."""
    vm = vm_from_command(cmd, extra, name="vmm", echo=sys.stdout)
    summary["killed"] = False
    started = time.monotonic()
    try:
        vm.start()
        summary["argv"] = vm.argv
        summary["vmm_pid"] = vm.process.pid
        if kill_on is not None:
            try:
                vm.console.expect(re.escape(kill_on), timeout=3600)
                os.killpg(vm.process.pid, signal.SIGKILL)  # a crash: it and anything it started, no clean-up
                summary["killed"] = True
                summary["killed_after_s"] = round(time.monotonic() - started, 3)
            except (VMExited, ExpectTimeout):
                pass
        vm.wait(3600)
    except KitError as e:
        log(f"the VMM did not run as asked: {str(e).splitlines()[0]}")
    finally:
        vm.close(graceful=False)
        sys.stdout.buffer.write(vm.stderr.encode())
        sys.stdout.buffer.flush()
    status = vm.process.returncode if vm.process is not None else 1
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
    summary: dict = {"step": "images", "private_dir": str(tmp), "drives": []}
    status = 1
    try:
        for d in args.drive:
            d["path"] = str(tmp / f"{d['name']}.img")
            data = host_pattern(d["seed"], d["size"])
            with open(d["path"], "wb") as f:
                f.write(data)
            d["sha256_before"] = hashlib.sha256(data).hexdigest()
            summary["drives"].append(d)
        summary["step"] = "vmm"
        log(f"{len(args.drive)} drive(s) in {tmp}, rng {'off' if args.no_rng else 'on'}"
            + (f", SIGKILL on {args.kill_on!r}" if args.kill_on else ""))
        vmm_status = run_vmm(cmd, device_args(args.drive, args.no_rng), args.kill_on, summary)
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
