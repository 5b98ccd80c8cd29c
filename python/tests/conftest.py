"""The kit's unit tests run against tests/fake_swiftvmm.py (no KVM, no guest needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAKE = Path(__file__).resolve().parent / "fake_swiftvmm.py"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake swiftvmm as $SWIFTVMM, with every FAKE_ knob cleared."""
    for name in ("FAKE_KVM", "FAKE_MODE", "FAKE_CONSOLE", "FAKE_NO_ACK", "FAKE_ARGV_FILE", "SWIFTVMM_KIT_KEEP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SWIFTVMM", str(FAKE))
    from swiftvmm_kit import binary
    binary._kinds.clear()
    return FAKE


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "bzImage"
    k.write_bytes(b"not really a kernel")
    return k
