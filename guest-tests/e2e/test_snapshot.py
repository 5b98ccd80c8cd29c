"""Snapshots end to end (snapshot_driver.py runs the scenario; these tests check what it left).

A guest keeps a counter in memory and prints `tick N UPTIME` every 100 ms (a busybox-sh loop); a
background reader echoes each line typed on the VMM's standard input back as `case: input=LINE`. A background watcher polls /sys/firmware/acpi/interrupts/gpe05 (the VM
generation ID's GPE) with the shell builtin `read`; on each change it waits for the kernel's
"crng reseeded due to virtual machine fork" line and prints
`case: restored gen=N gpe05=C reseeds=R uuid=U guid=W,W,W,W` (guid: the four 32-bit words of
the generation ID that the guest reads from its memory with devmem).

The scenario: the original is stopped after `tick 10` and snapshotted (snap1), then quits; two clones
are restored from snap1 in parallel; clone-a is snapshotted while it runs (snap2) and quits; clone-a2
is restored from snap2; snap1's memory.bin must be untouched by the restores and pass
`swiftvmm snapshot verify`.
"""

import re
import statistics
from typing import Optional

import pytest

from guestrun import GuestRun
from test_qmp import WAIT_DMESG, guid_words

RESEED = "crng reseeded due to virtual machine fork"
GUID_CSV = ('guid() { v=$(od -An -tu4 -j42 -N4 /sys/firmware/acpi/tables/SSDT | tr -d " "); a=$((v + 40)); '
            'for o in 0 4 8 12; do devmem $((a + o)) 32; done | tr "\\n" "," | sed "s/,$//"; }')
CASE = "\n".join([
    WAIT_DMESG, GUID_CSV,
    f'RESEED="{RESEED}"',
    # The fork reseed is only logged once the crng is ready.
    'wait_dmesg "crng init done" || echo "case: crng not ready"',
    "stty -echo 2>/dev/null",
    # A FIFO nobody writes: `read -t S <&3` is a sleep without a fork.
    "mkfifo /tmp/nap && exec 3<>/tmp/nap",
    "read g0 _ < /sys/firmware/acpi/interrupts/gpe05",
    # wall(): the guest's CLOCK_REALTIME with microseconds (busybox date has no %N).
    "wall() { adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf \"%d.%06d\", s, u}'; }",
    'echo "case: ready gpe05=$g0 guid=$(guid) wall=$(wall)"',
    "watcher() {",
    "  gen=0; last=$g0",
    "  while :; do",
    "    read -t 0.1 _ <&3",
    "    read g _ < /sys/firmware/acpi/interrupts/gpe05",
    '    [ "$g" = "$last" ] && continue',
    "    last=$g; gen=$((gen + 1))",
    # The notify is asynchronous: wait for this generation's reseed line, then a little longer so
    # that a second one would be counted too.
    '    i=0; while [ "$(dmesg | grep -c "$RESEED")" -lt $gen ] && [ $i -lt 100 ]; do read -t 0.1 _ <&3; i=$((i + 1)); done',
    "    read -t 0.5 _ <&3",
    "    read u < /proc/sys/kernel/random/uuid",
    '    echo "case: restored gen=$gen gpe05=$g reseeds=$(dmesg | grep -c "$RESEED") uuid=$u guid=$(guid) wall=$(wall)"',
    "  done",
    "}",
    "watcher < /dev/null &",
    # Console input, a line at a time (canonical mode, no timeout: busybox's `read -t` reads byte
    # by byte and drops what it has read when the time runs out). An asynchronous list's stdin
    # would be /dev/null without the explicit redirection.
    'while read -r line; do echo "case: input=$line"; done < /dev/console &',
    "i=0",
    "while [ $i -lt 3000 ]; do",
    '  i=$((i + 1)); read up _ < /proc/uptime; echo "tick $i $up"',
    "  read -t 0.1 _ <&3",
    "done",
])

