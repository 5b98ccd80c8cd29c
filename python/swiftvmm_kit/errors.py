"""The kit's exceptions. Each message is one sentence that names what was awaited or missing;
the ones raised while a VM runs end with the tail of its console."""

from __future__ import annotations

from typing import Optional


class KitError(Exception):
    """Base class of every error the kit raises."""


class BinaryNotFound(KitError):
    """The swiftvmm executable could not be found or is not executable."""


class NoHardwareVirtualization(KitError):
    """This host's /dev/kvm cannot boot a Linux guest in useful time (no vmx/svm behind it)."""


class VMError(KitError):
    """Something went wrong with a running VM: it exited, or did not start."""

    def __init__(self, message: str, console_tail: str = "", stderr_tail: str = "") -> None:
        self.console_tail = console_tail
        self.stderr_tail = stderr_tail
        text = message
        if console_tail:
            text += f"\n--- console tail:\n{console_tail}"
        if stderr_tail:
            text += f"\n--- swiftvmm stderr tail:\n{stderr_tail}"
        super().__init__(text)


class VMExited(VMError):
    """The VM's process ended while something was awaited from it."""

    def __init__(self, message: str, status: Optional[int], console_tail: str = "", stderr_tail: str = "") -> None:
        self.status = status
        super().__init__(message, console_tail, stderr_tail)


class ExpectTimeout(VMError, TimeoutError):
    """What was awaited (a console line, an event, an exit) did not come within the timeout."""


class QMPError(KitError):
    """A QMP command failed: the VMM answered with an error, or the connection broke."""

    def __init__(self, command: str, message: str, error_class: str = "") -> None:
        self.command = command
        self.error_class = error_class
        super().__init__(f"QMP {command} failed: {message}" + (f" ({error_class})" if error_class else ""))


class SnapshotError(KitError):
    """A snapshot could not be taken, verified, inspected or restored."""
