"""pytest fixtures for the end-to-end guest tests (see guestrun.py for the design).

Environment:
  SWIFTVMM   the swiftvmm binary (default <repo>/.build/debug/swiftvmm)
  VMM        swiftvmm (default) or qemu: run the same cases under qemu-system-x86_64 -M microvm, or
             the machine a case asks for (GuestRun.qemu_machine), to check the harness itself
  E2E_VIA    auto (default: kvm-probe.sh decides), direct, or testhost
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guestrun import GuestRun, GuestSession  # noqa: E402

__all__ = ["GuestRun"]


def _declared_runs(session: pytest.Session) -> list[GuestRun]:
    runs: dict[str, GuestRun] = {}
    seen_modules = set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is None or module in seen_modules:
            continue
        seen_modules.add(module)
        for run in getattr(module, "GUEST_RUNS", []):
            if run.name in runs and runs[run.name] != run:
                raise pytest.UsageError(f"two different GuestRuns are named {run.name!r}")
            runs[run.name] = run
    return list(runs.values())


@pytest.fixture(scope="session")
def guest_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestSession:
    """Every declared guest run, carried out once per pytest session (one test-host session)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def log(line: str) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(line, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    session = GuestSession(_declared_runs(request.session), tmp_path_factory.mktemp("e2e"), log)
    session.execute()
    log(f"e2e: guest runs took {session.session_seconds:.1f} s" + (" (FAILED)" if session.error else ""))
    return session


@pytest.fixture
def guest(guest_session: GuestSession):
    """guest(name) -> CaseResult of the GuestRun with that name (fails every test if the runs failed)."""
    return guest_session.result


@pytest.fixture(scope="session")
def guest_kernel_version(guest_session: GuestSession) -> str:
    """The version (uname -r) of the kernel the guest runs boot, as build-guest.sh recorded it."""
    return guest_session.kernel_version


@pytest.fixture(scope="session")
def guest_vmlinuz(guest_session: GuestSession) -> Path:
    if guest_session.vmlinuz is None:
        pytest.fail(f"the guest was not built: {guest_session.error}", pytrace=False)
    return guest_session.vmlinuz