SNAPSHOT = GuestRun(
    name="snapshot",
    case_script=CASE,
    swiftvmm_args=("--memory", "256M"),
    cmdline_extra="swiftvmm.e2e=snapshot",
    driver="snapshot_driver.py",
    timeout=600,
)

GUEST_RUNS = [SNAPSHOT]

TICK = re.compile(r"^tick (\d+) (\d+\.\d\d)")
CLONES = ("clone-a", "clone-b", "clone-a2")
CLONE_TICKS = 20  # as snapshot_driver.CLONE_TICKS
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def ticks_of(text: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2))) for line in text.replace("\r", "").split("\n")
            if (m := TICK.match(line))]


def split_tick(source: str, clone: str) -> Optional[tuple[int, float]]:
    """The tick whose line a snapshot split: the source's output ends with its start (no newline
    yet) and the clone's output begins with its rest."""
    head = source.replace("\r", "").rpartition("\n")[2]
    tail = clone.replace("\r", "").partition("\n")[0]
    m = TICK.match(head + tail) if head else None
    return (int(m.group(1)), float(m.group(2))) if m else None


class Scenario:
    """The snapshot case's driver log, summary and per-process outputs."""

    def __init__(self, guest):
        self.r = guest("snapshot")
        self.s = self.r.artifact_json("summary.json") if self.r.artifact("summary.json").exists() else {}

    def need(self, *keys: str):
        missing = [k for k in keys if k not in self.s]
        if missing:
            self.r.fail(f"the scenario did not get that far (stopped at step {self.s.get('step')!r}; "
                        f"missing {missing})")
        return self.s[keys[0]] if len(keys) == 1 else [self.s[k] for k in keys]

    def part(self, name: str):
        p = self.r.part(name)
        if not p.ran:
            self.r.fail(f"the driver left no console of {name} (stopped at step {self.s.get('step')!r})")
        return p

    def restored(self, name: str) -> list[dict]:
        """Every `case: restored` line of a clone, parsed."""
        out = []
        for line in self.part(name).lines:
            if line.startswith("case: restored "):
                out.append(dict(kv.split("=", 1) for kv in line[len("case: restored "):].split() if "=" in kv))
        return out

    def ready_line(self) -> dict:
        v = self.part("orig").value("case: ready ")
        if v is None:
            self.part("orig").fail("the guest never printed its 'case: ready' line")
        return dict(kv.split("=", 1) for kv in v.split() if "=" in kv)


@pytest.fixture
def sc(guest) -> Scenario:
    return Scenario(guest)


def test_snapshot_scenario_runs_to_the_end(sc):
    sc.r.check(sc.r.index_of("driver: scenario complete") >= 0,
               f"the driver stopped at step {sc.s.get('step')!r}: {sc.r.value('driver: FAILED at step ')!r}")
    sc.r.assert_exit(0)
    for name in ("orig", *CLONES):
        p = sc.part(name)
        p.check(p.status == 0, f"{name} exited {p.status} after QMP quit, expected 0")


def test_snapshot_of_a_stopped_guest(sc):
    stopped, after, while_stopped = sc.need("orig_status_stopped", "orig_status_after_snapshot", "orig_ticks_while_stopped")
    sc.r.check(stopped == "paused", f"query-status after stop: {stopped!r}")
    sc.r.check(after == "paused", f"a stopped guest must stay stopped after snapshot-create; query-status says {after!r}")
    sc.r.check(while_stopped == [], f"the stopped original printed ticks {while_stopped} during the snapshot")


@pytest.mark.parametrize("which", ["snap1", "snap2"])
def test_snapshot_create_reply_and_files(sc, which):
    ret, usage = sc.need(f"{which}_return", f"{which}_usage")
    sc.r.check(isinstance(ret, dict) and ret.get("path", "").endswith(which), f"snapshot-create returned {ret!r}")
    files = set(usage["files"])
    sc.r.check({"state.bin", "memory.bin"} <= files, f"{which} holds {sorted(files)}, expected state.bin and memory.bin")
    sc.r.check(isinstance(ret.get("time-ms"), (int, float)) and ret["time-ms"] >= 0, f"time-ms: {ret.get('time-ms')!r}")
    size = ret.get("size")
    sc.r.check(size == usage["allocated"],
               f"snapshot-create says size {size!r}; the files take {usage['allocated']} bytes on disk "
               f"({usage['apparent']} bytes apparent): {usage['files']}")
    sc.r.check(usage["files"]["memory.bin"]["size"] >= 256 << 20 or usage["files"]["memory.bin"]["blocks"] > 0,
               f"memory.bin looks empty: {usage['files']['memory.bin']}")


