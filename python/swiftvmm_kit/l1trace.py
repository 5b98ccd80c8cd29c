"""The test host's KVM trace, for telling the emulator's triple faults from a guest's own.

QEMU's TCG emulation of SVM with nested paging (7.2, and 10.0 too) sometimes ends an L2 guest in a triple fault that
real hardware would not: on the vCPU's first entry after a nested page fault exit (or an I/O or MSR exit),
the emulated CPU fails to deliver the interrupt KVM injected, or reports a page fault that cannot be
(an instruction fetch from the page it had just executed from), and takes a SHUTDOWN exit (README,
"The test host"). KVM leaves such a vCPU in its reset state, so swiftvmm's register dump cannot tell
that from a triple fault of the guest itself, or from one that swiftvmm caused (e.g. a device
writing over the guest's page tables). The test host's kernel can, mostly: with its kvm_exit and
kvm_inj_virq trace events on, the vCPU thread's last events before the SHUTDOWN exit show which
(classify() says what counts as the emulator's and what the trace cannot rule out).

In the test host (the environment variable TESTHOST=1), L1Trace.open() turns those events on (a
trigger stops the trace at the first SHUTDOWN exit, so that later events cannot push it out of the
buffer). Both the pytest plugin (for every test that boots guests, when its session runs in the test
host) and the e2e harness (guest-tests/e2e/guestrun.py, per case) arm it before each attempt and
call judge() afterwards: one more attempt only for the emulator's pattern. Elsewhere (swiftvmm run
directly on a machine with hardware virtualization) there is no such trace, and a triple fault is
never put down to the emulator. For a failure without a triple fault (a guest that hangs), the last
events of each vCPU thread (L1Trace.last_events) say whether it was still running.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path
from typing import Optional, Sequence

TRACEFS = Path("/sys/kernel/tracing")
#: Where the trace is read instead of TRACEFS (the kit's unit tests give a fake one).
TRACEFS_ENV = "SWIFTVMM_KIT_TRACEFS"
EVENTS = ("kvm/kvm_exit", "kvm/kvm_inj_virq", "kvm/kvm_inj_exception")
SVM_EXIT_SHUTDOWN = 0x7F
BUFFER_KB = 4096  # per CPU: a 12 s Linux boot writes about 36,000 events, ~3 MB
EXCERPT = 12  # events of the vCPU thread shown before its SHUTDOWN exit

# "           vcpu0-142     [001] .....    16.883858: kvm_exit: vcpu 0 reason shutdown rip 0x... intr_info 0x80000403 ..."
_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<tid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>[\d.]+):\s+(?P<event>\w+):\s+(?P<rest>.*)$")
_EXIT = re.compile(r"reason (?P<reason>\S+) rip (?P<rip>0x[0-9a-f]+) info1 (?P<info1>0x[0-9a-f]+) "
                   r"info2 (?P<info2>0x[0-9a-f]+) intr_info (?P<intr>0x[0-9a-f]+)")
_VIRQ = re.compile(r"(?:IRQ|Soft/INTn) (?P<vector>0x[0-9a-f]+)")

_EVENT_TYPES = {0: "external interrupt", 2: "NMI", 3: "exception", 4: "software interrupt"}


@dataclasses.dataclass(frozen=True)
class Event:
    tid: int
    comm: str
    event: str
    rest: str
    line: str

    def exit_fields(self) -> Optional[dict[str, str]]:
        m = _EXIT.search(self.rest) if self.event == "kvm_exit" else None
        return m.groupdict() if m else None

    def injected_vector(self) -> Optional[int]:
        m = _VIRQ.search(self.rest) if self.event == "kvm_inj_virq" else None
        return int(m["vector"], 16) if m else None


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """A SHUTDOWN exit in the trace and what it says about its triple fault."""

    thread: str          # "vcpu0-142"
    emulator: bool       # one of the emulator's patterns (classify)
    why: str             # one line saying which pattern it is, and why
    excerpt: tuple[str, ...]  # the thread's last events, ending with the SHUTDOWN exit

    def report(self) -> str:
        return f"{self.thread}: {self.why}\n" + "\n".join(f"  {e.strip()}" for e in self.excerpt)


def parse(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            events.append(Event(int(m["tid"]), m["comm"], m["event"], m["rest"], line))
    return events


def _describe_intinfo(value: int) -> str:
    if not value & 0x8000_0000:
        return "no event being delivered"
    kind = _EVENT_TYPES.get((value >> 8) & 7, f"type {(value >> 8) & 7}")
    return f"{kind} {value & 0xFF:#x} being delivered"


PATTERN = ("the emulator's patterns: the SHUTDOWN comes on the vCPU's first entry after an npf, io or msr exit, on "
           "the page of that exit's RIP, while delivering the IRQ KVM injected for that entry or a page fault")


def _judge(what: str, intr: int, rip: int, previous: Optional[dict[str, str]], injected: list[int]) -> tuple[bool, str]:
    valid, kind, vector = bool(intr & 0x8000_0000), (intr >> 8) & 7, intr & 0xFF
    if previous is None:
        return False, f"{what}: the thread's earlier exits are not in the trace, so it cannot be put down to the emulator"
    prev_rip = int(previous["rip"], 16)
    after = f"after a {previous['reason']} exit at rip {prev_rip:#x}"
    inj = ", ".join(f"{v:#x}" for v in reversed(injected)) or "none"
    if previous["reason"] not in ("npf", "io", "msr"):
        return False, f"{what}, {after}: not the emulator's ({PATTERN})"
    if rip >> 12 != prev_rip >> 12:
        return False, f"{what} at rip {rip:#x}, {after} (another page): not the emulator's ({PATTERN})"
    if valid and kind == 0 and injected and injected[0] == vector:
        pass  # the IRQ injected for this entry
    elif valid and kind == 3 and vector == 0xE:
        pass  # a page fault
    else:
        return False, f"{what}, {after}, IRQs injected: {inj}: not the emulator's ({PATTERN})"
    gpa = f" (GPA {int(previous['info2'], 16):#x})" if previous["reason"] == "npf" else ""
    return True, (f"{what} at rip {rip:#x}, {after}{gpa}, IRQs injected: {inj}: the emulator's pattern (QEMU's "
                  f"TCG emulation of SVM with nested paging; README, \"The test host\")")


def classify(events: Sequence[Event]) -> list[Shutdown]:
    """Every SHUTDOWN exit in `events` (in trace order), each judged on its own thread's events.

    The emulator's triple faults, as traced in the test host (README, "The test host"), all came on
    the vCPU's first entry after an npf exit (a nested page fault, which KVM fixed: its page tables
    were cold after a restore, or the guest touched MMIO) or an io exit (emulated by KVM and
    swiftvmm), at the same RIP or the next instruction, delivering the interrupt KVM injected for
    that entry, or a page fault: an instruction fetch from the page the guest had just executed
    from ("not present"), or a reserved bit in a page-table entry that the npf exit's walk had just
    read. A fresh boot traced the same "not present" fetch of the next instruction after a WRMSR
    (an msr exit, which KVM emulated: the timer's TSC deadline) on 2026-12-06, so msr exits count
    too. The guest ran no instruction of its own in between that could have broken its IDT, stack
    or page tables, and the same restores crashed 0 of 30 times with shadow paging (the same
    swiftvmm). A guest's own triple fault (e.g. int3 with an empty IDT, reboot=t) is judged otherwise.
    What the trace cannot rule out: swiftvmm writing over the guest's IDT, stack or page tables
    during that very exit; a retry hides such a fault only when it strikes once.
    """
    found = []
    for i, ev in enumerate(events):
        fields = ev.exit_fields()
        if fields is None or fields["reason"] != "shutdown":
            continue
        own = [e for e in events[:i] if e.tid == ev.tid]
        excerpt = tuple(e.line for e in own[-EXCERPT:]) + (ev.line,)
        intr = int(fields["intr"], 16)
        what = f"SHUTDOWN exit with EXITINTINFO {intr:#010x} ({_describe_intinfo(intr)})"
        # The events since the thread's previous exit: the injections KVM made for this entry.
        injected: list[int] = []
        previous: Optional[dict[str, str]] = None
        for e in reversed(own):
            f = e.exit_fields()
            if f is not None:
                previous = f
                break
            v = e.injected_vector()
            if v is not None:
                injected.append(v)
        emulator, why = _judge(what, intr, int(fields["rip"], 16), previous, injected)
        found.append(Shutdown(f"{ev.comm}-{ev.tid}", emulator, why, excerpt))
    return found


class L1Trace:
    """The test host's KVM trace events (see the module's text)."""

    def __init__(self, root: Path = TRACEFS):
        self.root = root

    @classmethod
    def open(cls, root: Optional[Path] = None) -> tuple[Optional["L1Trace"], str]:
        """The trace, turned on, or None and why not (outside the test host; no tracefs; no kvm events)."""
        if os.environ.get("TESTHOST") != "1":
            return None, "not in the test host"
        root = root or Path(os.environ.get(TRACEFS_ENV) or TRACEFS)
        trace = cls(root)
        try:
            if not (root / "events" / "kvm").is_dir():
                # The test host's /init mounts tracefs; kvm's events appear once kvm is loaded.
                return None, f"no kvm trace events under {root}"
            trace._write("tracing_on", "0")
            trace._write("buffer_size_kb", str(BUFFER_KB))
            for name in EVENTS:
                trace._write(f"events/{name}/enable", "1")
            try:
                trace._write("events/kvm/kvm_exit/trigger", f"traceoff if exit_reason == {SVM_EXIT_SHUTDOWN}")
            except FileExistsError:
                pass  # opened before in this test host (by the kit's plugin, then a test): the trigger is set
        except OSError as e:
            return None, f"cannot set up the trace: {e}"
        return trace, ""

    def _write(self, name: str, value: str) -> None:
        (self.root / name).write_text(value + "\n")

    def arm(self) -> None:
        """Empty the buffer and start tracing (the trigger stops it at the next SHUTDOWN exit)."""
        self._write("trace", "")
        self._write("tracing_on", "1")

    def shutdowns(self) -> list[Shutdown]:
        """The SHUTDOWN exits traced since arm(), judged."""
        self._write("tracing_on", "0")
        return classify(parse((self.root / "trace").read_text(errors="replace")))

    def last_events(self, per_thread: int = EXCERPT) -> str:
        """The last events of each vCPU thread traced since arm() (the buffer keeps the newest), for
        a failure without a triple fault: a vCPU that still exits is running, one whose events
        stopped long before the end is stuck (in L1 or in the emulator)."""
        self._write("tracing_on", "0")
        threads: dict[str, collections.deque[str]] = {}
        last_ts = ""
        with open(self.root / "trace", errors="replace") as f:
            for line in f:
                m = _LINE.match(line)
                if m is None or not m["comm"].startswith("vcpu"):
                    continue
                last_ts = m["ts"]
                threads.setdefault(f"{m['comm']}-{m['tid']}", collections.deque(maxlen=per_thread)).append(line.strip())
        if not threads:
            return "no vCPU thread events in the test host's KVM trace"
        return f"the test host's KVM trace (last event at {last_ts} s of its uptime):\n" + "\n".join(
            f"{name}:\n" + "\n".join(f"  {e}" for e in events) for name, events in threads.items())


def reset_state_triple_faults(texts: Sequence[str]) -> int:
    """How many triple faults swiftvmm reported with the vCPU in its reset state (what KVM leaves after a
    SHUTDOWN exit on AMD, whatever its cause) in these standard-error texts."""
    n = 0
    for t in texts:
        for part in t.split("guest crashed (triple fault on vCPU")[1:]:
            head = part[:800]
            n += "rip=0x000000000000fff0" in head and "base=0x00000000ffff0000" in head
    return n


@dataclasses.dataclass(frozen=True)
class Verdict:
    """judge()'s answer after an attempt in which swiftvmm reported a triple fault in the reset state."""

    faults: int             # processes that reported one
    record: str             # what to keep: the count and the trace's judgement of each SHUTDOWN exit
    retry: Optional[str]    # why the attempt may run once more (the emulator's pattern), else None


