"""swiftvmm-kit: boot, snapshot, clone and check small Linux guests under swiftvmm from Python.

    from swiftvmm_kit import VM, guest_image

    image = guest_image("echo hello from the guest")
    with VM(image) as vm:
        vm.console.expect(r"hello from the guest", timeout=60)

See docs/testing-with-swiftvmm.md in the swiftvmm repository."""

from .binary import find_binary, find_testhost, host_kvm
from .console import Console
from .errors import (BinaryNotFound, ExpectTimeout, KitError, NoHardwareVirtualization, QMPError, SnapshotError,
                     VMError, VMExited)
from .image import (DEFAULT_CMDLINE, MARKER_CASE_EXIT, MARKER_INIT, MARKER_POWEROFF, GuestImage, ImageError,
                    guest_image)
from .qmp import EventLog
from .vm import VM, RestoredVM, Snapshot, VMGroup, parse_inspect

__all__ = [
    "VM", "RestoredVM", "Snapshot", "VMGroup", "Console", "EventLog", "GuestImage", "guest_image",
    "find_binary", "find_testhost", "host_kvm", "parse_inspect",
    "KitError", "BinaryNotFound", "NoHardwareVirtualization", "VMError", "VMExited", "ExpectTimeout",
    "QMPError", "SnapshotError", "ImageError",
    "DEFAULT_CMDLINE", "MARKER_INIT", "MARKER_CASE_EXIT", "MARKER_POWEROFF",
]
__version__ = "0.1.0"
