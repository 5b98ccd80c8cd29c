"""The pytest plugin: fixtures, options, failure reports, and the run inside the test host."""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

KIT_DIR = Path(__file__).resolve().parent.parent
FAKE_TESTHOST = Path(__file__).resolve().parent / "fake_testhost.py"


def plugin_args() -> list[str]:
    """-p for the plugin unless pip installed it (its pytest11 entry point then loads it)."""
    installed = any(ep.name == "swiftvmm" for ep in metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "swiftvmm_kit.pytest_plugin"]


@pytest.fixture
def run(pytester: pytest.Pytester, fake: Path, kernel: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(KIT_DIR))
    monkeypatch.setenv("KIT_TEST_KERNEL", str(kernel))

    def go(source: str, *args: str) -> pytest.RunResult:
        pytester.makepyfile(test_user=source)
        return pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", *args, timeout=120)
    return go


VM_TEST = """
import os
def test_boot(swiftvmm_vm):
    vm = swiftvmm_vm(os.environ["KIT_TEST_KERNEL"])
    vm.console.expect("init reached", 10)
    vm.qmp("query-status")
    assert vm.status == "running"
"""


def test_a_vm_test_passes_with_the_fixture(run):
    run(VM_TEST).assert_outcomes(passed=1)


def test_a_failing_test_reports_console_stderr_and_qmp_transcript(run, monkeypatch):
    monkeypatch.setenv("FAKE_CONSOLE", "the guest said this|and then that")
    result = run(VM_TEST.replace('== "running"', '== "paused"'))
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "swiftvmm vm1 console, all of it (running)" in out
    assert "the guest said this" in out and "and then that" in out
    assert "swiftvmm vm1 QMP transcript" in out and '"execute": "query-status"' in out
    assert "swiftvmm vm1 command" in out
    assert "swiftvmm vm1 threads" in out and "state S" in out  # still running when the test failed


def test_swiftvmm_bin_option(run, fake, monkeypatch):
    monkeypatch.delenv("SWIFTVMM")
    run(VM_TEST).assert_outcomes(errors=1)
    run(VM_TEST, "--swiftvmm-bin", str(fake)).assert_outcomes(passed=1)


def test_a_missing_binary_is_a_clear_error(run, monkeypatch, tmp_path):
    monkeypatch.setenv("SWIFTVMM", str(tmp_path / "nope"))
    result = run(VM_TEST)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*swiftvmm executable *nope ($SWIFTVMM) does not exist*"])


