"""Guest images: the initramfs the kit builds (read back with a newc reader and with cpio), its
modules and their dependencies, the cache, and the errors for bad input."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from swiftvmm_kit import image as kit_image
from swiftvmm_kit.image import MARKER_CASE_EXIT, MARKER_INIT, MARKER_POWEROFF, ImageError, guest_image, kernel_version_of


def read_newc(data: bytes) -> list[dict]:
    """Every entry of one or more concatenated newc archives: name, mode, data, rdev."""
    entries, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 6] != b"070701":
            break
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = (name_start + namesize + 3) & ~3
        body = data[pos:pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            continue
        entries.append({"name": name, "mode": f[1], "data": body, "rdev": (f[9], f[10])})
    return entries


def unpack(path: Path) -> list[dict]:
    """The concatenated gzip members, decompressed one after the other (as the kernel does)."""
    raw = path.read_bytes()
    out = b""
    while raw:
        d = __import__("zlib").decompressobj(31)
        out += d.decompress(raw)
        raw = d.unused_data
    return read_newc(out)


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in entries}


def module_deps(name: str) -> set[str]:
    version = kernel_version_of(kit_image.default_kernel())
    for line in (Path("/lib/modules") / version / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        if kit_image._module_name(path) == name:
            return {kit_image._module_name(d) for d in rest.split()}
    raise AssertionError(f"{name} not in modules.dep")


def test_init_script_console_and_busybox(tmp_path):
    im = guest_image("echo from the case", cache_dir=tmp_path)
    e = by_name(unpack(im.initrd))
    init = e["init"]["data"].decode()
    assert stat.S_IMODE(e["init"]["mode"]) == 0o755
    assert init.index(MARKER_INIT) < init.index("sh /case.sh") < init.index(MARKER_CASE_EXIT) < init.index(MARKER_POWEROFF)
    assert e["case.sh"]["data"] == b"echo from the case\n"
    console = e["dev/console"]
    assert stat.S_ISCHR(console["mode"]) and console["rdev"] == (5, 1)
    assert stat.S_ISLNK(e["bin/sh"]["mode"]) and e["bin/sh"]["data"] == b"busybox"
    assert e["bin/busybox"]["data"] == Path("/bin/busybox").read_bytes()
    assert stat.S_IMODE(e["tmp"]["mode"]) == 0o1777
    assert im.kernel_version == kernel_version_of(im.kernel)


def test_modules_come_with_their_dependencies(tmp_path):
    deps = module_deps("virtio_blk")
    assert deps  # virtio_ring, virtio on Debian's kernel
    im = guest_image("", modules=("virtio-blk",), cache_dir=tmp_path)
    e = by_name(unpack(im.initrd))
    kos = {kit_image._module_name(n) for n in e if n.endswith(".ko")}
    assert kos == {"virtio_blk"} | deps
    dep = next(v["data"].decode() for n, v in e.items() if n.endswith("/modules.dep"))
    assert "virtio_blk.ko:" in dep and all(f"{d}.ko" in dep for d in deps)
    assert e["etc/kit/load-modules"]["data"] == b"virtio-blk\n"
    only_included = by_name(unpack(guest_image("", modules=("virtio_blk",), load_modules=False,
                                               cache_dir=tmp_path).initrd))
    assert only_included["etc/kit/load-modules"]["data"] == b""
    assert "bin/modload" in only_included


def test_builtin_and_unknown_modules(tmp_path):
    version = kernel_version_of(kit_image.default_kernel())
    builtin = Path(f"/lib/modules/{version}/modules.builtin").read_text().split()[0]
    guest_image("", modules=(kit_image._module_name(builtin),), cache_dir=tmp_path)
    with pytest.raises(ImageError, match="no kernel module named no_such_module_xyz for kernel"):
        guest_image("", modules=("no_such_module_xyz",), cache_dir=tmp_path)


def test_files_and_their_modes(tmp_path):
    host = tmp_path / "tool"
    host.write_bytes(b"\x7fELF fake")
    host.chmod(0o750)
    im = guest_image("", files={"/bin/tool": host, "/etc/motd": "hello\n", "/opt/x/run.sh": "#!/bin/sh\necho\n"},
                     cache_dir=tmp_path / "c")
    e = by_name(unpack(im.initrd))
    assert e["bin/tool"]["data"] == b"\x7fELF fake" and stat.S_IMODE(e["bin/tool"]["mode"]) == 0o750
    assert stat.S_IMODE(e["etc/motd"]["mode"]) == 0o644
    assert stat.S_IMODE(e["opt/x/run.sh"]["mode"]) == 0o755 and stat.S_ISDIR(e["opt/x"]["mode"])


@pytest.mark.parametrize("dest", ["relative", "/a/../b", "/init", "/case.sh", "/etc/kit/after", "/a//b", "/"])
def test_bad_file_paths_are_refused(tmp_path, dest):
    with pytest.raises(ImageError, match="initrd path"):
        guest_image("", files={dest: "x"}, cache_dir=tmp_path)


def test_cache_hits_and_keys(tmp_path):
    a = guest_image("echo a", cache_dir=tmp_path)
    mtime = a.initrd.stat().st_mtime_ns
    again = guest_image("echo a", cache_dir=tmp_path)
    assert again.initrd == a.initrd and again.initrd.stat().st_mtime_ns == mtime
    b = guest_image("echo b", cache_dir=tmp_path)
    assert b.key != a.key and b.initrd != a.initrd
    assert len(list((tmp_path / "bases").iterdir())) == 1  # one base for both
    other = guest_image("echo a", cache_dir=tmp_path / "other")
    assert other.initrd.read_bytes() == a.initrd.read_bytes()  # reproducible


def test_the_cache_drops_what_was_not_used_for_two_weeks(tmp_path):
    old = guest_image("echo old", cache_dir=tmp_path)
    used = guest_image("echo used", cache_dir=tmp_path)
    month_ago = time.time() - 30 * 86400
    for im in (old, used):
        os.utime(im.initrd.parent, (month_ago, month_ago))
    # A stale base of another kernel or busybox goes too; a temporary build directory is left to _sweep.
    stale_base = tmp_path / "bases" / ("f" * 32)
    stale_base.mkdir()
    (stale_base / "base.cpio.gz").write_bytes(b"x")
    os.utime(stale_base, (month_ago, month_ago))
    # A hit marks the image as used; the next build prunes the rest.
    assert guest_image("echo used", cache_dir=tmp_path).initrd == used.initrd
    new = guest_image("echo new", cache_dir=tmp_path)
    assert not old.initrd.parent.exists() and not stale_base.exists()
    assert used.initrd.is_file() and new.initrd.is_file()
    assert len(list((tmp_path / "bases").iterdir())) == 1  # the base in use stays
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        [used.initrd.parent.name, new.initrd.parent.name])


def test_system_cpio_reads_the_archive(tmp_path):
    im = guest_image("echo x", cache_dir=tmp_path)
    first = gzip.GzipFile(fileobj=open(im.initrd, "rb")).read()  # the base archive (first member)
    proc = subprocess.run(["cpio", "-i", "-t", "--quiet"], input=first, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.decode().split()
    assert "init" in names and "dev/console" in names and "bin/busybox" in names


def test_shell_after_and_bad_after(tmp_path):
    e = by_name(unpack(guest_image("", after="shell", cache_dir=tmp_path).initrd))
    assert e["etc/kit/after"]["data"] == b"shell\n"
    assert "cttyhack sh" in e["init"]["data"].decode()
    with pytest.raises(ValueError, match="after="):
        guest_image("", after="reboot", cache_dir=tmp_path)


def test_bad_kernel_and_busybox(tmp_path):
    notkernel = tmp_path / "k"
    notkernel.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageError, match="not a bzImage"):
        kernel_version_of(notkernel)
    with pytest.raises(ImageError, match="kernel not found"):
        guest_image("", kernel=tmp_path / "missing", cache_dir=tmp_path)
    with pytest.raises(ImageError, match="dynamically linked: install busybox-static"):
        guest_image("", busybox="/bin/ls", cache_dir=tmp_path)


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(kit_image.CpioWriter, "finish", boom)
    with pytest.raises(OSError):
        guest_image("echo never", cache_dir=tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []
    assert not any(p.name.startswith(".building-") for p in tmp_path.rglob("*"))


def test_the_command_line_prints_eval_able_paths(tmp_path, monkeypatch):
    import shlex
    import sys
    monkeypatch.setenv("SWIFTVMM_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "case.sh"
    script.write_text("echo from the command line\n")
    tool = tmp_path / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    out = tmp_path / "initrd.img"
    env = {"PYTHONPATH": str(Path(kit_image.__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin",
           "SWIFTVMM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "swiftvmm_kit", "image", "--script", str(script), "--module",
                           "virtio_blk", "--file", f"{tool}:/bin/tool", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert shlex.split(values["INITRAMFS"]) == [str(out)]
    assert shlex.split(values["KERNEL_VERSION"]) == [kernel_version_of(shlex.split(values["VMLINUZ"])[0])]
    e = by_name(unpack(out))
    assert e["case.sh"]["data"] == b"echo from the command line\n" and "bin/tool" in e
    assert e["etc/kit/load-modules"]["data"] == b""  # without --load, only modload loads them
    bad = subprocess.run([sys.executable, "-m", "swiftvmm_kit", "image", "--file", "no-colon"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "swiftvmm_kit: --file 'no-colon': expected SRC:DEST"


def test_sigterm_during_out_leaves_no_temporary_file(tmp_path, monkeypatch):
    """SIGTERM while --out is being copied ends the command with 143 and removes the partial copy."""
    import os
    import signal
    from types import SimpleNamespace
    from swiftvmm_kit import __main__ as cli
    initrd = tmp_path / "built.img"
    initrd.write_bytes(b"x" * 4096)
    monkeypatch.setattr(cli, "guest_image", lambda *a, **k: SimpleNamespace(
        initrd=initrd, kernel=tmp_path / "vmlinuz", kernel_version="6.1.0-test"))

    def copy_then_terminated(src, dst):
        Path(dst).write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not end the copy")
    monkeypatch.setattr(cli.shutil, "copyfile", copy_then_terminated)
    out = tmp_path / "out" / "initrd.img"
    out.parent.mkdir()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ended:
        cli.main(["image", "--out", str(out)])
    assert ended.value.code == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before