@pytest.mark.parametrize("clone", ["clone-a", "clone-b"])
def test_clones_continue_the_count_where_the_original_stopped(sc, clone):
    orig, p = sc.part("orig"), sc.part(clone)
    last = sc.need("orig_last_tick_before_snapshot")
    orig_ticks = [n for n, _ in ticks_of(orig.output)]
    orig.check(orig_ticks == list(range(1, last + 1)), f"the original's ticks are not 1..{last}: {orig_ticks}")
    # The original's console followed by the clone's must be one unbroken count (a line the
    # original had half printed is completed by the clone).
    joined = [n for n, _ in ticks_of((orig.raw + p.raw).decode("utf-8", "replace"))]
    after = joined[last:]
    p.check(joined[:last] == orig_ticks and after == list(range(last + 1, last + 1 + len(after))),
            f"original then {clone}: ticks {joined[max(0, last - 3):last + 5]}... are not consecutive from {last - 2}")
    if orig.raw.endswith(b"\n"):
        first = ticks_of(p.output)[0][0] if ticks_of(p.output) else None
        p.check(first == last + 1, f"{clone}'s first tick is {first}, the original's last was {last}")
    p.check(len(after) >= CLONE_TICKS, f"{clone} printed {len(after)} ticks after the restore, expected >= {CLONE_TICKS}")


def paused_after(sc: Scenario, clone: str, n: int) -> bool:
    """Whether clone may have been paused between its ticks n and n+1: clone-a for snapshot-create
    (the guest's clock runs on while its vCPUs are parked, so that gap is the save's duration); and
    clone-b (--clock host) right after the original's last tick: a tick whose uptime the guest read
    before snapshot 1's pause is printed after the restore, and the next one sees the host's time."""
    if clone == "clone-b":
        return n == sc.need("orig_last_tick_before_snapshot") + 1
    if clone != "clone-a":
        return False
    before, at_reply = sc.need("clone-a_last_tick_before_snapshot", "clone-a_last_tick_at_reply")
    return before <= n <= at_reply + 1


def test_a_tick_line_split_by_a_snapshot_is_joined():
    # As in a CI run: the original was stopped while its guest sent "tick 11 5.30"; both clones began with 12.
    assert split_tick("tick 10 5.18\r\ntick 1", "1 5.30\r\ntick 12 5.43\r\n") == (11, 5.30)
    assert split_tick("tick 10 5.18\r\n", "tick 11 5.30\r\n") is None  # nothing split
    assert split_tick("tick 10 5.18\r\nti", "ck 11 5.3") is None  # not a whole tick line


@pytest.mark.parametrize("clone", CLONES)
def test_timers_keep_working_after_restore(sc, clone):
    p = sc.part(clone)
    ticks = ticks_of(p.output)
    p.check(len(ticks) >= CLONE_TICKS, f"only {len(ticks)} ticks")
    gaps = [b - a for (n, a), (_, b) in zip(ticks, ticks[1:]) if not paused_after(sc, clone, n)]
    med = statistics.median(gaps)
    p.check(0.09 <= med <= 0.3, f"ticks every {med:.3f} s of guest time (median), expected ~0.1 s: {gaps[:10]}")
    p.check(min(gaps) >= 0.095, f"a tick came {min(gaps):.3f} s of guest time after the previous one (sleep 0.1)")
    p.check(max(gaps) < 2.0, f"the ticks stalled for {max(gaps):.2f} s of guest time")
    # Guest time does not go back across the restore.
    source = sc.part("orig" if clone != "clone-a2" else "clone-a")
    before = ticks_of(source.output)
    first_n, first_t = ticks[0]
    prev = [t for n, t in before if n == first_n - 1]
    if not prev:
        # The guest was sending that tick's line when the source was stopped (the source quits
        # right after the snapshot): its start is the source's last output, its rest the clone's first.
        split = split_tick(source.output, p.output)
        prev = [split[1]] if split is not None and split[0] == first_n - 1 else []
    p.check(bool(prev) and first_t >= prev[0],
            f"{clone}'s first tick {first_n} at uptime {first_t} is before tick {first_n - 1} at {prev} "
            f"(the source's output ends {source.output[-40:]!r}, the clone's begins {p.output[:40]!r})")


