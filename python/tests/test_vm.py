"""VM, console, QMP, events, snapshots and clean-up, against the fake swiftvmm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from swiftvmm_kit import (VM, BinaryNotFound, ExpectTimeout, KitError, NoHardwareVirtualization, QMPError, RestoredVM, Snapshot,
                          SnapshotError, VMExited)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_boots_expects_and_cleans_up(fake, kernel):
    with VM(kernel, memory="512M", cpus=2) as vm:
        m = vm.console.expect(r"init (\w+)", timeout=10)
        assert m.group(1) == "reached"
        assert vm.status == "running"
        pid, d = vm.process.pid, vm.dir
        assert (d / "qmp.sock").exists()
        assert vm.argv[:4] == [str(fake), "run", "--kernel", str(kernel)]
        assert ["--memory", "512M"] == vm.argv[vm.argv.index("--memory"):vm.argv.index("--memory") + 2]
    assert not alive(pid)
    assert not d.exists()
    assert vm.exit_status() == 0  # quit over QMP


def test_missing_binary_is_named(monkeypatch, kernel, tmp_path):
    monkeypatch.delenv("SWIFTVMM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BinaryNotFound, match="no swiftvmm executable.*--swiftvmm-bin"):
        VM(kernel)
    with pytest.raises(BinaryNotFound, match=r"/nonexistent/swiftvmm \(the given path\) does not exist"):
        VM(kernel, binary="/nonexistent/swiftvmm")


def test_kernel_not_found_starts_nothing(fake, tmp_path):
    vm = VM(tmp_path / "no-such-bzImage")
    with pytest.raises(KitError, match="kernel not found: .*no-such-bzImage"):
        vm.start()
    assert vm.process is None
    assert not vm.dir.exists()


def test_expect_times_out_naming_the_pattern_with_the_console_tail(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_CONSOLE", "first line|second line")
    with VM(kernel) as vm:
        t0 = time.monotonic()
        with pytest.raises(ExpectTimeout) as e:
            vm.console.expect(r"never printed \d+", timeout=1.0)
        took = time.monotonic() - t0
    assert 0.9 <= took < 2.0
    text = str(e.value)
    assert "never printed \\\\d+" in text or r"never printed \d+" in text
    assert "within 1 s" in text and "second line" in text and "init reached" in text


def test_a_line_is_matched_only_once_it_is_complete(fake, kernel, monkeypatch):
    # The guest's line arrives in two pieces; `(.*)$` must see all of it, not the first half.
    monkeypatch.setenv("FAKE_CONSOLE", "answer: hel\\c|@0.6|lo there|login: \\c")
    with VM(kernel) as vm:
        assert vm.console.expect(r"^answer: (.*)$", 10).group(1) == "hello there"
        # A prompt without a newline matches once the console has been quiet for a moment.
        assert vm.console.expect(r"^login: $", 10).group(0) == "login: "


def test_echo_copies_the_console_in_whole_lines(fake, kernel, monkeypatch):
    import io
    monkeypatch.setenv("FAKE_CONSOLE", "half a li\\c|@0.3|ne|last without newline\\c")
    sink = io.BytesIO()
    seen_partial = []

    class Sink:
        def write(self, b):
            seen_partial.append(not b.endswith(b"\n"))
            sink.write(b)

        def flush(self):
            pass
    with VM(kernel, echo=Sink()) as vm:
        vm.console.expect("^half a line$", 10)
        vm.console.expect("last without newline", 10)
        vm.quit()
    assert sink.getvalue().decode() == vm.console.text.replace("\r", "")
    assert seen_partial[:-1] == [False] * (len(seen_partial) - 1)  # only the very last write may end mid-line


def test_wait_until_a_condition(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_CONSOLE", "tick 1|@0.3|tick 2|tick 3")
    with VM(kernel) as vm:
        vm.console.wait_until(lambda text: text.count("tick ") >= 3, 10, "three ticks")
        with pytest.raises(ExpectTimeout, match="no fourth tick within 0.5 s"):
            vm.console.wait_until(lambda text: text.count("tick ") >= 4, 0.5, "fourth tick")


def test_a_vm_that_exits_ends_the_wait_at_once(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "exit-after-init")
    vm = VM(kernel)
    try:
        try:
            vm.start()
        except VMExited:
            pass  # it may be gone before its socket was connected
        t0 = time.monotonic()
        with pytest.raises(VMExited) as e:
            vm.console.expect("login:", timeout=30)
        assert time.monotonic() - t0 < 5
        with pytest.raises(VMExited, match="before a login prompt"):
            vm.console.wait_until(lambda text: "login:" in text, 30, "a login prompt")
        assert e.value.status == 3
        assert "status 3" in str(e.value) and "login:" in str(e.value)
    finally:
        vm.close()


def test_exit_before_the_socket_reports_stderr(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "exit-early")
    vm = VM(kernel)
    with pytest.raises(VMExited) as e:
        vm.start()
    assert e.value.status == 1
    assert "not a bzImage" in str(e.value)
    assert not vm.dir.exists()


def test_no_socket_times_out_and_kills(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "no-socket")
    vm = VM(kernel, start_timeout=1.0)
    with pytest.raises(ExpectTimeout, match="QMP socket .* did not appear within 1 s"):
        vm.start()
    assert not alive(vm.process.pid)


def test_console_send_and_lines(fake, kernel):
    with VM(kernel) as vm:
        vm.console.expect("init reached", 10)
        vm.console.send("hello guest\n")
        assert vm.console.expect(r"^echo: (.*)$", 10).group(1) == "hello guest"
        assert "echo: hello guest" in vm.console.lines


def test_pause_resume_events_and_async_iteration(fake, kernel):
    with VM(kernel) as vm:
        vm.pause()
        assert vm.status == "paused"
        vm.resume()
        assert vm.events.expect("STOP", 5)["event"] == "STOP"
        assert vm.events.expect("RESUME", 5)["event"] == "RESUME"
        with pytest.raises(ExpectTimeout, match="no QMP event STOP within 0.3 s .*events so far: STOP, RESUME"):
            vm.events.expect("STOP", 0.3)  # each event is returned once

        async def first_two():
            got = []
            async for ev in vm.events:
                got.append(ev["event"])
                if len(got) == 2:
                    break
            return got
        assert asyncio.run(first_two()) == ["STOP", "RESUME"]
        assert vm.powerdown(10) == 0
    assert vm.events.names()[-2:] == ["POWERDOWN", "SHUTDOWN"]


def test_async_iteration_ends_with_the_vm(fake, kernel):
    with VM(kernel) as vm:
        vm.quit()

        async def drain():
            return [ev["event"] async for ev in vm.events]
        assert asyncio.run(asyncio.wait_for(drain(), 10))[-1] == "SHUTDOWN"


def test_qmp_errors_name_the_command(fake, kernel):
    with VM(kernel) as vm:
        with pytest.raises(QMPError, match="QMP no-such-command failed: The command no-such-command has not been "
                                           r"found \(CommandNotFound\)"):
            vm.qmp("no-such-command")
        assert vm.qmp("query-status")["running"] is True
        transcript = vm.qmp_transcript()
    assert '"execute": "no-such-command"' in transcript and "CommandNotFound" in transcript


def test_generation_id_change_and_acknowledgement(fake, kernel):
    with VM(kernel, vmgenid="8f2ee4a5-6c1e-4d6e-9f3a-0a1b2c3d4e5f") as vm:
        assert vm.generation_id == "8f2ee4a5-6c1e-4d6e-9f3a-0a1b2c3d4e5f"
        new = vm.set_generation_id()
        assert new != "8f2ee4a5-6c1e-4d6e-9f3a-0a1b2c3d4e5f"
        ev = vm.expect_generation_id_acknowledged(timeout=5)
        assert ev["data"]["guid"] == new and ev["data"]["latency-ms"] >= 0
        assert vm.generation_id_state()["acknowledged"] is True


def test_unacknowledged_change_says_pending(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_NO_ACK", "1")
    with VM(kernel) as vm:
        guid = vm.set_generation_id()
        with pytest.raises(ExpectTimeout) as e:
            vm.expect_generation_id_acknowledged(timeout=0.5)
    assert f"did not acknowledge generation ID {guid} within 0.5 s" in str(e.value)
    assert "'pending': True" in str(e.value)


def test_snapshot_into_two_clones(fake, kernel):
    with VM(kernel) as vm:
        vm.pause()
        snap = vm.snapshot()
        assert snap.pause_ms == 1.25
        original = vm.generation_id
    with snap:
        assert snap.verify().startswith("state.bin: ok")
        info = snap.inspect()
        assert info["format"] == "1.3" and info["memory_bytes"] == 256 << 20 and info["vcpus"] == 1
        assert [s["name"] for s in info["sections"]] == ["vcpu.0", "vmgenid"]
        assert info["sections"][0]["required"] and not info["sections"][1]["required"]
        with snap.restore(n=2) as clones:
            assert len(clones) == 2
            ids = {c.generation_id for c in clones}
            assert len(ids) == 2 and original not in ids
            for c in clones:
                c.console.expect("restored from", 10)
                assert c.argv[1:3] == ["restore", str(snap.path)] and c.argv[c.argv.index("--vmgenid") + 1] == "auto"
                c.expect_generation_id_acknowledged(timeout=5)
            pids = [c.process.pid for c in clones]
        assert not any(alive(p) for p in pids)
        owned = snap.path.parent
    assert not owned.exists()


def test_clone_acknowledged_before_the_kit_connected(fake, kernel, monkeypatch):
    """The guest takes the new ID before the kit is on QMP: the event went to no one, and the
    acknowledgement is taken from query-vm-generation-id."""
    with VM(kernel) as vm:
        snap = vm.snapshot()
    monkeypatch.setenv("FAKE_RESTORE_ACK_AT", "0")
    with snap, snap.restore() as clones:
        clone = clones[0]
        assert clone.generation_id_state()["acknowledged"] is True
        assert "VM_GENERATION_ID_ACKNOWLEDGED" not in clone.events.names()
        ev = clone.expect_generation_id_acknowledged(timeout=5)
        assert ev["from"] == "query-vm-generation-id"
        assert ev["data"]["guid"] == clone.generation_id and ev["data"]["latency-ms"] >= 0


def test_snapshot_paths_and_damage(fake, kernel, tmp_path):
    target = tmp_path / "snap"
    with VM(kernel) as vm:
        snap = vm.snapshot(target, live=True)
        assert snap.info["live"] is True
        with pytest.raises(SnapshotError, match="already exists"):
            vm.snapshot(target)
    (target / "state.bin").write_text("garbage")
    with pytest.raises(SnapshotError, match="(?s)failed verification .*CRC32C mismatch"):
        snap.verify()
    snap.remove()
    assert target.exists()  # a path the test gave is the test's
    with pytest.raises(SnapshotError, match="not a snapshot directory"):
        Snapshot(tmp_path).restore()
    with pytest.raises(VMExited, match="cannot read the snapshot"):
        Snapshot(target).restore()


def test_an_exception_in_the_block_still_cleans_up(fake, kernel):
    with pytest.raises(RuntimeError):
        with VM(kernel) as vm:
            pid, d = vm.process.pid, vm.dir
            raise RuntimeError("the test failed")
    assert not alive(pid) and not d.exists()


def test_a_vm_that_ignores_sigterm_is_killed(fake, kernel, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ignore-term")
    vm = VM(kernel).start()
    vm._qmp.close()  # no graceful quit possible
    t0 = time.monotonic()
    vm.close()
    assert not alive(vm.process.pid)
    assert vm.exit_status() == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 20


def test_emulated_kvm_is_refused_unless_allowed(fake, kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_KVM", "emulated: kvm_pvm has no vmx/svm")
    with pytest.raises(NoHardwareVirtualization, match="kvm_pvm has no vmx/svm.*nested test host"):
        VM(kernel).start()
    argv_file = tmp_path / "argv"
    monkeypatch.setenv("FAKE_ARGV_FILE", str(argv_file))
    with VM(kernel, allow_slow_kvm=True) as vm:
        vm.console.expect("init reached", 10)
    assert "--allow-slow-kvm" in json.loads(argv_file.read_text().splitlines()[-1])


def test_options_reach_the_command_line(fake, kernel, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    vm = VM(kernel, initrd=kernel, cmdline="console=ttyS0 quiet", tpm="builtin",
            drives=[disk, f"file={disk},readonly=on"], extra_args=["--no-rng"])
    argv = vm._command(tmp_path)
    assert argv[argv.index("--initrd") + 1] == str(kernel)
    assert argv[argv.index("--cmdline") + 1] == "console=ttyS0 quiet"
    assert argv[argv.index("--tpm") + 1] == f"builtin,state={tmp_path / 'tpm-state'}"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--drive"] == [f"file={disk}", f"file={disk},readonly=on"]
    assert argv[-1] == "--no-rng"
    # A clone gets the same device options: its own builtin TPM state file, its drives.
    (tmp_path / "snap").mkdir()
    clone = RestoredVM(Snapshot(tmp_path / "snap"), tpm="builtin", drives=[disk], clock="host")
    cargv = clone._command(tmp_path)
    assert cargv[1:3] == ["restore", str(tmp_path / "snap")]
    assert cargv[cargv.index("--tpm") + 1] == f"builtin,state={tmp_path / 'tpm-state'}"
    assert cargv[cargv.index("--drive") + 1] == f"file={disk}" and cargv[cargv.index("--clock") + 1] == "host"


def test_a_killed_test_process_takes_its_vms_along(fake, kernel, tmp_path):
    # A test run that is SIGKILLed cannot clean up: the VM dies with it (PR_SET_PDEATHSIG).
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from swiftvmm_kit import VM
        vm = VM({str(kernel)!r}).start()
        print(vm.process.pid, flush=True)
        time.sleep(60)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    vm_dir = next(d for d in Path(tempfile.gettempdir()).glob("swiftvmm-kit-*")
                  if (d / "kit-owner.pid").read_text().strip() == str(p.pid))
    assert alive(pid)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    # Its temporary directory outlived it; the next VM's start removes it.
    assert vm_dir.exists()
    with VM(kernel):
        assert not vm_dir.exists()


def test_threads_of_a_running_vm(fake, kernel):
    vm = VM(kernel).start()
    try:
        text = vm.threads()
        first = text.splitlines()[0].split()
        assert int(first[0]) == vm.process.pid  # the main thread first
        assert first[2] == "state" and first[3].rstrip(",") in ("R", "S", "D")
    finally:
        vm.close()
    assert vm.threads() == "(not running)"
