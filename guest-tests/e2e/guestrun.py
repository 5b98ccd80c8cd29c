"""End-to-end harness: guest runs declared by test modules, run in one batch, results per case.

A test module declares its guest runs in a module-level list:

    GUEST_RUNS = [GuestRun("boot", case_script="uname -r", swiftvmm_args=("--memory", "256M"))]

and asks for a case's results through the `guest` fixture (conftest.py):

    def test_something(guest):
        r = guest("boot")
        r.assert_clean_run()
        r.check("6.1" in r.value("uname="), "kernel version")

All GuestRuns of all collected modules are built into per-case initrds on this machine and run by ONE
shell script, sequentially, in ONE test-host session (guest-tests/testhost.sh; an L1 session costs
~10-20 s), or directly when /dev/kvm is hardware virtualization. Each case has its own timeout; its
stdout+stderr (the guest's serial console), exit status and wall time go to files in a results
directory that the test host mounts read-write.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

GT_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = GT_DIR.parent
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
MARKER_INIT = "swiftvmm-guest: init reached"
MARKER_POWEROFF = "swiftvmm-guest: powering off"
TAIL_LINES = 30


@dataclasses.dataclass(frozen=True)
class GuestRun:
    """One boot of the test guest.

    name           unique across the suite; names the result files
    case_script    shell script text the guest's /init runs as /case.sh ("" = none); keep it quiet
    swiftvmm_args  extra `swiftvmm run` arguments (after --kernel/--initrd/--cmdline)
    cmdline_extra  appended to BASE_CMDLINE
    timeout        seconds for this boot (the VMM is killed after that; exit status 124)
    qemu_args      with VMM=qemu: arguments replacing the translation of swiftvmm_args
                   (None: --memory/--cpus are translated to -m/-smp; other arguments make the case
                   unsupported under QEMU, and its tests are skipped with a message)
    qemu_machine   with VMM=qemu: the -M machine type (default microvm; e.g. q35 for a device that
                   needs the PC platform, such as tpm-tis; other than microvm, the guest command line
                   loses pci=off, see qemu_cmdline)
    tools          static guest tools (guest-tests/tools/NAME.c, built and cached by
                   tools/build-tools.sh) to put into this case's initrd as /bin/NAME
    files          more files for the initrd, each "SRC:DEST" (make-initrd.sh --add)
    driver         a Python script in guest-tests/e2e/ that runs the VMM itself and talks to it while
                   the guest runs (e.g. over QMP): it is started as `python3 DRIVER [DRIVER-ARGS] VMM-COMMAND...`
                   with the environment variable E2E_ARTIFACTS naming an empty directory of its own
                   (CaseResult.part/.artifact read it). A driver of one VMM process passes the VMM's
                   output through to its stdout and exits with the VMM's status; a scenario driver
                   (several VMM processes, e.g. snapshot_driver.py) writes each process's output to
                   files in E2E_ARTIFACTS and prints a log of its steps. The environment variable
                   E2E_VMM says which VMM the command is for (swiftvmm or qemu).
    driver_args    arguments for the driver, before the VMM command
    driver_vmms    the VMMs the driver speaks (default: swiftvmm only, as drivers that use swiftvmm's
                   command line or QMP commands do); under VMM=qemu a case whose driver does not
                   speak qemu is skipped with a message. A driver that does gets the QEMU command.
    retry_emulator_shutdown
                   run the case once more (never more) when it failed and a process's stderr in its
                   artifacts shows a triple fault with the vCPU already in its reset state (what a
                   SHUTDOWN exit leaves): the test host's emulated SVM does that now and then to a
                   restored guest (README, "The test host"). The first attempt's files are kept as
                   NAME.attempt1.out / NAME.attempt1.d, NAME.retried says why, and every test of
                   the case reports the retry as a warning. For the cases it hits: scenarios of
                   restores (cold nested page tables) and TPM guests (an MMIO exit per FIFO byte:
                   a CI run saw a booted TPM guest end that way during CreatePrimary).
    """

    name: str
    case_script: str = ""
    swiftvmm_args: Sequence[str] = ()
    cmdline_extra: str = ""
    timeout: int = 300
    qemu_args: Optional[Sequence[str]] = None
    qemu_machine: str = "microvm"
    tools: Sequence[str] = ()
    files: Sequence[str] = ()
    driver: Optional[str] = None
    driver_args: Sequence[str] = ()
    driver_vmms: Sequence[str] = ("swiftvmm",)
    retry_emulator_shutdown: bool = False

    @property
    def cmdline(self) -> str:
        return f"{BASE_CMDLINE} {self.cmdline_extra}".strip()


def qemu_translation(run: GuestRun) -> Optional[list[str]]:
    """QEMU -M microvm arguments equivalent to run.swiftvmm_args, or None if there are none."""
    if run.qemu_args is not None:
        return list(run.qemu_args)
    out: list[str] = []
    args = list(run.swiftvmm_args)
    i = 0
    while i < len(args):
        a = args[i]
        key, eq, val = a.partition("=")
        if key in ("--memory", "--cpus"):
            if not eq:
                if i + 1 >= len(args):
                    return None
                val = args[i + 1]
                i += 1
            out += ["-m" if key == "--memory" else "-smp", val]
        else:
            return None
        i += 1
    return out


def qemu_cmdline(run: GuestRun) -> str:
    """The guest command line under VMM=qemu: run.cmdline, without pci=off on a PC machine (q35/pc),
    whose ACPI tables reach PCI config space (the kernel would print an ACPI error per PCI link)."""
    if run.qemu_machine == "microvm":
        return run.cmdline
    return " ".join(w for w in run.cmdline.split() if w != "pci=off")


def bzimage_version(path: Path) -> str:
    """The kernel version string in a bzImage's setup header (first word = `uname -r`)."""
    data = path.read_bytes()[:0x10000]
    if data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{path} is not a bzImage")
    ptr = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    return data[ptr:data.index(b"\0", ptr)].decode("ascii", "replace")