@pytest.mark.parametrize("clone,gen", [("clone-a", 1), ("clone-b", 1), ("clone-a2", 2)])
def test_each_restore_reseeds_the_guest_exactly_once(sc, clone, gen):
    p = sc.part(clone)
    lines = sc.restored(clone)
    p.check(len(lines) == 1 and lines[0].get("gen") == str(gen),
            f"expected exactly one 'case: restored gen={gen}' line (the guest saw one GPE 5 change), got {lines}")
    info = lines[0]
    p.check(info.get("reseeds") == str(gen),
            f"the guest's dmesg has {info.get('reseeds')!r} '{RESEED}' lines, expected {gen} "
            f"(one per restore in its history)")
    g0 = sc.ready_line().get("gpe05", "")
    p.check(g0.isdigit() and info.get("gpe05") == str(int(g0) + gen),
            f"gpe05 went {g0!r} -> {info.get('gpe05')!r}, expected +{gen}")


def test_generation_ids_differ_and_match_guest_memory(sc):
    guids = dict(zip(["orig", *CLONES], sc.need("orig_guid", *(f"{c}_guid" for c in CLONES))))
    sc.r.check(len(set(guids.values())) == len(guids), f"generation IDs are not all different: {guids}")
    ready = sc.ready_line().get("guid", "").split(",")
    sc.r.check(ready == guid_words(guids["orig"]).split(),
               f"the original's guest memory holds {ready}, QMP says {guids['orig']} ({guid_words(guids['orig'])})")
    for c in CLONES:
        lines = sc.restored(c)
        seen = lines[-1].get("guid", "").split(",") if lines else None
        sc.part(c).check(seen == guid_words(guids[c]).split(),
                         f"{c}: guest memory holds {seen}, query-vm-generation-id says {guids[c]} ({guid_words(guids[c])})")


def test_clones_draw_different_random_numbers(sc):
    uuids = {}
    for c in CLONES:
        lines = sc.restored(c)
        sc.part(c).check(bool(lines), f"{c} printed no 'case: restored' line")
        uuids[c] = lines[0].get("uuid", "")
        sc.part(c).check(UUID.match(uuids[c]) is not None, f"{c}: /proc/sys/kernel/random/uuid gave {uuids[c]!r}")
    sc.r.check(len(set(uuids.values())) == len(uuids),
               f"clones read the same /proc/sys/kernel/random/uuid (the crng was not reseeded): {uuids}")


@pytest.mark.parametrize("clone", CLONES)
def test_console_input_reaches_a_restored_guest(sc, clone):
    p = sc.part(clone)
    p.check(p.index_of(f"case: input=poke-{clone}") >= 0, f"the line sent to {clone}'s standard input did not reach the guest")


