"""Scenario driver for the TPM end-to-end tests (a GuestRun.driver; see test_tpm.py) and the TPM benchmark.

    python3 tpm_driver.py --backend builtin|swtpm [--boots N] [--boot-timeout S] [--] VMM-COMMAND...

VMM-COMMAND is the harness's command for the case: `swiftvmm run --kernel K --initrd I --cmdline C
--memory 256M`, or with E2E_VMM=qemu (or a qemu-system-* program) a QEMU command line (-M q35). The
driver boots it N times (default 2), in sequence, on the SAME TPM state, and adds to boot i:
  - the guest kernel command-line word `e2e.tpmboot=i` (so the case script knows which boot it is);
  - the TPM:
      builtin  swiftvmm: --tpm builtin,state=STATE (STATE: a file under the private directory below,
               absent before boot 1: the VMM creates it). Not available under QEMU (exit status 2).
      swtpm    a NEW `swtpm socket --tpm2 --ctrl type=unixio,path=SOCK --tpmstate dir=DIR` process
               per boot (same DIR every boot), then swiftvmm: --tpm swtpm,socket=SOCK;
               QEMU: -chardev socket,id=chrtpm,path=SOCK -tpmdev emulator,id=tpm0,chardev=chrtpm
                     -device tpm-tis,tpmdev=tpm0
A boot is only started if the previous one exited 0 (a hung boot would only hang again).

The private directory (sockets, state) is under /run (tmpfs in the test host; unix sockets cannot be
made on its 9p shares), or $TMPDIR where /run is not writable; it is removed at the end.

Files in $E2E_ARTIFACTS (the harness sets it; default: a new temporary directory, printed):
  bootN.out / .err / .status / .ms   the VMM's stdout (the guest console), stderr, exit status, wall ms
  bootN.swtpm.log                    swtpm's log (--log level=1), swtpm backend only
  summary.json                       argv of every process, exit statuses, swtpm pids and whether each
                                     exited by itself after its VMM, the state file/directory after each
                                     boot (names and sizes)
The driver's stdout is a log of its steps (`driver: ... [s since start]`), ending with
`driver: scenario complete` when every boot exited 0. Exit status 0 then, 1 when a step failed
(`driver: FAILED ...` says which), 2 for a usage error. SIGTERM (the harness's timeout) kills every
process it started.
"""

from __future__ import annotations

import argparse
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

T0 = time.monotonic()
SWTPM = os.environ.get("SWTPM", "swtpm")
QEMU_TPM_ARGS = ["-chardev", "socket,id=chrtpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", "tpm-tis,tpmdev=tpm0"]
CHILDREN: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"driver: {msg} [{time.monotonic() - T0:.1f} s]", flush=True)


class StepFailed(Exception):
    pass


