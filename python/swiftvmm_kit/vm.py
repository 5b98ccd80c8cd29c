"""A swiftvmm VM as a Python object: start, console, QMP, snapshots, clones, clean-up."""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .binary import find_binary, host_kvm
from .console import TAIL_LINES, Console
from .image import DEFAULT_CMDLINE
from .errors import ExpectTimeout, KitError, NoHardwareVirtualization, QMPError, SnapshotError, VMError, VMExited
from .qmp import Event, EventLog, QMPConnection

PathLike = Union[str, "os.PathLike[str]"]


ACK_EVENT = "VM_GENERATION_ID_ACKNOWLEDGED"

_registry_lock = threading.Lock()
_registry: "weakref.WeakSet[VM]" = weakref.WeakSet()
_created: list["weakref.ReferenceType[VM]"] = []
_counter = 0


def _next_name(prefix: str) -> str:
    global _counter
    with _registry_lock:
        _counter += 1
        return f"{prefix}{_counter}"


def created_since(mark: int) -> list["VM"]:
    """The VMs created since `mark` (a value of `creation_mark()`) that still exist: the pytest
    plugin reports their consoles and QMP transcripts when a test fails."""
    with _registry_lock:
        refs = _created[mark:]
    return [vm for vm in (r() for r in refs) if vm is not None]


def creation_mark() -> int:
    with _registry_lock:
        return len(_created)


@atexit.register
def _kill_leftovers() -> None:
    with _registry_lock:
        vms = list(_registry)
    for vm in vms:
        try:
            vm.close(graceful=False)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG),
    so a killed test run leaves no VM behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not fatal: close() and atexit still clean up
        pass


OWNER_FILE = "kit-owner.pid"