def test_snapshot_of_a_running_clone(sc):
    status, before, at_reply = sc.need("clone-a_status_after_snapshot", "clone-a_last_tick_before_snapshot",
                                       "clone-a_last_tick_at_reply")
    a, a2 = sc.part("clone-a"), sc.part("clone-a2")
    a.check(status == "running", f"a running guest must keep running after snapshot-create; query-status says {status!r}")
    ret = sc.need("snap2_return")
    a.check(ret.get("live") is True and isinstance(ret.get("pause-ms"), (int, float)) and 0 < ret["pause-ms"] < ret["time-ms"],
            f"a live snapshot pauses the guest for less than the whole save: {ret!r}")
    verify2 = sc.need("verify2_status")
    out = sc.r.artifact("verify2.out").read_text(errors="replace") if sc.r.artifact("verify2.out").exists() else ""
    a.check(verify2 == 0, f"swiftvmm snapshot verify of the live snapshot exited {verify2}:\n{out[-2000:]}")
    a_ticks = [n for n, _ in ticks_of(a.output)]
    a.check(a_ticks == list(range(a_ticks[0], a_ticks[0] + len(a_ticks))), "clone-a's ticks are not consecutive")
    a.check(a_ticks[-1] >= at_reply + 5, f"clone-a stopped ticking after the snapshot (last tick {a_ticks[-1]})")
    a2_ticks = [n for n, _ in ticks_of(a2.output)]
    a2.check(bool(a2_ticks) and a2_ticks == list(range(a2_ticks[0], a2_ticks[0] + len(a2_ticks))),
             f"clone-a2's ticks are not consecutive: {a2_ticks[:10]}")
    resumed_at = a2_ticks[0] - 1
    a2.check(resumed_at in a_ticks and before <= resumed_at <= at_reply + 1,
             f"clone-a2 continues after tick {resumed_at}; clone-a had printed tick {before} when snapshot-create was "
             f"sent and {at_reply} when it answered")


@pytest.mark.parametrize("clone", CLONES)
def test_restore_logs_when_the_vcpus_enter_the_guest(sc, clone):
    procs = sc.need("processes")
    info = procs.get(clone, {})
    sc.part(clone).check(info.get("entering_ms") is not None,
                         f"{clone} (--log-level info) logged no 'vCPUs entering the guest ... ms after process start' "
                         f"line: {info.get('entering_line')!r}; stderr: {sc.part(clone).err_lines[-5:]}")


def test_snapshot_files_unchanged_by_restores(sc):
    before, after, verify = sc.need("mem1_before", "mem1_after", "verify_status")
    # Size and modification time; not the allocated blocks: on tmpfs (the test host's /tmp) reading
    # a hole through a private mapping allocates a page in the file (a snapshot of a clone reads
    # all of its memory), which changes no byte of it.
    same = all(before[k] == after[k] for k in ("size", "mtime_ns"))
    sc.r.check(same, f"memory.bin changed while it was restored twice: {before} -> {after}")
    out = sc.r.artifact("verify.out").read_text(errors="replace") if sc.r.artifact("verify.out").exists() else ""
    sc.r.check(verify == 0, f"swiftvmm snapshot verify exited {verify} after the restores:\n{out[-2000:]}")
    files = sc.need("snap1_files_after")
    sc.r.check(files == ["memory.bin", "state.bin", "workingset.bin"],
               f"after its restores the snapshot holds {files}: expected the working set its first restore recorded")


def test_snapshot_inspect_lists_sections(sc):
    status = sc.need("inspect_status")
    out = sc.r.artifact("inspect.out").read_text(errors="replace")
    sc.r.check(status == 0, f"swiftvmm snapshot inspect exited {status}:\n{out[-2000:]}")
    rows = {line[:19].strip(): line[19:].strip() for line in out.splitlines() if len(line) > 19 and not line.startswith(" ")}
    sc.r.check(rows.get("guest memory", "").startswith(f"{256 << 20} bytes"), f"inspect: guest memory {rows.get('guest memory')!r}:\n{out}")
    sc.r.check(rows.get("vCPUs") == "1", f"inspect: vCPUs {rows.get('vCPUs')!r}:\n{out}")
    m = re.search(r"^sections \((\d+)\):\n  NAME .*\n((?:  \S.*\n?)*)", out, re.M)
    sc.r.check(m is not None, f"inspect lists no sections:\n{out}")
    listed = [line.split()[0] for line in m.group(2).splitlines()]
    sc.r.check(int(m.group(1)) == len(listed) >= 2, f"inspect announces {m.group(1)} sections and lists {listed}:\n{out}")


