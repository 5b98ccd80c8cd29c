"""Finding the swiftvmm executable and what kind of KVM this host has."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Union

from .errors import BinaryNotFound

PathLike = Union[str, "os.PathLike[str]"]

_kinds: dict[str, tuple[str, str]] = {}


def find_binary(binary: Optional[PathLike] = None) -> Path:
    """The swiftvmm executable: `binary` if given, else $SWIFTVMM, else `swiftvmm` on PATH.

    Raises BinaryNotFound naming where it looked."""
    if binary is None:
        env = os.environ.get("SWIFTVMM")
        if env:
            binary, source = env, "$SWIFTVMM"
        else:
            found = shutil.which("swiftvmm")
            if found is None:
                raise BinaryNotFound(
                    "no swiftvmm executable: pass binary=PATH (pytest: --swiftvmm-bin PATH), set SWIFTVMM=PATH, "
                    "or put swiftvmm on PATH")
            return Path(found)
    else:
        source = "the given path"
    path = Path(binary).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        what = "does not exist" if not path.exists() else "is not an executable file"
        raise BinaryNotFound(f"swiftvmm executable {path} ({source}) {what}")
    return path.resolve()


def host_kvm(binary: Path) -> tuple[str, str]:
    """What `swiftvmm host-info` says of this host's /dev/kvm: ("hardware" | "emulated" | "none", its line).

    Cached per binary for the life of the process."""
    key = str(binary)
    if key not in _kinds:
        try:
            proc = subprocess.run([str(binary), "host-info"], capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL)
            line = (proc.stdout.strip().splitlines() or [proc.stderr.strip() or "no output"])[0]
        except (OSError, subprocess.TimeoutExpired) as e:
            line = f"none: {binary} host-info failed: {e}"
        kind = line.partition(":")[0].strip()
        if kind not in ("hardware", "emulated", "none"):
            kind = "none"
        _kinds[key] = (kind, line)
    return _kinds[key]


def find_testhost(binary: Optional[Path] = None) -> Optional[Path]:
    """guest-tests/testhost.sh of a swiftvmm checkout (the nested test host), or None.

    $SWIFTVMM_TESTHOST if set; else the checkout that holds `binary` (…/.build/…/swiftvmm); else the
    checkout this package was loaded from (python/swiftvmm_kit in the repository)."""
    env = os.environ.get("SWIFTVMM_TESTHOST")
    if env:
        return Path(env)
    starts = [Path(__file__).resolve().parent]
    if binary is not None:
        starts.insert(0, binary.resolve().parent)
    for start in starts:
        for d in (start, *start.parents):
            candidate = d / "guest-tests" / "testhost.sh"
            if candidate.is_file():
                return candidate
    return None