def _private_dir(prefix: str) -> Path:
    """A new private directory whose socket paths stay within the 107-byte limit, marked with this
    process's ID. The directories of kit processes that died without cleaning up (SIGKILL) are
    removed first."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    sweep_stale_dirs(Path(base))
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    (d / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return d


def sweep_stale_dirs(base: Path) -> list[Path]:
    """Removes swiftvmm-kit-* and swiftvmm-snap-* directories in `base` whose owner process is gone."""
    removed = []
    for d in list(base.glob("swiftvmm-kit-*")) + list(base.glob("swiftvmm-snap-*")):
        try:
            pid = int((d / OWNER_FILE).read_text())
            if d.stat().st_uid != os.getuid():
                continue
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class VM:
    """One swiftvmm process with its QMP socket in a private temporary directory.

    Use it as a context manager (``with VM(image) as vm:``) or call start() and close(); close()
    always runs on leaving the block, whatever happened: it quits the VM (QMP quit, then SIGTERM,
    then SIGKILL), and removes the socket and the temporary files. The VM also dies with the thread
    that started it (PR_SET_PDEATHSIG): start it from one that outlives it.

    kernel       a bzImage path, or a GuestImage (its kernel and initrd)
    initrd       an initramfs path (default: the GuestImage's)
    cmdline      the kernel command line
    memory, cpus guest RAM ("256M", "1G") and vCPUs (None: swiftvmm's defaults, or extra_args say)
    tpm          None, "builtin" (libtpms, state in the VM's temporary directory), or swiftvmm's
                 --tpm value ("builtin,state=PATH", "swtpm,socket=PATH")
    drives       disk images (paths, or --drive values "file=PATH,readonly=on,...")
    vmgenid      the generation ID the guest starts with (a GUID, or "auto": a random one; None: the default)
    extra_args   more `swiftvmm run` arguments
    binary       the swiftvmm executable (default: $SWIFTVMM, else swiftvmm on PATH)
    allow_slow_kvm  boot even where /dev/kvm has no hardware virtualization behind it (minutes
                 per Linux boot); default: refuse with NoHardwareVirtualization, which says how to
                 run in the nested test host instead
    name         a label for messages and reports
    keep         keep the temporary directory (console.log, stderr.log) after close()
    echo         a stream (e.g. sys.stdout) that gets the console as it comes, in whole lines
    """

    def __init__(self, kernel: Any = None, initrd: Optional[PathLike] = None, cmdline: str = DEFAULT_CMDLINE,
                 memory: Union[str, int, None] = "256M", cpus: Optional[int] = 1, tpm: Optional[str] = None,
                 drives: Sequence[PathLike] = (), vmgenid: Optional[str] = "auto", extra_args: Sequence[str] = (),
                 binary: Optional[PathLike] = None, allow_slow_kvm: bool = False, name: Optional[str] = None,
                 keep: bool = False, start_timeout: float = 30.0, echo: Optional[Any] = None) -> None:
        if kernel is not None and hasattr(kernel, "kernel") and hasattr(kernel, "initrd"):
            initrd = initrd if initrd is not None else kernel.initrd
            kernel = kernel.kernel
        self.kernel = Path(kernel) if kernel is not None else None
        self.initrd = Path(initrd) if initrd is not None else None
        self.cmdline = cmdline
        self.memory = str(memory) if memory is not None else None
        self.cpus = cpus
        self.tpm = tpm
        self.drives = [str(d) for d in drives]
        self.vmgenid = vmgenid
        self.extra_args = list(extra_args)
        self.binary = find_binary(binary)
        self.allow_slow_kvm = allow_slow_kvm
        self.name = name or _next_name("vm")
        self.keep = keep or os.environ.get("SWIFTVMM_KIT_KEEP") == "1"
        self.start_timeout = start_timeout
        self.echo = echo
        self.dir: Optional[Path] = None
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._console: Optional[Console] = None
        self._qmp: Optional[QMPConnection] = None
        self.events = EventLog(self.name, self._console_tail)
        self.argv: list[str] = []
        self._closed = False
        self._stderr_text = ""
        with _registry_lock:
            _created.append(weakref.ref(self))

    # -- the command -----------------------------------------------------------------------------
    def _command(self, tmp: Path) -> list[str]:
        if self.kernel is None:
            raise KitError(f"{self.name}: no kernel given (VM(kernel=PATH or a GuestImage))")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not path.is_file():
                raise KitError(f"{self.name}: {what} not found: {path}")
        argv = [str(self.binary), "run", "--kernel", str(self.kernel)]
        if self.initrd is not None:
            argv += ["--initrd", str(self.initrd)]
        argv += ["--cmdline", self.cmdline]
        for option, value in (("--memory", self.memory), ("--cpus", self.cpus), ("--vmgenid", self.vmgenid)):
            if value is not None:
                argv += [option, str(value)]
        return argv + self._device_args(tmp) + self.extra_args

    def _device_args(self, tmp: Path) -> list[str]:
        """--tpm and --drive, the same for `run` and `restore`."""
        argv: list[str] = []
        if self.tpm is not None:
            argv += ["--tpm", f"builtin,state={tmp / 'tpm-state'}" if self.tpm == "builtin" else self.tpm]
        for d in self.drives:
            argv += ["--drive", d if "file=" in d else f"file={d}"]
        return argv

    def _check_kvm(self) -> list[str]:
        kind, line = host_kvm(self.binary)
        if kind == "hardware":
            return []
        if kind == "emulated" and self.allow_slow_kvm:
            return ["--allow-slow-kvm"]
        raise NoHardwareVirtualization(
            f"{self.name}: this host cannot boot a Linux guest in useful time ({self.binary} host-info: {line}). "
            "Run the test under pytest with the swiftvmm plugin, which then runs the session inside the nested "
            "test host (--swiftvmm-via=auto, the default), or pass allow_slow_kvm=True")

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "VM":
        """Starts swiftvmm and connects to its QMP socket. Raises VMExited if it exits first (with
        its stderr), ExpectTimeout if the socket does not appear within start_timeout."""
        if self.process is not None:
            raise KitError(f"{self.name}: already started")
        try:
            self._spawn()
            self._connect()
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    @property
    def _socket(self) -> Path:
        assert self.dir is not None
        return self.dir / "qmp.sock"

    def _spawn(self) -> None:
        """Makes the private directory and starts swiftvmm (the socket comes later: _connect)."""
        self.dir = _private_dir("swiftvmm-kit-")
        self.argv = self._command(self.dir) + self._check_kvm() + ["--qmp", str(self._socket)]
        self._stderr_file = open(self.dir / "stderr.log", "wb")
        self._console_log = open(self.dir / "console.log", "wb")
        self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr_file, start_new_session=True,
                                        preexec_fn=_die_with_parent, close_fds=True)
        with _registry_lock:
            _registry.add(self)
        assert self.process.stdout is not None
        self._console = Console(self.name, self.process.stdout, self.process.stdin, self._console_log,
                                lambda: self._wait_exit(2.0), self._stderr_tail,
                                getattr(self.echo, "buffer", self.echo))

    def _connect(self) -> None:
        sock = self._socket
        deadline = time.monotonic() + self.start_timeout
        while not sock.exists():
            if self.exit_status() is not None:
                raise VMExited(f"{self.name}: swiftvmm exited with status {self.exit_status()} before its QMP "
                               f"socket appeared ({' '.join(self.argv)})", self.exit_status(), self._console_tail(),
                               self._stderr_tail())
            if time.monotonic() > deadline:
                raise ExpectTimeout(f"{self.name}: swiftvmm's QMP socket {sock} did not appear within "
                                    f"{self.start_timeout:g} s", self._console_tail(), self._stderr_tail())
            time.sleep(0.01)
        self._qmp = QMPConnection(self.name, self.events)
        try:
            self._qmp.connect(str(sock), max(1.0, deadline - time.monotonic()) + 5)
        except Exception as e:  # noqa: BLE001 - reported with the VM's output
            if self.running is False or self._wait_exit(1.0) is not None:
                raise VMExited(f"{self.name}: swiftvmm exited with status {self.exit_status()} while the kit "
                               f"connected to its QMP socket", self.exit_status(), self._console_tail(),
                               self._stderr_tail()) from None
            raise VMError(f"{self.name}: cannot connect to QMP at {sock}: {type(e).__name__}: {e}",
                          self._console_tail(), self._stderr_tail()) from None

    def __enter__(self) -> "VM":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, graceful: bool = True) -> Optional[int]:
        """Ends the VM if it still runs (QMP quit, SIGTERM, SIGKILL, in turn), closes everything and
        removes the temporary directory. Returns the exit status. Safe to call more than once."""
        if self._closed:
            return self.exit_status()
        self._closed = True
        proc = self.process
        if proc is not None and proc.poll() is None:
            if graceful and self._qmp is not None:
                try:
                    self._qmp.execute("quit", timeout=3)
                except QMPError:
                    pass
                self._wait_quietly(3)
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
                self._wait_quietly(grace)
        if self._qmp is not None:
            self._qmp.close()
        if self._console is not None:
            self._console.join(5)
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
        for name in ("_stderr_file", "_console_log"):
            f = getattr(self, name, None)
            if f is not None:
                f.close()
        self._stderr_text = self._read_stderr()
        with _registry_lock:
            _registry.discard(self)
        if self.dir is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.exit_status()

    def _wait_exit(self, seconds: float) -> Optional[int]:
        self._wait_quietly(seconds)
        return self.exit_status()

    def _wait_quietly(self, seconds: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            pass

    # -- state -----------------------------------------------------------------------------------
    def exit_status(self) -> Optional[int]:
        """swiftvmm's exit status (128+N for signal N), or None while it runs."""
        if self.process is None:
            return None
        rc = self.process.poll()
        if rc is not None and rc < 0:
            return 128 - rc
        return rc

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def threads(self) -> str:
        """While swiftvmm runs: one line per thread (name, state, kernel wait channel) and the kernel
        stack where it is readable (root). For a guest that hangs: a vCPU thread inside KVM_RUN is
        running the guest; one blocked elsewhere is swiftvmm's doing."""
        if not self.running:
            return "(not running)"
        assert self.process is not None
        lines = []
        for task in sorted(Path(f"/proc/{self.process.pid}/task").glob("*"), key=lambda p: int(p.name)):
            try:
                comm = (task / "comm").read_text().strip()
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = (task / "wchan").read_text().strip() or "-"
            except OSError:
                continue  # the thread ended meanwhile
            lines.append(f"{task.name} {comm}: state {state}, wchan {wchan}")
            try:
                stack = (task / "stack").read_text().split("\n")[:8]
            except OSError:
                stack = []
            lines += [f"    {frame}" for frame in stack if frame]
        return "\n".join(lines) or "(no threads readable)"

    @property
    def console(self) -> Console:
        if self._console is None:
            raise KitError(f"{self.name}: not started")
        return self._console

    @property
    def stderr(self) -> str:
        """swiftvmm's standard error (its log) so far."""
        return self._stderr_text if self._closed else self._read_stderr()

    def _read_stderr(self) -> str:
        if self.dir is None:
            return self._stderr_text
        try:
            return (self.dir / "stderr.log").read_bytes().decode("utf-8", "replace")
        except OSError:
            return self._stderr_text

    def _stderr_tail(self) -> str:
        lines = self.stderr.splitlines()
        return "\n".join(lines[-15:])

    def _console_tail(self) -> str:
        return self._console.tail(TAIL_LINES) if self._console is not None else ""

    def qmp_transcript(self) -> str:
        return self._qmp.transcript_text() if self._qmp is not None else "(no QMP connection)"

    def wait(self, timeout: float = 60.0) -> int:
        """Waits for swiftvmm to exit; returns its status. ExpectTimeout after `timeout` seconds."""
        if self.process is None:
            raise KitError(f"{self.name}: not started")
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ExpectTimeout(f"{self.name}: swiftvmm did not exit within {timeout:g} s", self._console_tail(),
                                self._stderr_tail()) from None
        if self._console is not None:
            self._console.join(5)
        status = self.exit_status()
        assert status is not None
        return status

    # -- control ---------------------------------------------------------------------------------
    def qmp(self, command: str, arguments: Optional[Mapping[str, Any]] = None, *, timeout: float = 60.0,
            **args: Any) -> Any:
        """Runs a QMP command and returns its result. Keyword arguments become the command's
        arguments with '_' turned into '-' (QMP's spelling); pass a dict to keep names as they are.
        QMPError on an error reply, naming the command and QEMU's error text."""
        if self._qmp is None:
            raise KitError(f"{self.name}: not started")
        merged = dict(arguments or {})
        merged.update({k.replace("_", "-"): v for k, v in args.items()})
        return self._qmp.execute(command, merged, timeout)

    @property
    def status(self) -> str:
        """query-status: "running", "paused", "save-vm", ..."""
        return str(self.qmp("query-status")["status"])

    def pause(self) -> None:
        """Stops the vCPUs (QMP stop)."""
        self.qmp("stop")

    def resume(self) -> None:
        """Lets the vCPUs run again (QMP cont)."""
        self.qmp("cont")

    def powerdown(self, timeout: float = 60.0) -> int:
        """Presses the ACPI power button and waits for swiftvmm to exit; returns its status."""
        self.qmp("system_powerdown")
        return self.wait(timeout)

    def quit(self, timeout: float = 30.0) -> int:
        """Ends the VM at once (QMP quit) and returns swiftvmm's status."""
        try:
            self.qmp("quit", timeout=timeout)
        except QMPError:
            if self.running:
                raise
        return self.wait(timeout)

    # -- the VM generation ID --------------------------------------------------------------------
    @property
    def generation_id(self) -> str:
        """The VM generation ID the guest sees now (query-vm-generation-id)."""
        return str(self.qmp("query-vm-generation-id")["guid"])

    def generation_id_state(self) -> dict[str, Any]:
        """query-vm-generation-id in full: guid, pending, acknowledged, ack-latency-ms."""
        return dict(self.qmp("query-vm-generation-id"))

    def set_generation_id(self, guid: str = "auto") -> str:
        """Changes the VM generation ID (GUID, or "auto" for a random one) and notifies the guest
        (GPE 5); returns the new GUID."""
        return str(self.qmp("set-vm-generation-id", guid=guid)["guid"])

    def expect_generation_id_acknowledged(self, guid: Optional[str] = None, timeout: float = 30.0,
                                          console: Optional[str] = None) -> Event:
        """Waits until the guest acknowledged the change to `guid` (default: the current one): the
        VM_GENERATION_ID_ACKNOWLEDGED event, which swiftvmm sends when the guest's ACPI took the
        notification. With `console`, also waits for that regular expression on the console (e.g.
        the guest's reseed line). Returns the event; ExpectTimeout says whether the change is still
        pending.

        A restored clone's guest can take the change before the kit has connected to QMP (within
        some 200 ms of its start): that event went to no client. When query-vm-generation-id says
        the change to `guid` is acknowledged and no event comes, the returned event is made from
        the query: the same name and data (guid, latency-ms), "from": "query-vm-generation-id", no
        timestamp."""
        state = self.generation_id_state()
        want = guid if guid is not None else state["guid"]
        try:
            if state.get("guid") == want and state.get("acknowledged"):
                try:
                    # Sent while the kit was connected: it is in the log, or about to be.
                    event = self.events.expect(ACK_EVENT, min(timeout, 1.0), guid=want)
                except ExpectTimeout:
                    event = {"event": ACK_EVENT, "data": {"guid": want, "latency-ms": state.get("ack-latency-ms")},
                             "from": "query-vm-generation-id"}
            else:
                event = self.events.expect(ACK_EVENT, timeout, guid=want)
        except ExpectTimeout as e:
            try:
                state = self.generation_id_state()
            except QMPError:
                state = {}
            raise ExpectTimeout(f"{self.name}: the guest did not acknowledge generation ID {want} within "
                                f"{timeout:g} s (query-vm-generation-id: {state or 'no answer'}; events: "
                                f"{', '.join(self.events.names()) or 'none'})", e.console_tail,
                                self._stderr_tail()) from None
        if console is not None:
            self.console.expect(console, timeout)
        return event

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self, path: Optional[PathLike] = None, live: bool = False, timeout: float = 600.0) -> "Snapshot":
        """Saves the VM into a snapshot directory (snapshot-create) and returns it. Without `path`,
        a new private directory holds it, removed by Snapshot.remove() or at interpreter exit. The
        VM keeps its state (a running VM runs on after the save; with live=True it is paused only
        for milliseconds)."""
        owned: Optional[Path] = None
        if path is None:
            owned = _private_dir("swiftvmm-snap-")
            target = owned / "snapshot"
        else:
            target = Path(path)
            if target.exists():
                raise SnapshotError(f"{self.name}: snapshot path {target} already exists")
        try:
            info = self.qmp("snapshot-create", path=str(target), live=live, timeout=timeout)
        except QMPError as e:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise SnapshotError(f"{self.name}: snapshot-create {target}: {e}") from None
        return Snapshot(target, self.binary, dict(info or {}), owned, source=self)


class RestoredVM(VM):
    """A VM continued from a snapshot (`swiftvmm restore DIR`); made by Snapshot.restore."""

    def __init__(self, snapshot: "Snapshot", vmgenid: Optional[str] = "auto", clock: Optional[str] = None,
                 paused: bool = False, working_set: bool = True, extra_args: Sequence[str] = (),
                 name: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(binary=kwargs.pop("binary", snapshot.binary), extra_args=extra_args,
                         name=name or _next_name("clone"), **kwargs)
        self.snapshot_ref = snapshot
        self.vmgenid = vmgenid
        self.clock = clock
        self.paused = paused
        self.working_set = working_set

    def _command(self, tmp: Path) -> list[str]:
        argv = [str(self.binary), "restore", str(self.snapshot_ref.path)]
        if self.vmgenid is not None:
            argv += ["--vmgenid", self.vmgenid]
        if self.clock is not None:
            argv += ["--clock", self.clock]
        if self.paused:
            argv.append("--paused")
        if not self.working_set:
            argv.append("--no-working-set")
        return argv + self._device_args(tmp) + self.extra_args


class VMGroup(list):  # type: ignore[type-arg]
    """Several VMs (the clones of a restore), closed together when the `with` block ends."""

    def __enter__(self) -> "VMGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        errors: list[BaseException] = []
        for vm in self:
            try:
                vm.close()
            except Exception as e:  # noqa: BLE001 - close the others first
                errors.append(e)
        if errors:
            raise errors[0]


class Snapshot:
    """A snapshot directory written by swiftvmm (format in docs/snapshot-format.md)."""

    def __init__(self, path: PathLike, binary: Optional[PathLike] = None, info: Optional[Mapping[str, Any]] = None,
                 owned_dir: Optional[Path] = None, source: Optional[VM] = None) -> None:
        self.path = Path(path)
        self.binary = find_binary(binary)
        self.info: dict[str, Any] = dict(info or {})
        self._owned_dir = owned_dir
        self.source_name = source.name if source is not None else None
        if owned_dir is not None:
            atexit.register(self.remove)

    def __repr__(self) -> str:
        return f"Snapshot({str(self.path)!r})"

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def pause_ms(self) -> Optional[float]:
        """How long the guest was paused for the save (snapshot-create's pause-ms), if known."""
        v = self.info.get("pause-ms")
        return float(v) if v is not None else None

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([str(self.binary), "snapshot", *args, str(self.path)], capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SnapshotError(f"swiftvmm snapshot {' '.join(args)} {self.path} did not finish within "
                                f"{timeout:g} s") from None

    def verify(self, timeout: float = 300.0) -> str:
        """`swiftvmm snapshot verify`: every checksum checked. Returns its report; SnapshotError
        with the report when a check fails."""
        proc = self._run("verify", timeout=timeout)
        report = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise SnapshotError(f"snapshot {self.path} failed verification (status {proc.returncode}):\n{report}")
        return report

    def inspect(self, timeout: float = 60.0) -> dict[str, Any]:
        """`swiftvmm snapshot inspect`, parsed: the header rows by their labels ("format", "writer",
        "guest memory", "vCPUs", ...), plus "memory_bytes" and "vcpus" as numbers and "sections": a
        list of {"name", "version", "minimum", "required", "offset", "length", "crc32c"}."""
        proc = self._run("inspect", timeout=timeout)
        if proc.returncode != 0:
            raise SnapshotError(f"swiftvmm snapshot inspect {self.path} failed (status {proc.returncode}): "
                                f"{proc.stderr.strip() or proc.stdout.strip()}")
        return parse_inspect(proc.stdout)

    def restore(self, n: int = 1, vmgenid: str = "auto", clock: Optional[str] = None, paused: bool = False,
                working_set: bool = True, extra_args: Sequence[str] = (), start: bool = True,
                **kwargs: Any) -> VMGroup:
        """Starts `n` independent clones of this snapshot together (`swiftvmm restore`), each a VM
        with its own QMP socket and, with vmgenid="auto", its own new generation ID. Returns them as
        a VMGroup (a list; a context manager that closes them all). If one fails to start, the
        others are closed and the error is raised."""
        if n < 1:
            raise ValueError("n must be at least 1")
        if not (self.path / "state.bin").is_file():
            raise SnapshotError(f"{self.path} is not a snapshot directory (no state.bin)")
        clones = VMGroup(RestoredVM(self, vmgenid=vmgenid, clock=clock, paused=paused, working_set=working_set,
                                    extra_args=extra_args, **kwargs) for _ in range(n))
        if not start:
            return clones
        try:
            # Every process first, then every socket: the clones start side by side.
            for vm in clones:
                vm._spawn()
            for vm in clones:
                vm._connect()
        except BaseException:
            for vm in clones:
                vm.close(graceful=False)
            raise
        return clones

    def remove(self) -> None:
        """Deletes the snapshot's private directory (only one the kit made; a path you gave stays)."""
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)


def parse_inspect(text: str) -> dict[str, Any]:
    """The output of `swiftvmm snapshot inspect` as a dict (see Snapshot.inspect)."""
    out: dict[str, Any] = {"sections": []}
    in_sections = False
    for line in text.splitlines():
        if line.startswith("sections ("):
            in_sections = True
            continue
        if in_sections:
            cells = line.split()
            if not cells or cells[0] == "NAME":
                continue
            if len(cells) == 7:
                out["sections"].append({
                    "name": cells[0], "version": int(cells[1]), "minimum": int(cells[2]),
                    "required": cells[3].startswith("required"), "offset": int(cells[4]),
                    "length": int(cells[5]), "crc32c": cells[6]})
            continue
        if line.startswith("snapshot "):
            out["path"] = line[len("snapshot "):]
            continue
        label, value = line[:19].rstrip(), line[19:].strip()
        if label and value:
            out[label] = value
    m = re.match(r"(\d+)", str(out.get("guest memory", "")))
    if m:
        out["memory_bytes"] = int(m.group(1))
    if str(out.get("vCPUs", "")).isdigit():
        out["vcpus"] = int(out["vCPUs"])
    return out
