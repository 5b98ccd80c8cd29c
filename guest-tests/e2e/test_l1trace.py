"""The harness's judgement of triple faults (swiftvmm_kit/l1trace.py): a guest's own triple fault is a crash that no
retry hides; only the emulator's pattern in the test host's KVM trace may be retried.

The unit tests judge traces; the lines are as the test host's kernel (Debian 6.1) prints them. The
guest case makes a real triple fault: with reboot=t, Linux reboots by loading an empty IDT and
executing int3."""

from __future__ import annotations

import os

import pytest

from guestrun import MARKER_INIT, GuestRun
from swiftvmm_kit.l1trace import L1Trace, classify, parse, reset_state_triple_faults

TRIPLE = GuestRun("triple-fault", case_script="reboot -f", cmdline_extra="reboot=t", swiftvmm_args=("--memory", "256M"))
GUEST_RUNS = [TRIPLE]


def _exit(tid: int, ts: str, reason: str, info2: str = "0x0000000000000000", intr: str = "0x00000000",
          rip: str = "0xffffffffc042c20c", err: str = "0x00000000") -> str:
    return (f"           vcpu0-{tid}     [001] .....    {ts}: kvm_exit: vcpu 0 reason {reason} rip {rip} "
            f"info1 0x0000000200000006 info2 {info2} intr_info {intr} error_code {err}")


def _virq(tid: int, ts: str, vector: str, extra: str = "") -> str:
    return f"           vcpu0-{tid}     [001] .....    {ts}: kvm_inj_virq: IRQ {vector}{extra}"


# The emulator's triple faults as the test host traced them (restored clones, 2026-12-06), and the
# one the README describes (an IRQ injected after an npf exit, not delivered).
PF_AFTER_NPF = [  # a page-walk write faulted (npf); then a reserved-bit fault on the fetch it was for
    _exit(251, "91.520091", "hlt", rip="0xffffffff9ec592ea"),
    _virq(251, "91.669988", "0x24"),
    _exit(251, "91.670123", "npf", info2="0x000000000ab90ff8"),
    _exit(251, "91.670354", "shutdown", intr="0x80000b0e", err="0x00000018"),
]
PF_AFTER_IO = [  # the next instruction's fetch, on the page just executed from, "not present"
    _exit(217, "72.937040", "io", rip="0xffffffff9e8aa474", intr="0x00000024"),
    _exit(217, "72.937196", "io", rip="0xffffffff9e8aa474"),
    _exit(217, "72.937457", "shutdown", rip="0xffffffff9e8aa475", intr="0x80000b0e", err="0x00000010"),
]
PF_AFTER_MSR = [  # a fresh boot (boot_stress_scenario.py, 2026-12-06): the fetch of the instruction after a
    # WRMSR (the timer's TSC deadline, emulated by KVM), on the page just executed from, "not present"
    _exit(465, "302.832879", "vintr", rip="0xffffffffa1659b99"),
    _virq(465, "302.832917", "0xec"),
    _exit(465, "302.832990", "msr", rip="0xffffffffa0c75059", intr="0x000000ec"),
    _exit(465, "302.833379", "shutdown", rip="0xffffffffa0c7505b", intr="0x80000b0e", err="0x00000010"),
]
IRQ_AFTER_NPF = [
    _exit(142, "16.800000", "msr"),
    _exit(142, "16.810000", "npf", info2="0x0000000001234000"),
    _virq(142, "16.810100", "0xec"),
    _exit(142, "16.810200", "shutdown", intr="0x800000ec"),
]


@pytest.mark.parametrize("lines, words", [
    (PF_AFTER_NPF, "exception 0xe being delivered) at rip 0xffffffffc042c20c, after a npf exit at rip "
                   "0xffffffffc042c20c (GPA 0xab90ff8), IRQs injected: none"),
    (PF_AFTER_IO, "exception 0xe being delivered) at rip 0xffffffff9e8aa475, after a io exit at rip 0xffffffff9e8aa474"),
    (IRQ_AFTER_NPF, "external interrupt 0xec being delivered) at rip 0xffffffffc042c20c, after a npf exit"),
    (PF_AFTER_MSR, "exception 0xe being delivered) at rip 0xffffffffa0c7505b, after a msr exit at rip 0xffffffffa0c75059"),
])
def test_the_emulators_patterns_are_recognised(lines, words):
    (s,) = classify(parse("\n".join(lines)))
    assert s.emulator, s.why
    assert words in s.why and "the emulator's pattern" in s.why
    assert s.excerpt[-1] == lines[-1] and len(s.excerpt) == len(lines)
    assert s.thread == "vcpu0-" + lines[-1].split("-")[1].split()[0]


def test_a_guests_own_triple_fault_is_not_the_emulators():
    # What reboot=t gives (the test host's trace of it): int3 with an empty IDT, a software interrupt.
    lines = [_exit(142, "16.883548", "msr"), _exit(142, "16.883858", "shutdown", intr="0x80000403")]
    (s,) = classify(parse("\n".join(lines)))
    assert not s.emulator
    assert "software interrupt 0x3 being delivered" in s.why and "not the emulator's" in s.why