def judge(trace: Optional[L1Trace], stderr_texts: Sequence[str]) -> Optional[Verdict]:
    """After an attempt whose swiftvmm processes wrote `stderr_texts`: None when none of them reported
    a triple fault with the vCPU in its reset state; else the verdict. It allows one more attempt
    only when exactly one process faulted and the trace's one SHUTDOWN exit is the emulator's pattern
    (the trace stops at the first SHUTDOWN exit, so a second fault could not be judged)."""
    faults = reset_state_triple_faults(stderr_texts)
    if faults == 0:
        return None
    retry = None
    if trace is None:
        text = "no KVM trace of the test host (not in it, or it could not be set up)"
    else:
        shutdowns = trace.shutdowns()
        text = "\n".join(s.report() for s in shutdowns) or "no SHUTDOWN exit in the trace"
        if len(shutdowns) == 1 and faults == 1 and shutdowns[0].emulator:
            retry = f"the test host's emulated SVM triple-faulted a guest ({shutdowns[0].why})"
        elif faults > 1:
            text += (f"\n{faults} processes triple-faulted; the trace stops at the first SHUTDOWN exit, so the "
                     f"others cannot be put down to the emulator")
    record = f"{faults} triple fault(s) with the vCPU in its reset state; the test host's KVM trace:\n{text}\n"
    return Verdict(faults, record, retry)


__all__ = ["L1Trace", "Shutdown", "Verdict", "classify", "judge", "parse", "reset_state_triple_faults"]
