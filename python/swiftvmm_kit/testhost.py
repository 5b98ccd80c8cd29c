"""Running a command inside the nested test host (guest-tests/testhost.sh of a swiftvmm checkout),
for hosts whose /dev/kvm has no hardware virtualization behind it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .binary import find_testhost
from .errors import KitError

#: Set inside the test host by the kit, so that a pytest session there runs its VMs directly.
INSIDE_ENV = "SWIFTVMM_KIT_INSIDE_TESTHOST"


def inside() -> bool:
    """True in a process the kit started inside the test host."""
    return os.environ.get(INSIDE_ENV) == "1"


def cache_root() -> Path:
    return Path(os.environ.get("SWIFTVMM_CACHE") or Path.home() / ".cache" / "swiftvmm")


def testhost_command(command: Sequence[str], binary: Path, timeout: int, cwd: Path,
                     extra_env: Sequence[str] = (), testhost: Optional[Path] = None) -> list[str]:
    """The argv that runs `command` in the test host: cwd, the guest-image cache and swiftvmm's
    binary visible; the environment the kit needs passed in (the test host starts with a clean one)."""
    script = testhost or find_testhost(binary)
    if script is None:
        raise KitError(
            "this host has no hardware virtualization and no nested test host was found to run the VMs in: "
            "set SWIFTVMM_TESTHOST to guest-tests/testhost.sh of a swiftvmm checkout, or run on a host with "
            "vmx/svm")
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    argv = [str(script), "--timeout", str(timeout), "--rw", str(cache)]
    if os.access(cwd, os.W_OK):
        argv += ["--rw", str(cwd)]
    env = [f"SWIFTVMM={binary}", f"{INSIDE_ENV}=1", "SWIFTVMM_KIT_VIA=direct", f"SWIFTVMM_CACHE={cache}",
           "PYTHONDONTWRITEBYTECODE=1"]
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                             os.environ.get("PYTHONPATH", "")) if p)
    env.append(f"PYTHONPATH={pythonpath}")
    fixed = {e.partition("=")[0] for e in env}
    for name in sorted(os.environ):
        if name.startswith("SWIFTVMM_") and name not in fixed and name != "SWIFTVMM_TESTHOST":
            env.append(f"{name}={os.environ[name]}")
    env += list(extra_env)
    for e in env:
        argv += ["--env", e]
    return argv + ["--", *command]


def python_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, *args]