@pytest.mark.parametrize("lines, words", [
    # A software interrupt after an npf exit.
    ([_exit(7, "1.0", "npf"), _exit(7, "1.2", "shutdown", intr="0x80000403")], "IRQs injected: none"),
    # The IRQ being delivered is not the one KVM injected.
    ([_exit(7, "1.0", "npf"), _virq(7, "1.1", "0xf3"), _exit(7, "1.2", "shutdown", intr="0x800000ec")],
     "IRQs injected: 0xf3: not"),
    # An IRQ that was not injected at all.
    ([_exit(7, "1.0", "npf"), _exit(7, "1.2", "shutdown", intr="0x800000ec")], "IRQs injected: none: not"),
    # A general-protection fault, not a page fault.
    ([_exit(7, "1.0", "npf"), _exit(7, "1.2", "shutdown", intr="0x80000b0d")], "exception 0xd being delivered"),
    # After an exit other than npf, io or msr (a HLT: the guest chose to wait).
    ([_exit(7, "1.0", "hlt"), _virq(7, "1.1", "0xec"), _exit(7, "1.2", "shutdown", intr="0x800000ec")],
     "after a hlt exit"),
    # On another page than the exit before it: the guest ran on in between.
    ([_exit(7, "1.0", "io", rip="0xffffffff81000ff0"), _exit(7, "1.2", "shutdown", intr="0x80000b0e",
                                                              rip="0xffffffff81001000")], "(another page)"),
    # No event being delivered at all.
    ([_exit(7, "1.0", "npf"), _virq(7, "1.1", "0xec"), _exit(7, "1.2", "shutdown")], "no event being delivered"),
    # The thread's earlier exits were not traced.
    ([_virq(7, "1.1", "0xec"), _exit(7, "1.2", "shutdown", intr="0x800000ec")], "earlier exits are not in the trace"),
])
def test_anything_else_is_not_the_emulators(lines, words):
    (s,) = classify(parse("\n".join(lines)))
    assert not s.emulator, s.why
    assert words in s.why


def test_each_shutdown_is_judged_on_its_own_threads_events():
    # Another vCPU thread's npf exit and injection, interleaved, do not make thread 9's pattern.
    lines = [_exit(9, "1.0", "hlt"), _exit(8, "1.05", "npf"), _virq(8, "1.1", "0xec"), _virq(9, "1.15", "0xec"),
             _exit(9, "1.2", "shutdown", intr="0x800000ec")]
    (s,) = classify(parse("\n".join(lines)))
    assert s.thread == "vcpu0-9" and not s.emulator and "after a hlt exit" in s.why
    assert all("-8 " not in e for e in s.excerpt)


def test_a_trace_without_shutdown_judges_nothing():
    assert classify(parse("\n".join(IRQ_AFTER_NPF[:-1]) + "\n# tracer: nop\ngarbage line\n")) == []


def test_triple_faults_in_the_reset_state_are_counted():
    dump = ("swiftvmm: guest crashed (triple fault on vCPU 0\nvCPU 0: rip=0x000000000000fff0 rsp=0x0000000000000000 "
            "rflags=0x0000000000000002\n  cs=f000 base=0x00000000ffff0000 l=0 db=0)\n")
    real = dump.replace("rip=0x000000000000fff0", "rip=0xffffffff81000000")
    assert reset_state_triple_faults([dump, "nothing"]) == 1
    assert reset_state_triple_faults([dump + dump]) == 2
    assert reset_state_triple_faults([real]) == 0


def test_a_guest_triple_fault_is_a_crash_that_is_not_retried(guest):
    r = guest("triple-fault")
    r.assert_in_order(MARKER_INIT)
    r.assert_exit(3)
    r.check("guest crashed (triple fault on vCPU" in r.output, "swiftvmm did not report the triple fault")
    if os.environ.get("TESTHOST") != "1":
        pytest.skip("swiftvmm ran directly, not in the test host: there is no KVM trace of the test host to judge by")
    trace = r.results_dir / "triple-fault.l1trace"
    r.check(trace.exists(), "the harness wrote no verdict on the triple fault (triple-fault.l1trace)")
    text = trace.read_text()
    r.check("software interrupt 0x3 being delivered" in text and "not the emulator's" in text,
            f"the trace's verdict is not the guest's own int3 triple fault:\n{text}")


# -- the harness's decision (GuestSession), on a fake trace and fake attempts ---------------------------
DUMP = ("swiftvmm: guest crashed (triple fault on vCPU 0\nvCPU 0: rip=0x000000000000fff0 rsp=0x0000000000000000\n"
        "  cs=f000 base=0x00000000ffff0000 l=0 db=0)\n")