class CaseResult:
    """What one guest run produced. Assertion helpers fail with the case's last output lines."""

    def __init__(self, run: GuestRun, results_dir: Path, vmm: str, part: Optional[str] = None):
        self.run = run
        self.vmm = vmm
        self.results_dir = results_dir
        self.artifacts = results_dir / f"{run.name}.d"
        # A part is one output of a scenario driver: PART.out (a VMM's console) and PART.status in
        # the case's artifacts directory, PART.err its standard error.
        base = self.artifacts / part if part else results_dir / run.name
        self.name = f"{run.name}/{part}" if part else run.name
        self.parent: Optional[CaseResult] = None
        out = base.with_name(base.name + ".out")
        self.ran = out.exists()
        self.raw = out.read_bytes() if self.ran else b""
        self.output = self.raw.decode("utf-8", "replace").replace("\r", "")
        self.lines = self.output.splitlines()
        err = base.with_name(base.name + ".err")
        self.err_lines = err.read_bytes().decode("utf-8", "replace").splitlines() if err.exists() else []
        self.status = _read_int(base.with_name(base.name + ".status"))
        self.wall_ms = _read_int(base.with_name(base.name + ".ms"))

    def part(self, name: str) -> "CaseResult":
        """The output named `name` that this case's driver left in its artifacts directory."""
        p = CaseResult(self.run, self.results_dir, self.vmm, part=name)
        p.parent = self
        return p

    def artifact(self, name: str) -> Path:
        return self.artifacts / name

    def artifact_json(self, name: str):
        """A JSON file of the artifacts directory, parsed (fails the test if it is missing or broken)."""
        import json

        try:
            return json.loads(self.artifact(name).read_text())
        except (OSError, ValueError) as e:
            self.fail(f"cannot read {name} of the driver: {e}")

    def tail(self, n: int = TAIL_LINES) -> str:
        if not self.ran:
            return "(the case produced no output file: it did not run)"
        return "\n".join(self.lines[-n:]) if self.lines else "(no output)"

    def fail(self, message: str) -> None:
        import pytest

        pytest.fail(
            f"[{self.name} under {self.vmm}] {message}\n"
            f"--- exit status {self.status}, {self._secs()}; last {TAIL_LINES} output lines of {self.name}:\n"
            f"{self.tail()}" + (f"\n--- last {TAIL_LINES} lines of {self.parent.name}:\n{self.parent.tail()}"
                                if self.parent is not None else ""),
            pytrace=False,
        )

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def _secs(self) -> str:
        return f"{self.wall_ms / 1000:.1f} s" if self.wall_ms is not None else "time unknown"

    def index_of(self, text: str, start: int = 0) -> int:
        """Index of the first output line at or after `start` that contains text, or -1."""
        for i in range(start, len(self.lines)):
            if text in self.lines[i]:
                return i
        return -1

    def value(self, prefix: str) -> Optional[str]:
        """The rest of the first line that starts with prefix (e.g. value("uname=")), or None."""
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix):]
        return None

    def assert_exit(self, expected: int = 0) -> None:
        if self.status is None:
            self.fail("the VMM's exit status was not recorded (the case did not finish)")
        if self.status == 124:
            self.fail(f"the VMM was killed by the case timeout ({self.run.timeout} s)")
        self.check(self.status == expected, f"the VMM exited {self.status}, expected {expected}")

    def assert_in_order(self, *markers: str) -> None:
        pos = 0
        for m in markers:
            i = self.index_of(m, pos)
            if i < 0:
                where = "at all" if self.index_of(m) < 0 else "in the expected order"
                self.fail(f"output line {m!r} not found {where} (expected order: {list(markers)})")
            pos = i + 1

    def assert_printed_good_lines(self) -> None:
        """The console holds /init's marker and the case script's exit line, in order: checks that
        look for the absence of bad lines call this first, so that an empty console cannot pass."""
        self.assert_in_order(MARKER_INIT, "swiftvmm-guest: case exit=")

    def assert_clean_run(self) -> None:
        """The VMM exited 0 after /init reached, the case script exited 0 and power-off began."""
        self.assert_in_order(MARKER_INIT, "swiftvmm-guest: case exit=", MARKER_POWEROFF)
        self.check(self.value("swiftvmm-guest: case exit=") == "0",
                   f"the case script failed: {self.value('swiftvmm-guest: case exit=')!r}")
        self.assert_exit(0)

    def __repr__(self) -> str:
        return f"CaseResult({self.name}, status={self.status}, {self._secs()}, {len(self.lines)} lines)"