def test_direct_on_emulated_kvm_skips_with_the_reason(run, monkeypatch):
    monkeypatch.setenv("FAKE_KVM", "emulated: kvm_pvm")
    result = run(VM_TEST, "--swiftvmm-via=direct", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a /dev/kvm with hardware virtualization (emulated: kvm_pvm)*"])


@pytest.fixture
def emulated_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This host's KVM emulated, the fake test host's hardware; returns the fake test host's log."""
    log = tmp_path / "testhost.log"
    monkeypatch.setenv("FAKE_KVM", "emulated: kvm_pvm")
    monkeypatch.setenv("FAKE_KVM_INSIDE", "hardware: nested")
    monkeypatch.setenv("SWIFTVMM_TESTHOST", str(FAKE_TESTHOST))
    monkeypatch.setenv("FAKE_TESTHOST_LOG", str(log))
    monkeypatch.setenv("SWIFTVMM_CACHE", str(tmp_path / "cache"))
    return log


@pytest.mark.parametrize("outcome", ["pass", "fail"])
def test_auto_on_emulated_kvm_runs_the_session_in_the_test_host(run, emulated_host, tmp_path, outcome):
    log = emulated_host
    source = VM_TEST if outcome == "pass" else VM_TEST + "\ndef test_two():\n    assert False\n"
    result = run(source, "--swiftvmm-env", "KIT_TEST_KERNEL")
    out = result.stdout.str()
    assert "running this pytest session inside the nested test host" in out
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 1
    argv = calls[0]
    assert argv[argv.index("--rw") + 1] == str(tmp_path / "cache")
    assert "SWIFTVMM_KIT_INSIDE_TESTHOST=1" in argv and f"SWIFTVMM={os.environ['SWIFTVMM']}" in argv
    assert argv[argv.index("--") + 1] == sys.executable
    if outcome == "pass":
        assert result.ret == 0
        assert "1 passed" in out and "the tests ran inside the nested test host (output above): all passed" in out
    else:
        assert result.ret == 1
        assert "1 failed, 1 passed" in out and "pytest there exited 1" in out


@pytest.mark.parametrize("what", ["its kernel locked up (soft lockup)",
                                  "its kernel locked up (its console silent for 180 s, no heartbeat)",
                                  "its kernel locked up (INFO: task python3:212 blocked for more than 120 seconds.)",
                                  "its kernel panicked (corrupted stack end detected inside scheduler)"])
def test_a_test_host_kernel_failure_reruns_the_session(run, emulated_host, monkeypatch, tmp_path, what):
    log = emulated_host
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_ONCE", str(tmp_path / "failed-once"))
    monkeypatch.setenv("FAKE_TESTHOST_FAILURE", what)
    result = run(VM_TEST, "--swiftvmm-env", "KIT_TEST_KERNEL")
    out = result.stdout.str()
    assert what in out and "running the session again (1 of at most 2 reruns)" in out
    assert len(log.read_text().splitlines()) == 2
    assert result.ret == 0 and "1 passed" in out


@pytest.mark.parametrize("failures, sessions, passes", [(2, 3, True), (3, 3, False)])
def test_a_test_host_kernel_failure_reruns_the_session_at_most_twice(run, emulated_host, monkeypatch, tmp_path,
                                                                       failures, sessions, passes):
    log = emulated_host
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_ONCE", str(tmp_path / "failures"))
    monkeypatch.setenv("FAKE_TESTHOST_FAILURES", str(failures))
    monkeypatch.setenv("FAKE_TESTHOST_FAILURE", "its kernel panicked (Fatal exception in interrupt)")
    result = run(VM_TEST, "--swiftvmm-env", "KIT_TEST_KERNEL")
    out = result.stdout.str()
    assert "(2 of at most 2 reruns)" in out and "(3 of" not in out
    assert len(log.read_text().splitlines()) == sessions
    assert (result.ret == 0) == passes


RERUN_TESTS = """
import os
from pathlib import Path
RUNS = Path(os.environ["KIT_TEST_RUNS"])
def note(name):
    with RUNS.open("a") as f:
        f.write(name + "\\n")
def test_one(swiftvmm_vm):
    note("one")
def test_two(swiftvmm_vm):
    note("two")
    if (RUNS.parent / "died").exists():
        return
    (RUNS.parent / "died").write_text("")
    os._exit(3)  # the test host's kernel failing in the middle of this test
def test_three(swiftvmm_vm):
    note("three")
"""


def test_a_rerun_runs_only_the_tests_that_had_not_passed(run, emulated_host, monkeypatch, tmp_path):
    log = emulated_host
    runs = tmp_path / "runs" / "runs.txt"
    runs.parent.mkdir()
    monkeypatch.setenv("KIT_TEST_RUNS", str(runs))
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_ONCE", str(tmp_path / "failed-once"))
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_AFTER_RUN", "1")
    result = run(RERUN_TESTS, "--swiftvmm-env", "KIT_TEST_RUNS")
    out = result.stdout.str()
    assert len(log.read_text().splitlines()) == 2
    # test_one passed in the session that failed; the rerun ran test_two (cut off) and test_three (never reached).
    assert runs.read_text().split() == ["one", "two", "two", "three"]
    assert "1 test(s) passed in this run's earlier test-host session" in out
    assert "2 passed, 1 deselected" in out
    assert result.ret == 0
    # The notes of the sessions are removed once the run ends.
    assert list((tmp_path / "cache" / "kit-sessions").iterdir()) == []


def test_a_rerun_with_nothing_left_to_run_passes(run, emulated_host, monkeypatch, tmp_path):
    log = emulated_host
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_ONCE", str(tmp_path / "failed-once"))
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_AFTER_RUN", "1")  # fails after all passed (e.g. at power-off)
    result = run(VM_TEST, "--swiftvmm-env", "KIT_TEST_KERNEL")
    out = result.stdout.str()
    assert len(log.read_text().splitlines()) == 2
    assert "1 test(s) passed in this run's earlier test-host session" in out and "1 deselected" in out
    assert result.ret == 0


def test_notes_of_killed_runs_are_removed_after_a_day(run, emulated_host, tmp_path):
    records = tmp_path / "cache" / "kit-sessions"
    stale, current = records / "run-stale", records / "run-current"  # current: another run, going on
    for d in (stale, current):
        d.mkdir(parents=True)
        (d / "passed").write_text("test_user.py::test_boot\n")
    os.utime(stale, (0, 2 * 86400))
    result = run(VM_TEST, "--swiftvmm-env", "KIT_TEST_KERNEL")
    assert result.ret == 0 and "1 passed" in result.stdout.str()
    assert not stale.exists() and (current / "passed").exists()


def test_a_failed_test_runs_again_in_the_rerun(run, emulated_host, monkeypatch, tmp_path):
    log = emulated_host
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_ONCE", str(tmp_path / "failed-once"))
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_AFTER_RUN", "1")
    result = run(VM_TEST + "\ndef test_two():\n    assert False\n", "--swiftvmm-env", "KIT_TEST_KERNEL")
    out = result.stdout.str()
    assert len(log.read_text().splitlines()) == 2
    assert "1 failed, 1 deselected" in out
    assert result.ret == 1


def test_other_test_host_failures_are_not_rerun(run, emulated_host, monkeypatch, tmp_path):
    log = emulated_host
    monkeypatch.setenv("FAKE_TESTHOST_FAIL_ONCE", str(tmp_path / "failed-once"))
    monkeypatch.setenv("FAKE_TESTHOST_FAILURE", "the command was started but reported no exit status")
    result = run(VM_TEST, "--swiftvmm-env", "KIT_TEST_KERNEL")
    out = result.stdout.str()
    assert "reported no exit status" in out and "running the session again" not in out
    assert len(log.read_text().splitlines()) == 1
    assert result.ret != 0


def test_collection_errors_stop_before_the_test_host(run, emulated_host, pytester):
    log = emulated_host
    pytester.makepyfile(test_broken="import no_such_module_at_all\n")
    result = run(VM_TEST)
    assert result.ret == 2 and "no_such_module_at_all" in result.stdout.str()
    assert not log.exists()


def test_tests_without_vms_stay_here(run, emulated_host):
    run("def test_plain():\n    assert 1 + 1 == 2\n").assert_outcomes(passed=1)
    assert not emulated_host.exists()


def test_no_test_host_is_said_clearly(run, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_KVM", "emulated: kvm_pvm")
    monkeypatch.setenv("SWIFTVMM_TESTHOST", str(tmp_path / "missing-testhost.sh"))
    result = run(VM_TEST)
    assert result.ret != 0
    assert "missing-testhost.sh" in result.stdout.str() + result.stderr.str()


def test_guest_image_fixture_is_the_builder(run):
    run("""
from swiftvmm_kit import guest_image
def test_factory(swiftvmm_guest_image):
    assert swiftvmm_guest_image is guest_image
""").assert_outcomes(passed=1)


# -- in the test host: one more attempt after the emulator's triple fault ---------------------------------
def _exit_line(ts: str, reason: str, intr: str = "0x00000000", rip: str = "0xffffffff81000100",
               info2: str = "0x0000000000000000") -> str:
    return (f"           vcpu0-300     [001] .....    {ts}: kvm_exit: vcpu 0 reason {reason} rip {rip} "
            f"info1 0x0000000200000006 info2 {info2} intr_info {intr} error_code 0x00000000\n")


# An IRQ injected on the entry after a nested page fault exit, not delivered: the emulator's pattern.
EMULATOR_TRACE = (_exit_line("10.0", "msr") + _exit_line("10.1", "npf", info2="0x0000000001234000")
                  + "           vcpu0-300     [001] .....    10.11: kvm_inj_virq: IRQ 0xec\n"
                  + _exit_line("10.2", "shutdown", intr="0x800000ec"))
# int3 with an empty IDT after an MSR exit: the guest's own triple fault.
GUEST_TRACE = _exit_line("10.0", "msr") + _exit_line("10.1", "shutdown", intr="0x80000403")

DONE_TEST = """
import os
import pytest
def test_boot(swiftvmm_vm):
    vm = swiftvmm_vm(os.environ["KIT_TEST_KERNEL"])
    vm.console.expect("guest: done", 10)
"""


@pytest.fixture
def in_testhost(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The session runs as the kit runs it inside the test host, with a fake tracefs; returns a
    function that sets the trace a faulting VM leaves and how many VMs fault, and reads back how
    many VMs started."""
    tracefs = tmp_path / "tracefs"
    (tracefs / "events" / "kvm" / "kvm_exit").mkdir(parents=True)
    (tracefs / "events" / "kvm" / "kvm_inj_virq").mkdir()
    (tracefs / "events" / "kvm" / "kvm_inj_exception").mkdir()
    counter = tmp_path / "vms-started"
    monkeypatch.setenv("SWIFTVMM_KIT_INSIDE_TESTHOST", "1")
    monkeypatch.setenv("TESTHOST", "1")
    monkeypatch.setenv("SWIFTVMM_KIT_TRACEFS", str(tracefs))
    monkeypatch.setenv("FAKE_TRIPLE_FAULT", str(counter))
    monkeypatch.setenv("FAKE_CONSOLE", "guest: done")

    def setup(trace: str, faults: int = 1):
        (tmp_path / "l1trace").write_text(trace)
        monkeypatch.setenv("FAKE_L1TRACE", str(tmp_path / "l1trace"))
        monkeypatch.setenv("FAKE_TRIPLE_FAULTS", str(faults))
        return lambda: len(counter.read_text()) if counter.exists() else 0
    return setup


def test_the_emulators_triple_fault_runs_the_test_once_more(run, in_testhost):
    started = in_testhost(EMULATOR_TRACE, faults=1)
    result = run(DONE_TEST)
    result.assert_outcomes(passed=1, warnings=1)
    assert started() == 2
    out = result.stdout.str()
    assert "test_boot ran twice: the test host's emulated SVM triple-faulted a guest" in out
    assert "the first attempt failed with" in out and "swiftvmm exited with status 3" in out


def test_the_emulators_triple_fault_twice_fails_with_the_verdict(run, in_testhost):
    started = in_testhost(EMULATOR_TRACE, faults=5)
    result = run(DONE_TEST)
    result.assert_outcomes(failed=1, warnings=1)
    assert started() == 2  # once more, never twice
    out = result.stdout.str()
    assert "the test host's verdict on the triple fault" in out and "the emulator's pattern" in out


def test_a_guests_own_triple_fault_is_not_run_again(run, in_testhost):
    started = in_testhost(GUEST_TRACE)
    result = run(DONE_TEST)
    result.assert_outcomes(failed=1)
    assert started() == 1
    out = result.stdout.str()
    assert "software interrupt 0x3 being delivered" in out and "not the emulator's" in out


def test_two_faulting_vms_are_not_run_again(run, in_testhost):
    started = in_testhost(EMULATOR_TRACE, faults=2)
    result = run("""
import os
def test_two(swiftvmm_vm):
    vms = [swiftvmm_vm(os.environ["KIT_TEST_KERNEL"]) for _ in range(2)]
    assert [vm.wait(10) for vm in vms] == [0, 0]
""")
    result.assert_outcomes(failed=1)
    assert started() == 2
    assert "2 processes triple-faulted" in result.stdout.str()


def test_the_no_retry_marker_and_a_failure_without_a_triple_fault_are_not_run_again(run, in_testhost):
    started = in_testhost(EMULATOR_TRACE)
    run(DONE_TEST.replace("def test_boot", "@pytest.mark.swiftvmm_no_retry\ndef test_boot")).assert_outcomes(failed=1)
    assert started() == 1
    run(DONE_TEST.replace('"guest: done"', '"never said"').replace("10)", "1)")).assert_outcomes(failed=1)
    assert started() == 2  # the fault (a count of 1) was used up above: this one just fails, once


def test_outside_the_test_host_nothing_is_run_again(run, in_testhost, monkeypatch):
    started = in_testhost(EMULATOR_TRACE)
    monkeypatch.delenv("TESTHOST")
    result = run(DONE_TEST)
    result.assert_outcomes(failed=1)
    assert started() == 1
