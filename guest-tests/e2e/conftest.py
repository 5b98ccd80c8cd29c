"""pytest fixtures for the end-to-end guest tests (see guestrun.py for the design).

e2e.sh runs this directory with swiftvmm-kit's pytest plugin (python/swiftvmm_kit), which runs the
whole session inside the nested test host when this host's /dev/kvm has no hardware virtualization
(every test here is marked swiftvmm_kvm). Environment: SWIFTVMM (the binary, or --swiftvmm-bin).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guestrun import GuestRun, GuestSession  # noqa: E402

__all__ = ["GuestRun"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.swiftvmm_kvm)


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
    """The declared guest runs; each is carried out the first time a test asks for it."""
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def log(line: str) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(line, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return GuestSession(_declared_runs(request.session), tmp_path_factory.mktemp("e2e"), log)


@pytest.fixture
def guest(guest_session: GuestSession):
    """guest(name) -> CaseResult of the GuestRun with that name (run on first use)."""
    return guest_session.result


@pytest.fixture(scope="session")
def guest_kernel_version(guest_session: GuestSession) -> str:
    """The version (uname -r) of the kernel the guest runs boot."""
    return guest_session.kernel_version


@pytest.fixture(scope="session")
def guest_vmlinuz(guest_session: GuestSession) -> Path:
    if guest_session.vmlinuz is None:
        pytest.fail(f"no guest kernel: {guest_session.error}", pytrace=False)
    return guest_session.vmlinuz
