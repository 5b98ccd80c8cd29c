"""pytest plugin (registered as `swiftvmm` through the pytest11 entry point).

Fixtures:
  swiftvmm_bin          the swiftvmm executable (--swiftvmm-bin, else $SWIFTVMM, else PATH)
  swiftvmm_guest_image  a factory: swiftvmm_guest_image(script="...", modules=(...)) -> GuestImage
                        (built once per content, cached across runs)
  swiftvmm_vm           a factory: swiftvmm_vm(image, memory="512M", ...) -> a started VM, closed when
                        the test ends, whatever happened
Markers:
  @pytest.mark.swiftvmm_kvm   the test boots guests, so it needs a /dev/kvm with hardware
                              virtualization (inferred for every test that uses swiftvmm_vm)
  @pytest.mark.swiftvmm_no_retry  never run the test a second time (see below)
Options:
  --swiftvmm-bin PATH                  the swiftvmm executable
  --swiftvmm-via auto|direct|testhost  where the VMs run: `auto` (the default, or $SWIFTVMM_KIT_VIA)
                                       runs the whole session inside the nested test host when this
                                       host's KVM has no hardware virtualization and a selected test
                                       needs it; `direct` never does (such tests are then skipped,
                                       with the reason)
  --swiftvmm-testhost-timeout SECONDS  limit for that session (default 1800)
  --swiftvmm-env NAME[=VALUE]          pass a variable into that session (repeatable; SWIFTVMM_* pass)
  --swiftvmm-keep                      keep each VM's temporary directory (console.log, stderr.log)
A failing test's report gets, for every VM it made, its console (up to its last 2000 lines),
swiftvmm's stderr and the QMP transcript.

In the nested test host, the emulator it runs on (QEMU's TCG emulation of SVM with nested paging)
now and then ends a guest in a triple fault that real hardware would not (README of the checkout,
"The test host"). There, a failed test that made its VMs with swiftvmm_vm runs once more, never
twice, when exactly one of them reported a triple fault with its vCPU in the reset state and the test
host's KVM trace shows the emulator's pattern (swiftvmm_kit.l1trace); the test then reports a
warning that says so, with the first attempt's failure. Any other triple fault is a failure, with
the trace's verdict in the report. On a host with hardware virtualization nothing is retried.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Generator, Optional

import pytest

from .binary import find_binary, host_kvm
from .errors import BinaryNotFound, KitError
from .image import GuestImage, guest_image
from .l1trace import L1Trace, judge
from .testhost import cache_root, inside, python_command, testhost_command
from .vm import VM, created_since, creation_mark

VM_FIXTURES = ("swiftvmm_vm",)
REPORT_LINES = 60     # of swiftvmm's stderr
CONSOLE_LINES = 2000  # of the guest's console (all of it, for the quiet guests tests use)
_MARK_KEY = pytest.StashKey[int]()
_INNER_KEY = pytest.StashKey[int]()
_SKIPPED_EARLIER_KEY = pytest.StashKey[int]()
_FIXTURE_VMS_KEY = pytest.StashKey[list]()    # the VMs swiftvmm_vm made in the current attempt
_trace: list[Optional[L1Trace]] = []          # inside the test host: the KVM trace, opened on first use
#: Inside the test host: the file (in the shared cache) where the session notes each test that passed,
#: so that a rerun after the test host's kernel failed runs only the others.
PASSED_FILE_ENV = "SWIFTVMM_KIT_PASSED_FILE"
_call_passed: dict[str, bool] = {}  # inside the test host: nodeid → whether its call passed


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("swiftvmm", "swiftvmm test kit")
    group.addoption("--swiftvmm-bin", metavar="PATH", default=None, help="the swiftvmm executable")
    group.addoption("--swiftvmm-via", choices=("auto", "direct", "testhost"), default=None,
                    help="where guests run: auto (default), direct, or inside the nested test host")
    group.addoption("--swiftvmm-testhost-timeout", type=int, default=1800, metavar="SECONDS",
                    help="time limit of a test-host session (default 1800)")
    group.addoption("--swiftvmm-env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="pass an environment variable into the test-host session (repeatable; it starts with "
                         "a clean environment, with every SWIFTVMM_* variable passed)")
    group.addoption("--swiftvmm-keep", action="store_true", help="keep each VM's temporary directory")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "swiftvmm_kvm: the test boots guests under swiftvmm: it needs a /dev/kvm "
                                       "with hardware virtualization (or the nested test host)")
    config.addinivalue_line("markers", "swiftvmm_no_retry: never run the test again after the test host's emulator "
                                       "triple-faulted one of its guests")
    binary = config.getoption("swiftvmm_bin")
    if binary:
        os.environ["SWIFTVMM"] = str(Path(binary).resolve())
    if config.getoption("swiftvmm_keep"):
        os.environ["SWIFTVMM_KIT_KEEP"] = "1"


def _via(config: pytest.Config) -> str:
    via = config.getoption("swiftvmm_via") or os.environ.get("SWIFTVMM_KIT_VIA") or "auto"
    if via not in ("auto", "direct", "testhost"):
        raise pytest.UsageError(f"SWIFTVMM_KIT_VIA={via!r}: must be auto, direct or testhost")
    return via


def _needs_kvm(item: pytest.Item) -> bool:
    """Marked swiftvmm_kvm (collection marks every test that uses a VM fixture)."""
    return item.get_closest_marker("swiftvmm_kvm") is not None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in VM_FIXTURES) and not item.get_closest_marker("swiftvmm_kvm"):
            item.add_marker(pytest.mark.swiftvmm_kvm)
    passed = _passed_earlier()
    if passed:
        # A rerun after the test host's kernel failed: what passed before is not run again.
        done = [i for i in items if i.nodeid in passed]
        items[:] = [i for i in items if i.nodeid not in passed]
        config.hook.pytest_deselected(items=done)
        session.stash[_SKIPPED_EARLIER_KEY] = len(done)
        print(f"swiftvmm: {len(done)} test(s) passed in this run's earlier test-host session (its kernel failed "
              f"after them): not run again", flush=True)


def _passed_file() -> Optional[str]:
    """Inside the test host: where this session notes its passed tests (None when not asked to)."""
    return os.environ.get(PASSED_FILE_ENV) if inside() else None


def _passed_earlier() -> set[str]:
    path = _passed_file()
    if not path:
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            return {line.rstrip("\n") for line in f if line.endswith("\n")}
    except FileNotFoundError:
        return set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Inside the test host with a passed-file: a test that passed (its call, and its teardown after it) is noted."""
    path = _passed_file()
    if not path:
        return
    if report.when == "call":
        _call_passed[report.nodeid] = report.passed
    elif report.when == "teardown" and report.passed and _call_passed.pop(report.nodeid, False):
        with open(path, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")
            f.flush()
            os.fsync(f.fileno())


def _host_kind() -> tuple[str, str]:
    try:
        return host_kvm(find_binary())
    except BinaryNotFound as e:
        return "unknown", str(e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> Optional[bool]:
    """Runs the whole session in the nested test host when the VMs cannot run here."""
    config = session.config
    if inside() or config.option.collectonly or not any(_needs_kvm(i) for i in session.items):
        return None
    if session.testsfailed and not config.option.continue_on_collection_errors:
        return None  # pytest's own loop reports the collection errors and stops
    via = _via(config)
    if via == "direct":
        return None
    kind, line = _host_kind()
    if via == "auto" and kind in ("hardware", "unknown"):
        return None
    binary = find_binary()
    args = list(config.invocation_params.args)
    inner = python_command(["-m", "pytest", "-p", "no:cacheprovider", *args])
    cwd = Path(config.invocation_params.dir)
    passed = [e if "=" in e else f"{e}={os.environ.get(e, '')}" for e in config.getoption("swiftvmm_env")]
    # Where the sessions note the tests that passed (in the cache, which the test host shares).
    records = cache_root() / "kit-sessions"
    records.mkdir(parents=True, exist_ok=True)
    for old in records.glob("run-*"):  # left by a run that was killed, a day or more ago
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    record_dir = Path(tempfile.mkdtemp(prefix="run-", dir=records))
    passed.append(f"{PASSED_FILE_ENV}={record_dir / 'passed'}")
    argv = testhost_command(inner, binary, config.getoption("swiftvmm_testhost_timeout"), cwd, passed)
    capman = config.pluginmanager.getplugin("capturemanager")
    tr = config.pluginmanager.getplugin("terminalreporter")
    note = (f"swiftvmm: {len(session.items)} test(s) need a KVM with hardware virtualization and this host's is "
            f"not ({line}): running this pytest session inside the nested test host ({argv[0]})")
    if tr is not None:
        tr.write_line(note)
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        try:
            rc, lockup = _run_streaming(argv, cwd)
            for attempt in range(TESTHOST_RERUNS):
                if not (rc == 125 and lockup):
                    break
                # The test host's own kernel locked up or panicked (testhost.sh ends such a session at
                # once): not the tests' doing, so the session runs again, at most TESTHOST_RERUNS
                # times, and says so; the tests that passed before it failed are not run again.
                print(f"swiftvmm: the test host's kernel failed; running the session again "
                      f"({attempt + 1} of at most {TESTHOST_RERUNS} reruns)", flush=True)
                rc, lockup = _run_streaming(argv, cwd)
        finally:
            shutil.rmtree(record_dir, ignore_errors=True)
    session.stash[_INNER_KEY] = rc
    if tr is not None:
        # The summary line counts them as what they were here: tests that ran elsewhere.
        tr.stats.setdefault("ran in the nested test host", []).extend(_Elsewhere() for _ in session.items)
    if rc != 0:
        session.testsfailed = max(session.testsfailed, 1)
    return True


# How often a session whose test host's kernel failed runs again. Two: QEMU 7.2's emulated SVM
# panicked the test host's kernel twice in three CI runs on 2026-12-05 (a vCPU thread's kernel
# stack overflowed inside KVM_RUN), so two in one run is not rare enough to fail CI for.
TESTHOST_RERUNS = 2

# testhost.sh's message when the test host's kernel failed: a soft lockup, a stall, no heartbeat, a panic.
# Not anchored: the inner pytest's progress dots may precede it on the same line (CI, 2026-12-05).
_LOCKUP = re.compile(r"testhost: .*its kernel (locked up|panicked) \(")


def _run_streaming(argv: list[str], cwd: Path) -> tuple[int, bool]:
    """Runs argv with its output passed through as it comes; its status, and whether testhost.sh
    said that the test host's kernel locked up or panicked (a line anywhere in the output: its
    diagnostics follow)."""
    lockup = False
    sys.stdout.flush()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        lockup = lockup or bool(_LOCKUP.search(line))
    return proc.wait(), lockup


class _Elsewhere:
    """A placeholder report in the terminal's stats (it only counts)."""

    count_towards_summary = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.stash.get(_SKIPPED_EARLIER_KEY, 0):
        session.exitstatus = pytest.ExitCode.OK  # a rerun left with nothing to do: all had passed
    rc = session.stash.get(_INNER_KEY, None)
    if rc is not None:
        # 124/125: testhost.sh's timeout / the test host itself failed; pytest's own codes pass through.
        session.exitstatus = rc


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rc = terminalreporter._session.stash.get(_INNER_KEY, None) if getattr(terminalreporter, "_session", None) else None
    if rc is not None:
        what = {0: "all passed", 124: "the test-host session timed out", 125: "the test host failed"}.get(
            rc, f"pytest there exited {rc}")
        terminalreporter.write_line(f"swiftvmm: the tests ran inside the nested test host (output above): {what}")


def _l1trace() -> Optional[L1Trace]:
    if not _trace:
        trace, why = L1Trace.open()
        if trace is None and os.environ.get("TESTHOST") == "1":
            print(f"swiftvmm: no KVM trace in the test host ({why}): a triple fault will not be put down to "
                  f"the emulator", flush=True)
        _trace.append(trace)
    return _trace[0]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Optional[bool]:
    """Inside the test host, a test that uses swiftvmm_vm: one more attempt when the first failed on
    the emulator's triple fault (the module's text). Its first attempt's reports are not logged."""
    if not inside() or "swiftvmm_vm" not in getattr(item, "fixturenames", ()):
        return None
    trace = _l1trace()
    if trace is None and os.environ.get("TESTHOST") != "1":
        return None
    from _pytest.runner import runtestprotocol

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for attempt in (1, 2):
        item.stash[_FIXTURE_VMS_KEY] = []
        if trace is not None:
            trace.arm()
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        failed = [r for r in reports if r.failed]
        if not failed:
            break
        verdict = judge(trace, [vm.stderr for vm in item.stash[_FIXTURE_VMS_KEY]])
        if verdict is None:
            break
        section = ("swiftvmm: the test host's verdict on the triple fault", verdict.record)
        for r in failed:
            r.sections.append(section)
        if attempt == 2 or verdict.retry is None or item.get_closest_marker("swiftvmm_no_retry"):
            break
        first = "; ".join(_failure_line(r) for r in failed)
        item.warn(pytest.PytestWarning(
            f"{item.nodeid} ran twice: {verdict.retry}; the first attempt failed with: {first}"))
        print(f"\nswiftvmm: {item.nodeid}: {verdict.retry}; running it once more", flush=True)
    for r in reports:
        item.ihook.pytest_runtest_logreport(report=r)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _failure_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = (getattr(crash, "message", None) or report.longreprtext).strip()
    return text.splitlines()[0] if text else f"its {report.when} failed"


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_MARK_KEY] = creation_mark()
    if item.get_closest_marker("swiftvmm_kvm") is None or inside():
        return
    kind, line = _host_kind()
    if kind == "unknown":
        pytest.fail(line, pytrace=False)
    if kind != "hardware":
        pytest.skip(f"needs a /dev/kvm with hardware virtualization ({line}); run with --swiftvmm-via=auto or "
                    f"testhost to run it in the nested test host")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or _MARK_KEY not in item.stash:
        return
    for vm in created_since(item.stash[_MARK_KEY]):
        if vm.process is None:
            continue
        status = vm.exit_status()
        state = "running" if status is None else f"exited {status}"
        console = vm.console.lines if vm._console is not None else []
        shown = console[-CONSOLE_LINES:]
        title = f"the last {len(shown)} of its {len(console)} lines" if len(shown) < len(console) else "all of it"
        report.sections.append((f"swiftvmm {vm.name} console, {title} ({state})", "\n".join(shown) or "(empty)"))
        report.sections.append((f"swiftvmm {vm.name} QMP transcript", vm.qmp_transcript()))
        if status is None:
            report.sections.append((f"swiftvmm {vm.name} threads", vm.threads()))
        err = vm.stderr.strip()
        if err:
            report.sections.append((f"swiftvmm {vm.name} stderr", "\n".join(err.splitlines()[-REPORT_LINES:])))
        report.sections.append((f"swiftvmm {vm.name} command", " ".join(vm.argv)))


@pytest.fixture(scope="session")
def swiftvmm_bin() -> Path:
    """The swiftvmm executable (--swiftvmm-bin, $SWIFTVMM, or PATH)."""
    try:
        return find_binary()
    except BinaryNotFound as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def swiftvmm_guest_image() -> Callable[..., GuestImage]:
    """swiftvmm_guest_image(script="", modules=(), files={}, after="poweroff") -> GuestImage: the
    host's kernel with a busybox initramfs that runs `script` (see swiftvmm_kit.guest_image)."""
    return guest_image


@pytest.fixture
def swiftvmm_vm(swiftvmm_bin: Path, request: pytest.FixtureRequest) -> Generator[Callable[..., VM], None, None]:
    """swiftvmm_vm(kernel_or_image, **VM options) -> a started VM; every VM it made is closed at
    the end of the test (and its console is in the report of a failing test)."""
    made: list[VM] = []
    request.node.stash[_FIXTURE_VMS_KEY] = made  # judged after a failed attempt in the test host

    def factory(*args: Any, **kwargs: Any) -> VM:
        kwargs.setdefault("binary", swiftvmm_bin)
        vm = VM(*args, **kwargs)
        made.append(vm)
        try:
            return vm.start()
        except KitError as e:
            pytest.fail(str(e), pytrace=False)

    yield factory
    for vm in made:
        vm.close()
