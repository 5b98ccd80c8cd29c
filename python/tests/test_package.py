"""The package as users get it: `pip install ./python` builds a wheel with every module, py.typed and
the pytest11 entry point, and the installed plugin loads without -p. And the guide shows the
examples exactly as they are in examples/ (CI runs those files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

KIT = Path(__file__).resolve().parent.parent
REPO = KIT.parent


def test_pip_builds_a_typed_wheel_with_the_plugin_entry_point(tmp_path):
    # A copy: setuptools writes its egg-info into the source tree, which would make the checkout's
    # python/ look installed.
    src = tmp_path / "src"
    shutil.copytree(KIT, src, ignore=shutil.ignore_patterns("tests", "examples", "build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("swiftvmm_kit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(p.name for p in (KIT / "swiftvmm_kit").glob("*.py"))
    for m in modules + ["py.typed"]:
        assert f"swiftvmm_kit/{m}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[pytest11]" in entry_points and "swiftvmm = swiftvmm_kit.pytest_plugin" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: qemu.qmp" in metadata

    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_x.py").write_text("def test_x(swiftvmm_guest_image):\n    assert callable(swiftvmm_guest_image)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_the_guide_shows_the_examples_as_they_are():
    guide = (REPO / "docs" / "testing-with-swiftvmm.md").read_text()
    examples = sorted((KIT / "examples").glob("test_*.py"))
    assert len(examples) == 3
    for example in examples:
        assert example.read_text().rstrip() in guide, f"{example.name} differs from its copy in the guide"