def _read_int(p: Path) -> Optional[int]:
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


class GuestSession:
    """Builds, runs and holds the results of a batch of GuestRuns."""

    def __init__(self, runs: list[GuestRun], workdir: Path, log: Callable[[str], None] = print):
        self.runs = {r.name: r for r in runs}
        self.workdir = workdir
        self.results_dir = workdir / "results"
        self.log = log
        self.error: Optional[str] = None
        self.unsupported: dict[str, str] = {}
        self.kernel_version = ""
        self.vmlinuz: Optional[Path] = None
        self.via = ""
        self.vmm_kind = os.environ.get("VMM", "swiftvmm")
        self.vmm = os.environ.get("SWIFTVMM", str(REPO_DIR / ".build" / "debug" / "swiftvmm"))
        self.session_seconds = 0.0

    # -- building -------------------------------------------------------------------------------
    def _build(self) -> Path:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([str(GT_DIR / "build-guest.sh"), "--quiet"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"build-guest.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        env = {}
        for line in proc.stdout.splitlines():
            k, _, v = line.partition("=")
            env[k] = shlex.split(v)[0] if v else ""
        self.vmlinuz = Path(env["VMLINUZ"])
        self.kernel_version = env["KERNEL_VERSION"]
        base = env["INITRAMFS"]

        if self.vmm_kind == "qemu":
            machines = sorted({r.qemu_machine for r in self.runs.values()})
            vmm_desc = f"qemu-system-x86_64 -M {'/'.join(machines) or 'microvm'}"
        elif self.vmm_kind == "swiftvmm":
            if not os.access(self.vmm, os.X_OK):
                raise RuntimeError(f"no swiftvmm binary at {self.vmm} (build it: swift build --product swiftvmm; "
                                   f"or set SWIFTVMM=/path, or VMM=qemu to check the harness with QEMU)")
            vmm_desc = self.vmm
        else:
            raise RuntimeError(f"VMM={self.vmm_kind!r}: must be swiftvmm or qemu")

        # The static guest tools the runs ask for, built once (cached across sessions).
        tool_paths: dict[str, str] = {}
        wanted = sorted({t for r in self.runs.values() for t in r.tools})
        if wanted:
            proc = subprocess.run([str(GT_DIR / "tools" / "build-tools.sh"), *wanted], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)
            paths = proc.stdout.split()
            if proc.returncode != 0 or len(paths) != len(wanted):
                raise RuntimeError(f"tools/build-tools.sh {' '.join(wanted)} failed ({proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            tool_paths = dict(zip(wanted, paths))

        lines = ["#!/bin/bash", "# generated by guest-tests/e2e/guestrun.py: every guest run, in order",
                 f"cd {shlex.quote(str(self.results_dir))} || exit 125",
                 f"export E2E_VMM={shlex.quote(self.vmm_kind)}",
                 f"{shlex.quote(str(GT_DIR / 'kvm-probe.sh'))} -v > host.probe 2>&1",
                 "ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }"]
        for run in self.runs.values():
            case_file = self.workdir / f"{run.name}.case.sh"
            case_file.write_text(run.case_script + "\n" if run.case_script else "true\n")
            initrd = self.workdir / f"{run.name}.initrd"
            adds: list[str] = []
            for t in run.tools:
                adds += ["--add", f"{tool_paths[t]}:/bin/{t}"]
            for f in run.files:
                adds += ["--add", f]
            proc = subprocess.run([str(GT_DIR / "make-initrd.sh"), "--case", str(case_file), "--base", base,
                                   "--out", str(initrd), *adds], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(f"make-initrd.sh failed for {run.name}:\n{proc.stderr[-3000:]}")
            if self.vmm_kind == "qemu":
                extra = qemu_translation(run)
                if run.driver is not None and "qemu" not in run.driver_vmms:
                    self.unsupported[run.name] = (f"case {run.name} cannot run under VMM=qemu: its driver "
                                                  f"{run.driver} {' '.join(run.driver_args)} speaks only "
                                                  f"{'/'.join(run.driver_vmms)}")
                    continue
                if extra is None:
                    self.unsupported[run.name] = (f"case {run.name} cannot run under VMM=qemu: no QEMU translation "
                                                  f"of swiftvmm arguments {list(run.swiftvmm_args)}")
                    continue
                cmd = ["qemu-system-x86_64", "-M", run.qemu_machine, "-cpu", "host", "-enable-kvm", "-nodefaults",
                       "-no-user-config", "-no-reboot", "-serial", "stdio", "-nographic",
                       "-kernel", str(self.vmlinuz), "-initrd", str(initrd), "-append", qemu_cmdline(run), *extra]
            else:
                cmd = [self.vmm, "run", "--kernel", str(self.vmlinuz), "--initrd", str(initrd),
                       "--cmdline", run.cmdline, *run.swiftvmm_args]
            if run.driver is not None:
                import sys
                cmd = [sys.executable, str(Path(__file__).resolve().parent / run.driver), *run.driver_args, *cmd]
            n = shlex.quote(run.name)
            retry = "1" if run.retry_emulator_shutdown else "0"
            lines += [
                f"echo \"e2e: {n} ...\" >&2",
                f"rm -rf {n}.d {n}.attempt1.d {n}.attempt1.out {n}.retried",
                "for attempt in 1 2; do",
                f"  mkdir {n}.d",
                "  s=$(date +%s%N)",
                f"  E2E_ARTIFACTS=\"$PWD\"/{n}.d timeout --kill-after=10 {int(run.timeout)} {shlex.join(cmd)} "
                f"> {n}.out 2>&1 < /dev/null",
                f"  st=$?; echo $st > {n}.status; ms $s > {n}.ms",
                f"  echo \"e2e: {n}: exit $st after $(cat {n}.ms) ms\" >&2",
                # The emulator's triple fault of a restored guest: KVM reset the vCPU on the SHUTDOWN
                # exit, so the register dump is the reset state (RIP fff0, CS base ffff0000).
                f"  if [ {retry} = 1 ] && [ $attempt = 1 ] && [ $st != 0 ] && "
                f"f=$(grep -ls 'guest crashed (triple fault on vCPU' {n}.d/*.err | head -n 1) && [ -n \"$f\" ] && "
                f"grep -qs 'rip=0x000000000000fff0' \"$f\" && grep -qs 'base=0x00000000ffff0000' \"$f\"; then",
                f"    echo \"$(basename $f .err) of the first attempt triple-faulted (vCPU in its reset state: a SHUTDOWN exit)\" > {n}.retried",
                f"    mv {n}.d {n}.attempt1.d; mv {n}.out {n}.attempt1.out",
                f"    echo \"e2e: {n}: $(cat {n}.retried); running it once more\" >&2",
                "    continue",
                "  fi",
                "  break",
                "done",
            ]
        lines.append("exit 0")
        script = self.workdir / "run-all.sh"
        script.write_text("\n".join(lines) + "\n")
        self.vmm_desc = vmm_desc
        return script

    # -- running --------------------------------------------------------------------------------
    def _decide_via(self) -> str:
        via = os.environ.get("E2E_VIA", "auto")
        if via not in ("auto", "direct", "testhost"):
            raise RuntimeError(f"E2E_VIA={via!r}: must be auto, direct or testhost")
        if via != "auto":
            return via
        probe = subprocess.run([str(GT_DIR / "kvm-probe.sh")], capture_output=True, text=True).stdout.strip()
        return "direct" if probe == "hardware" else "testhost"

    def execute(self) -> None:
        """Runs everything; never raises: a failure is kept in self.error for every test to report."""
        start = time.monotonic()
        try:
            script = self._build()
            self.via = self._decide_via()
            total = sum((int(r.timeout) + 15) * (2 if r.retry_emulator_shutdown else 1)
                        for r in self.runs.values() if r.name not in self.unsupported)
            self.log(f"e2e: {len(self.runs)} guest run(s) under {self.vmm_desc}, "
                     f"{'directly' if self.via == 'direct' else 'in one test-host session'}; results in {self.results_dir}")
            if self.via == "direct":
                cmd = ["bash", str(script)]
                limit = total + 60
            else:
                limit = total + 240
                cmd = [str(GT_DIR / "testhost.sh"), "--timeout", str(limit - 30), "--no-stream",
                       "--rw", str(self.workdir), "--", "bash", str(script)]
            for attempt in (1, 2):
                with open(self.workdir / "session.log", "wb") as logf:
                    try:
                        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              timeout=limit)
                        rc = proc.returncode
                    except subprocess.TimeoutExpired:
                        rc = None
                log_text = (self.workdir / "session.log").read_text(errors="replace")
                # The test host's kernel locked up (testhost.sh ends such a session at once): the
                # whole session runs once more, never twice, and every test says so.
                if attempt == 1 and rc == 125 and "its kernel locked up (soft lockup)" in log_text:
                    (self.workdir / "session.attempt1.log").write_text(log_text)
                    self.session_retried = "the test host's kernel locked up (soft lockup) in the first session"
                    self.log(f"e2e: {self.session_retried}; running the whole session once more")
                    continue
                break
            if rc != 0:
                tail = "\n".join(log_text.splitlines()[-45:])
                what = {None: f"did not finish within {limit} s", 124: "timed out",
                        125: "failed (did not boot, or kvm_amd / /dev/kvm missing)"}.get(rc, f"exited {rc}")
                where = "the test-host session" if self.via == "testhost" else "the direct run"
                self.error = f"{where} {what} ({' '.join(map(shlex.quote, cmd))}):\n{tail}"
            for line in log_text.splitlines():
                if line.startswith("e2e: ") or line.startswith("testhost: command exited"):
                    self.log(line)
        except Exception as e:  # noqa: BLE001 - reported by every test
            self.error = f"{type(e).__name__}: {e}"
        self.session_seconds = time.monotonic() - start

    def result(self, name: str) -> CaseResult:
        import pytest

        if name not in self.runs:
            pytest.fail(f"no GuestRun named {name!r} was declared (GUEST_RUNS of the collected modules: "
                        f"{sorted(self.runs)})", pytrace=False)
        if self.error:
            pytest.fail(f"the end-to-end guest runs could not be carried out: {self.error}", pytrace=False)
        if name in self.unsupported:
            pytest.skip(self.unsupported[name])
        if getattr(self, "session_retried", None):
            import warnings
            warnings.warn(f"e2e: {self.session_retried}; its log is {self.workdir / 'session.attempt1.log'}", stacklevel=2)
        retried = self.results_dir / f"{name}.retried"
        if retried.exists():
            import warnings
            warnings.warn(f"e2e case {name} ran twice: {retried.read_text().strip()}; the first attempt's "
                          f"files are {name}.attempt1.out/.d in {self.results_dir}", stacklevel=2)
        return CaseResult(self.runs[name], self.results_dir, self.vmm_desc)