# -- the guest's clocks across a restore (`restore --clock saved|host`) ----------------------------

def guest_time_at_save(sc) -> float:
    """The original's guest uptime at snapshot 1's save: its last tick before the save, plus the
    host time from that tick's arrival to the snapshot-create request (guest time runs on while the
    VM is paused; the snapshot reads the clock as it starts)."""
    requested = sc.need("snap1_requested_host_time")
    last = sc.need("orig_last_tick_before_snapshot")
    ticks = {n: (up, host) for n, up, host in sc.need("processes")["orig"]["tick_times"]}
    if last not in ticks:
        sc.r.fail(f"no arrival time for the original's tick {last}")
    up, host = ticks[last]
    return up + (requested - host)


def first_tick_after_restore(sc, clone: str) -> tuple[int, float, float]:
    """The first tick whose uptime the guest read after the restore. The original's last tick plus one
    may have been read before snapshot 1's pause and printed after the restore (the pause came
    between the guest's `cut /proc/uptime` and its echo): its uptime is then at least the 0.5 s the
    driver waits between `stop` and snapshot-create short of the save's, so it is told apart by that."""
    save = guest_time_at_save(sc)
    ticks = [t for t in sc.need("processes")[clone]["tick_times"] if t[1] >= save - 0.25]
    if not ticks:
        sc.part(clone).fail(f"{clone} printed no tick read after the restore (the save was at uptime {save:.2f})")
    return tuple(ticks[0])


def wall_offset(sc, part: str, host_key: str) -> float:
    """Host time when the guest's line arrived minus the guest's wall clock printed in it: the
    original's `case: ready` line, a clone's (first) `case: restored` line."""
    if part == "orig":
        kv = sc.ready_line()
    else:
        lines = sc.restored(part)
        kv = lines[0] if lines else {}
    if "wall" not in kv:
        sc.part(part).fail(f"no wall= in its line: {kv}")
    return sc.need(host_key) - float(kv["wall"])


def test_guest_wall_clock_matches_the_host_at_boot(sc):
    # The premise of the --clock host check: a booted guest's wall clock is the host's.
    off = wall_offset(sc, "orig", "orig_ready_line_host_time")
    sc.part("orig").check(-0.5 <= off <= 1.0, f"the booted guest's wall clock is {off:+.3f} s off the host's")


def test_clock_saved_the_time_on_disk_does_not_pass_for_the_guest(sc):
    gap = sc.need("clones_started_host_time") - sc.need("snap1_requested_host_time")
    sc.r.check(gap >= 5.0, f"the clones started only {gap:.1f} s after the save")
    n, up, _ = first_tick_after_restore(sc, "clone-a")
    jump = up - guest_time_at_save(sc)
    sc.part("clone-a").check(-0.2 <= jump < 1.0,
                             f"clone-a (--clock saved): guest uptime {up:.2f} at tick {n} is {jump:+.2f} s past the save "
                             f"({gap:.1f} s of host time passed before the restore)")
    # Its wall clock is behind the host's by about that time.
    off = wall_offset(sc, "clone-a", "clone-a_restored_line_host_time")
    sc.part("clone-a").check(off >= gap - 1.5, f"clone-a's wall clock is only {off:.2f} s behind the host's after a {gap:.1f} s gap")


def test_clock_host_moves_the_guest_to_the_hosts_time(sc):
    gap = sc.need("clones_started_host_time") - sc.need("snap1_requested_host_time")
    n, up, _ = first_tick_after_restore(sc, "clone-b")
    jump = up - guest_time_at_save(sc)
    sc.part("clone-b").check(jump >= gap - 0.5,
                             f"clone-b (--clock host): guest uptime moved only {jump:.2f} s past the save in {gap:.1f} s")
    off = wall_offset(sc, "clone-b", "clone-b_restored_line_host_time")
    sc.part("clone-b").check(-0.5 <= off <= 1.0, f"clone-b's wall clock is {off:+.3f} s off the host's")