def private_dir(prefix: str = "swiftvmm-tpm-") -> Path:
    """A new private directory under /run (tmpfs in the test host), else $TMPDIR."""
    base = "/run" if os.access("/run", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def vmm_kind(cmd: list[str]) -> str:
    kind = os.environ.get("E2E_VMM", "")
    if kind in ("swiftvmm", "qemu"):
        return kind
    return "qemu" if "qemu-system" in os.path.basename(cmd[0]) else "swiftvmm"


def with_boot_word(cmd: list[str], kind: str, boot: int) -> list[str]:
    """cmd with `e2e.tpmboot=N` appended to the guest command line (swiftvmm --cmdline, QEMU -append)."""
    flag = "-append" if kind == "qemu" else "--cmdline"
    out = list(cmd)
    for i, a in enumerate(out):
        if a == flag and i + 1 < len(out):
            out[i + 1] = f"{out[i + 1]} e2e.tpmboot={boot}"
            return out
        if a.startswith(flag + "="):
            out[i] = f"{a} e2e.tpmboot={boot}"
            return out
    raise StepFailed(f"no {flag} in the VMM command {cmd}")


def file_list(path: Path) -> dict:
    if path.is_file():
        return {path.name: path.stat().st_size}
    if path.is_dir():
        return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return {}


def kill_tree(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()


class Swtpm:
    """One swtpm process serving the control socket SOCK with the state in DIR."""

    def __init__(self, sock: Path, state_dir: Path, logfile: Path):
        self.argv = [SWTPM, "socket", "--tpm2", "--ctrl", f"type=unixio,path={sock}", "--tpmstate",
                     f"dir={state_dir}", "--log", f"file={logfile},level=1"]
        self.sock = sock
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        CHILDREN.append(self.proc)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise StepFailed(f"swtpm exited {self.proc.returncode} before making its socket: {err.strip()}")
            if time.monotonic() > deadline:
                raise StepFailed(f"swtpm made no socket {self.sock} within 30 s")
            time.sleep(0.05)
        log(f"swtpm: pid {self.proc.pid}: {' '.join(self.argv)}")

    def stop(self, grace: float) -> dict:
        """Waits up to `grace` s for swtpm to exit by itself (the VMM's CMD_SHUTDOWN), then SIGTERM."""
        assert self.proc is not None
        by_itself = True
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            by_itself = False
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        log(f"swtpm: pid {self.proc.pid} exited {self.proc.returncode}"
            f"{' by itself' if by_itself else f' after SIGTERM ({grace:.0f} s after the VMM)'}")
        return {"pid": self.proc.pid, "argv": self.argv, "status": self.proc.returncode,
                "exited_by_itself": by_itself, "stderr": err[-2000:]}


def run_vmm(name: str, argv: list[str], art: Path, timeout: float) -> dict:
    log(f"{name}: {' '.join(argv)}")
    t = time.monotonic()
    with open(art / f"{name}.out", "wb") as out, open(art / f"{name}.err", "wb") as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        CHILDREN.append(p)
        try:
            status = p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{name}: no exit within {timeout:.0f} s: killed")
            kill_tree(p)
            status = 124
    ms = int((time.monotonic() - t) * 1000)
    (art / f"{name}.status").write_text(f"{status}\n")
    (art / f"{name}.ms").write_text(f"{ms}\n")
    log(f"{name}: exited {status} after {ms} ms")
    return {"argv": argv, "status": status, "ms": ms, "pid": p.pid}


def scenario(args: argparse.Namespace, cmd: list[str], art: Path, tmp: Path, summary: dict) -> None:
    kind = vmm_kind(cmd)
    summary.update({"vmm": kind, "backend": args.backend, "private_dir": str(tmp), "boots": []})
    if args.backend == "builtin" and kind != "swiftvmm":
        raise StepFailed("the builtin TPM backend exists only in swiftvmm (QEMU needs swtpm)")
    state_file = tmp / "tpm-state"
    state_dir = tmp / "swtpm-state"
    sock = tmp / "swtpm.sock"
    if args.backend == "swtpm":
        state_dir.mkdir()
        summary["state"] = str(state_dir)
    else:
        summary["state"] = str(state_file)

    for boot in range(1, args.boots + 1):
        name = f"boot{boot}"
        summary["step"] = name
        info: dict = {"name": name}
        summary["boots"].append(info)
        argv = with_boot_word(cmd, kind, boot)
        sw: Optional[Swtpm] = None
        if args.backend == "swtpm":
            sw = Swtpm(sock, state_dir, art / f"{name}.swtpm.log")
            sw.start()
            info["swtpm_pid"] = sw.proc.pid if sw.proc else None
            if kind == "qemu":
                argv += [a.format(sock=sock) for a in QEMU_TPM_ARGS]
            else:
                argv += ["--tpm", f"swtpm,socket={sock}"]
        else:
            info["state_before"] = file_list(state_file)
            argv += ["--tpm", f"builtin,state={state_file}"]
        if kind != "qemu":
            # Its TPM line at exit: the commands the backend ran and the time they took.
            argv += ["--log-level", "info"]
        try:
            info.update(run_vmm(name, argv, art, args.boot_timeout))
            for line in (art / f"{name}.err").read_text(errors="replace").splitlines():
                if "TPM: " in line and "backend time" in line:
                    info["backend"] = line[line.index("TPM: "):]
                    log(f"{name}: {info['backend']}")
        finally:
            if sw is not None:
                info["swtpm"] = sw.stop(args.swtpm_grace)
        info["state_after"] = file_list(state_dir if args.backend == "swtpm" else state_file)
        log(f"{name}: TPM state now {info['state_after']}")
        if info["status"] != 0:
            raise StepFailed(f"{name}: the VMM exited {info['status']}")
    summary["step"] = "done"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("builtin", "swtpm"), required=True)
    ap.add_argument("--boots", type=int, default=2)
    ap.add_argument("--boot-timeout", type=float, default=270.0, help="seconds per VMM run (default 270)")
    ap.add_argument("--swtpm-grace", type=float, default=5.0,
                    help="seconds swtpm may take to exit by itself after its VMM (default 5)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no VMM command")
    art = Path(os.environ.get("E2E_ARTIFACTS") or tempfile.mkdtemp(prefix="tpm-driver-"))
    art.mkdir(parents=True, exist_ok=True)
    if "E2E_ARTIFACTS" not in os.environ:
        log(f"artifacts in {art}")

    def on_term(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    tmp = private_dir()
    summary: dict = {"step": "setup"}
    status = 1
    try:
        scenario(args, cmd, art, tmp, summary)
        log("scenario complete")
        status = 0
    except StepFailed as e:
        log(f"FAILED at step {summary.get('step')}: {e}")
        summary["error"] = str(e)
    except SystemExit as e:
        log(f"terminated (signal) at step {summary.get('step')}")
        summary["error"] = "terminated"
        status = e.code if isinstance(e.code, int) else 1
    finally:
        for p in CHILDREN:
            kill_tree(p)
        (art / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    if summary.get("error", "").startswith("the builtin TPM backend"):
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