class _FakeTrace:
    def __init__(self, lines):
        self.lines, self.armed = lines, 0

    def arm(self):
        self.armed += 1

    def shutdowns(self):
        return classify(parse("\n".join(self.lines)))

    def last_events(self):
        return "the last events of each vCPU thread (fake)"


def _session(tmp_path, monkeypatch, trace, outcomes):
    """A GuestSession whose attempts give `outcomes` in turn: (status, stderr texts). It does not touch
    the real trace (in the test host, the suite's own session is using it)."""
    import guestrun

    monkeypatch.setattr(guestrun.L1Trace, "open", classmethod(lambda cls: (None, "unit test")))
    session = guestrun.GuestSession([GuestRun("c")], tmp_path, log=lambda line: None)
    session.trace = trace
    session.initrd = lambda name: tmp_path / "initrd"  # type: ignore[method-assign]
    attempts = iter(outcomes)

    def attempt(run, initrd, out, art):
        art.mkdir()
        status, errs = next(attempts)
        out.write_text("".join(errs))
        return status, errs

    session._attempt = attempt  # type: ignore[method-assign]
    return session


@pytest.mark.parametrize("trace, outcomes, runs", [
    # The emulator's pattern: one more run, which passes.
    (IRQ_AFTER_NPF, [(3, [DUMP]), (0, [""])], 2),
    # The same twice: two runs, no third.
    (PF_AFTER_IO, [(3, [DUMP]), (3, [DUMP])], 2),
    # A guest's own triple fault: no retry.
    ([_exit(1, "1.0", "msr"), _exit(1, "1.1", "shutdown", intr="0x80000403")], [(3, [DUMP]), (0, [""])], 1),
    # Two processes triple-faulted (only the first is traced): no retry.
    (IRQ_AFTER_NPF, [(3, [DUMP, DUMP]), (0, [""])], 1),
    # A triple fault whose vCPU is not in its reset state (swiftvmm read real registers): no retry.
    (IRQ_AFTER_NPF, [(3, [DUMP.replace("fff0", "1000")]), (0, [""])], 1),
])
def test_the_harness_retries_only_the_emulators_triple_fault(tmp_path, monkeypatch, trace, outcomes, runs):
    fake = _FakeTrace(trace)
    session = _session(tmp_path, monkeypatch, fake, outcomes)
    session._execute(session.runs["c"])
    rd = session.results_dir
    assert fake.armed == runs
    assert (rd / "c.retried").exists() == (runs == 2)
    assert (rd / "c.attempt1.out").exists() == (runs == 2)
    if runs == 2:
        assert "emulated SVM" in (rd / "c.retried").read_text()
        assert "the emulator's pattern" in (rd / "c.attempt1.l1trace").read_text()
    if outcomes[runs - 1][0] == 3 and "fff0" in outcomes[runs - 1][1][0]:
        assert (rd / "c.l1trace").exists()


def test_without_a_trace_a_triple_fault_is_not_retried(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch, None, [(3, [DUMP]), (0, [""])])
    session._execute(session.runs["c"])
    assert not (session.results_dir / "c.retried").exists()
    assert "no KVM trace" in (session.results_dir / "c.l1trace").read_text()


def test_a_failure_without_a_triple_fault_keeps_the_vcpus_last_events(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch, _FakeTrace([]), [(1, ["the guest hung"]), (0, [""])])
    session._execute(session.runs["c"])
    assert not (session.results_dir / "c.retried").exists()
    assert "the last events of each vCPU thread" in (session.results_dir / "c.l1trace").read_text()


def test_last_events_keeps_the_newest_of_each_vcpu_thread(tmp_path):
    lines = [_exit(7, f"{i}.0", "hlt") for i in range(1, 30)] + [_virq(8, "40.0", "0xec")]
    lines.append("          python3-99      [000] .....    41.0: kvm_exit: vcpu 0 reason io rip 0x1 info1 0x0 "
                 "info2 0x0 intr_info 0x00000000 error_code 0x00000000")
    (tmp_path / "trace").write_text("# tracer: nop\n" + "\n".join(lines) + "\n")
    (tmp_path / "tracing_on").write_text("1\n")
    text = L1Trace(tmp_path).last_events(per_thread=3)
    assert (tmp_path / "tracing_on").read_text() == "0\n"
    assert "last event at 40.0 s" in text
    assert "vcpu0-7:" in text and "vcpu0-8:" in text and "python3" not in text
    assert "29.0: kvm_exit" in text and "27.0: kvm_exit" in text and "26.0: kvm_exit" not in text


def test_the_trace_can_be_opened_twice(monkeypatch):
    """The kit's plugin opens the trace for a test that uses swiftvmm_vm, and such a test (the stress
    scenarios) may open it too: the kernel refuses a trigger it already has (EEXIST)."""
    if os.environ.get("TESTHOST") != "1":
        pytest.skip("needs the test host's tracefs (TESTHOST=1)")
    first, why = L1Trace.open()
    assert first is not None, why
    second, why = L1Trace.open()
    assert second is not None, why
