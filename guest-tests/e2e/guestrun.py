"""End-to-end harness on swiftvmm-kit (python/swiftvmm_kit): guest runs declared by test modules,
each carried out once, the first time a test asks for its results.

A test module declares its guest runs in a module-level list:

    GUEST_RUNS = [GuestRun("boot", case_script="uname -r", swiftvmm_args=("--memory", "256M"))]

and asks for a case's results through the `guest` fixture (conftest.py):

    def test_something(guest):
        r = guest("boot")
        r.assert_clean_run()
        r.check("6.1" in r.value("uname="), "kernel version")

A case's guest is the kit's guest image (the host's kernel, a busybox initramfs with the modules in
GUEST_MODULES, the case script as /case.sh, its tools and files), booted by the kit's VM (or by the
case's driver). The whole pytest session runs in one nested test-host session when this host has no
hardware virtualization: the kit's pytest plugin moves it there (e2e.sh). Each case's console (then
swiftvmm's standard error), exit status and wall time go to files in a results directory.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

GT_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = GT_DIR.parent
sys.path.insert(0, str(REPO_DIR / "python"))

from swiftvmm_kit import MARKER_INIT, MARKER_POWEROFF, VM, ExpectTimeout, KitError, find_binary, guest_image  # noqa: E402
from swiftvmm_kit.image import DEFAULT_CMDLINE as BASE_CMDLINE  # noqa: E402
from swiftvmm_kit.image import default_kernel, kernel_version_of  # noqa: E402
from swiftvmm_kit.l1trace import L1Trace, judge  # noqa: E402

# In the test host, this process's Python stacks go to the test host's console on SIGUSR1: its /init
# sends that to the processes listed in /run/testhost-pystacks when it prints its diagnostics (a hung
# session; guest-tests/testhost.sh).
_STACKS_TO: Optional[object] = None
if os.environ.get("TESTHOST") == "1":
    try:
        import faulthandler

        _STACKS_TO = open("/dev/console", "w")  # noqa: SIM115 - kept open for the process's life
        faulthandler.register(signal.SIGUSR1, file=_STACKS_TO, all_threads=True)
        with open("/run/testhost-pystacks", "a") as _f:
            _f.write(f"{os.getpid()}\n")
    except OSError:
        pass

__all__ = ["BASE_CMDLINE", "GUEST_MODULES", "MARKER_INIT", "MARKER_POWEROFF", "CaseResult", "GuestRun", "GuestSession",
           "bzimage_version", "vm_from_command"]
TAIL_LINES = 30
# Modules every case's initrd holds (loaded by the case script with `modload NAME`, not at boot).
GUEST_MODULES = ("qemu_fw_cfg", "button", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "virtio_console")


@dataclasses.dataclass(frozen=True)
class GuestRun:
    """One boot of the test guest.

    name           unique across the suite; names the result files
    case_script    shell script text the guest's /init runs as /case.sh ("" = none); keep it quiet
    swiftvmm_args  extra `swiftvmm run` arguments (after --kernel/--initrd/--cmdline)
    cmdline_extra  appended to BASE_CMDLINE
    timeout        seconds for this boot (the VMM is killed after that; exit status 124)
    tools          static guest tools (guest-tests/tools/NAME.c, built and cached by
                   tools/build-tools.sh) to put into this case's initrd as /bin/NAME
    files          more files for the initrd, each "SRC:DEST"
    driver         a Python script in guest-tests/e2e/ that runs the VMM itself and talks to it while
                   the guest runs (e.g. over QMP): it is started as `python3 DRIVER [DRIVER-ARGS] VMM-COMMAND...`
                   with the environment variable E2E_ARTIFACTS naming an empty directory of its own
                   (CaseResult.part/.artifact read it). A driver of one VMM process passes the VMM's
                   output through to its stdout and exits with the VMM's status; a scenario driver
                   (several VMM processes, e.g. snapshot_driver.py) writes each process's output to
                   files in E2E_ARTIFACTS and prints a log of its steps. E2E_VMM is "swiftvmm" (the
                   drivers that the benchmarks also run under QEMU read it).
    driver_args    arguments for the driver, before the VMM command

    A case that failed runs once more (never more) when the test host's KVM trace shows that the
    emulator, not the guest or swiftvmm, ended a guest in a triple fault (swiftvmm_kit/l1trace.py; README, "The
    test host"): exactly one process of the attempt reported a triple fault with the vCPU in its reset
    state, and that vCPU thread's last events are one of the emulator's patterns (l1trace.classify:
    the SHUTDOWN on its first entry after an npf, io or msr exit, on that exit's page, delivering the IRQ
    injected for it or a page fault). The first attempt's files are kept as NAME.attempt1.out / NAME.attempt1.d /
    NAME.attempt1.l1trace, NAME.retried says why, and every test of the case reports the retry as a
    warning. Any other triple fault fails the case, with the trace's verdict (NAME.l1trace) in its
    tests' messages.
    """

    name: str
    case_script: str = ""
    swiftvmm_args: Sequence[str] = ()
    cmdline_extra: str = ""
    timeout: int = 300
    tools: Sequence[str] = ()
    files: Sequence[str] = ()
    driver: Optional[str] = None
    driver_args: Sequence[str] = ()

    @property
    def cmdline(self) -> str:
        return f"{BASE_CMDLINE} {self.cmdline_extra}".strip()


def vm_from_command(cmd: Sequence[str], more_args: Sequence[str] = (), **kwargs: object) -> VM:
    """A kit VM (not started) for the command a driver is given: `SWIFTVMM run --kernel K --initrd I
    --cmdline C ARGS...` (as GuestSession makes it), its options left to ARGS as they are, then more_args."""
    cmd = list(cmd)
    if len(cmd) < 8 or cmd[1:3] != ["run", "--kernel"] or cmd[4] != "--initrd" or cmd[6] != "--cmdline":
        raise ValueError(f"expected `swiftvmm run --kernel K --initrd I --cmdline C ...`, got {cmd}")
    return VM(cmd[3], initrd=cmd[5], cmdline=cmd[7], memory=None, cpus=None, vmgenid=None,
              extra_args=[*cmd[8:], *more_args], binary=cmd[0], **kwargs)  # type: ignore[arg-type]


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

        trace = self.results_dir / f"{self.run.name}.l1trace"
        pytest.fail(
            f"[{self.name} under {self.vmm}] {message}\n"
            f"--- exit status {self.status}, {self._secs()}; last {TAIL_LINES} output lines of {self.name}:\n"
            f"{self.tail()}" + (f"\n--- last {TAIL_LINES} lines of {self.parent.name}:\n{self.parent.tail()}"
                                if self.parent is not None else "")
            + (f"\n--- {trace.name}: {trace.read_text(errors='replace')}" if trace.exists() else ""),
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


def _proc_state(pid: int) -> str:
    """A process's state and the kernel function it sleeps in, from /proc ("?" where unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "?"
    return f"{stat.rpartition(') ')[2].split(' ', 1)[0]} in {wchan or '?'}"


def _read_int(p: Path) -> Optional[int]:
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


class GuestSession:
    """Carries out GuestRuns on demand (each once) and holds their results."""

    def __init__(self, runs: list[GuestRun], workdir: Path, log: Callable[[str], None] = print):
        self.runs = {r.name: r for r in runs}
        self.workdir = workdir
        self.results_dir = workdir / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.error: Optional[str] = None
        self.done: dict[str, CaseResult] = {}
        self.initrds: dict[str, Path] = {}
        self.vmm_desc = "swiftvmm"
        self._tools: dict[str, str] = {}
        self.trace, why = L1Trace.open()
        if self.trace is None and os.environ.get("TESTHOST") == "1":
            log(f"e2e: no KVM trace in the test host ({why}): a triple fault will not be put down to the emulator")
        try:
            self.vmm = str(find_binary())
            self.vmlinuz: Optional[Path] = default_kernel()
            self.kernel_version = kernel_version_of(self.vmlinuz)
            self.vmm_desc = self.vmm
        except KitError as e:
            self.error = str(e)
            self.vmm, self.vmlinuz, self.kernel_version = "", None, ""

    # -- building -------------------------------------------------------------------------------
    def _tool_paths(self, names: Sequence[str]) -> dict[str, str]:
        wanted = sorted(set(names) - set(self._tools))
        if wanted:
            proc = subprocess.run([str(GT_DIR / "tools" / "build-tools.sh"), *wanted], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)
            paths = proc.stdout.split()
            if proc.returncode != 0 or len(paths) != len(wanted):
                raise RuntimeError(f"tools/build-tools.sh {' '.join(wanted)} failed ({proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            self._tools.update(zip(wanted, paths))
        return {n: self._tools[n] for n in names}

    def initrd(self, name: str) -> Path:
        """The initrd of the GuestRun called `name` (built on first use)."""
        if name not in self.initrds:
            run = self.runs[name]
            files: dict[str, object] = {f"/bin/{t}": Path(p) for t, p in self._tool_paths(run.tools).items()}
            for spec in run.files:
                src, _, dest = spec.partition(":")
                files[dest] = Path(src)
            image = guest_image(run.case_script, modules=GUEST_MODULES, load_modules=False, files=files,
                                kernel=self.vmlinuz)
            self.initrds[name] = image.initrd
        return self.initrds[name]

    # -- running --------------------------------------------------------------------------------
    def _attempt(self, run: GuestRun, initrd: Path, out: Path, art: Path) -> tuple[int, list[str]]:
        """One run of the case: its status, and the standard-error texts to look for an emulator fault in."""
        assert self.vmlinuz is not None
        art.mkdir()
        if run.driver is not None:
            cmd = [sys.executable, str(Path(__file__).resolve().parent / run.driver), *run.driver_args,
                   self.vmm, "run", "--kernel", str(self.vmlinuz), "--initrd", str(initrd), "--cmdline", run.cmdline,
                   *run.swiftvmm_args]
            env = {**os.environ, "E2E_ARTIFACTS": str(art), "E2E_VMM": "swiftvmm"}
            with open(out, "wb") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
                try:
                    status = proc.wait(run.timeout)
                except subprocess.TimeoutExpired:
                    # What `timeout --kill-after=10` did: SIGTERM (the driver ends its VMMs), then SIGKILL.
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        try:
                            proc.wait(60)
                        except subprocess.TimeoutExpired:  # stuck in the kernel: say so, do not hang the suite
                            raise RuntimeError(f"the driver (pid {proc.pid}) did not die within 60 s of SIGKILL "
                                               f"(state {_proc_state(proc.pid)})") from None
                    status = 124
            # A scenario driver keeps each VMM's standard error in a file of its own; a driver of one
            # VMM passes it through to its output.
            errs = [p.read_text(errors="replace") for p in sorted(art.glob("*.err"))]
            return status, errs or [out.read_text(errors="replace")]
        vm = VM(self.vmlinuz, initrd=initrd, cmdline=run.cmdline, memory=None, cpus=None, vmgenid=None,
                extra_args=run.swiftvmm_args, binary=self.vmm, name=run.name)
        try:
            vm.start()
            status = vm.wait(run.timeout)
        except ExpectTimeout:
            vm.close(graceful=False)
            status = 124
        except KitError:
            status = vm.exit_status() if vm.exit_status() is not None else 125
        finally:
            vm.close(graceful=False)
            raw = vm.console.raw if vm._console is not None else b""
            out.write_bytes(raw + vm.stderr.encode())
        return status, [vm.stderr]

    def _execute(self, run: GuestRun) -> None:
        n, rd = run.name, self.results_dir
        initrd = self.initrd(n)
        for attempt in (1, 2):
            start = time.monotonic()
            if self.trace is not None:
                self.trace.arm()
            status, errs = self._attempt(run, initrd, rd / f"{n}.out", rd / f"{n}.d")
            ms = int((time.monotonic() - start) * 1000)
            (rd / f"{n}.status").write_text(f"{status}\n")
            (rd / f"{n}.ms").write_text(f"{ms}\n")
            self.log(f"e2e: {n}: exit {status} after {ms} ms")
            why = self._judge_triple_faults(n, status, errs)
            if attempt == 1 and status != 0 and why is not None:
                (rd / f"{n}.retried").write_text(why + "\n")
                for suffix in (".d", ".out", ".l1trace"):
                    if (rd / f"{n}{suffix}").exists():
                        (rd / f"{n}{suffix}").rename(rd / f"{n}.attempt1{suffix}")
                self.log(f"e2e: {n}: {why}; running it once more")
                continue
            break

    def _judge_triple_faults(self, n: str, status: int, errs: Sequence[str]) -> Optional[str]:
        """After an attempt of case n: why it may run again (the emulator's triple fault), else None.
        When a process reported a triple fault, the trace's verdict goes to n.l1trace; when the case
        failed otherwise (a guest that hung), the last events of each vCPU thread do."""
        verdict = judge(self.trace, errs)
        if verdict is not None:
            (self.results_dir / f"{n}.l1trace").write_text(verdict.record)
            return verdict.retry
        if status != 0 and self.trace is not None:
            try:
                (self.results_dir / f"{n}.l1trace").write_text(self.trace.last_events() + "\n")
            except OSError as e:
                self.log(f"e2e: {n}: cannot read the test host's KVM trace: {e}")
        return None

    def result(self, name: str) -> CaseResult:
        import pytest

        if name not in self.runs:
            pytest.fail(f"no GuestRun named {name!r} was declared (GUEST_RUNS of the collected modules: "
                        f"{sorted(self.runs)})", pytrace=False)
        if self.error:
            pytest.fail(f"the end-to-end guest runs cannot be carried out: {self.error}", pytrace=False)
        if name not in self.done:
            try:
                self._execute(self.runs[name])
            except Exception as e:  # noqa: BLE001 - every test of the case reports it
                self.done[name] = e  # type: ignore[assignment]
            else:
                self.done[name] = CaseResult(self.runs[name], self.results_dir, self.vmm_desc)
        result = self.done[name]
        if isinstance(result, Exception):
            pytest.fail(f"case {name} could not be run: {type(result).__name__}: {result}", pytrace=False)
        retried = self.results_dir / f"{name}.retried"
        if retried.exists():
            import warnings
            warnings.warn(f"e2e case {name} ran twice: {retried.read_text().strip()}; the first attempt's "
                          f"files are {name}.attempt1.out/.d in {self.results_dir}", stacklevel=2)
        return result
