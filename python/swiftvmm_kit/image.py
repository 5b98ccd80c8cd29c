"""Guest images for tests: the host's kernel (not copied) and a busybox initramfs built here, in
Python (no cpio, mknod or root needed), cached by content.

The initramfs is two cpio archives one after the other (Linux unpacks them in order): a base with
busybox, /init, the kernel modules asked for and their dependencies (shared by every image with
the same kernel, busybox and modules) and a small one with the test's script and files. So an image
that differs only in its script costs a few kilobytes to make.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import platform
import posixpath
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from .errors import KitError

MARKER_INIT = "swiftvmm-guest: init reached"
MARKER_CASE_EXIT = "swiftvmm-guest: case exit="
MARKER_POWEROFF = "swiftvmm-guest: powering off"
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"

FORMAT_VERSION = "swiftvmm-kit-image-1"
_TMP_PREFIX = ".building-"
#: Cached images and bases not used for this many days are removed when a new one is built.
PRUNE_AFTER_DAYS = 14

PathLike = Union[str, "os.PathLike[str]"]
FileContent = Union[str, bytes, "os.PathLike[str]"]


class ImageError(KitError):
    """A guest image cannot be made: a missing kernel, busybox or module, or a bad file path."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs for VM(...)."""

    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


# -- the kernel ----------------------------------------------------------------------------------

def kernel_version_of(path: PathLike) -> str:
    """The kernel version (`uname -r`) in a bzImage's setup header."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(0x10000)
    except OSError as e:
        raise ImageError(f"cannot read kernel {p}: {e.strerror}") from None
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        raise ImageError(f"{p} is not a bzImage (no HdrS setup header)")
    ptr = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    end = data.find(b"\0", ptr)
    if ptr >= len(data) or end < 0:
        raise ImageError(f"{p} is a bzImage without a readable version string")
    words = data[ptr:end].decode("ascii", "replace").split()
    if not words:
        raise ImageError(f"{p} is a bzImage with an empty version string")
    return words[0]


def default_kernel() -> Path:
    """$SWIFTVMM_KERNEL; else /boot/vmlinuz-$(uname -r); else the newest /boot/vmlinuz-*-amd64."""
    env = os.environ.get("SWIFTVMM_KERNEL")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ImageError(f"$SWIFTVMM_KERNEL names {p}, which is not a file")
        return p
    running = Path("/boot") / f"vmlinuz-{platform.release()}"
    if running.is_file():
        return running
    candidates = sorted(Path("/boot").glob("vmlinuz-*-amd64"), key=lambda p: _version_key(p.name))
    if not candidates:
        raise ImageError("no guest kernel: no /boot/vmlinuz-* (install linux-image-amd64, or set SWIFTVMM_KERNEL)")
    return candidates[-1]


def _version_key(name: str) -> list[object]:
    parts: list[object] = []
    for chunk in name.replace("-", ".").split("."):
        parts.append((0, int(chunk)) if chunk.isdigit() else (1, chunk))
    return parts


# -- modules -------------------------------------------------------------------------------------

def _module_name(path: str) -> str:
    base = posixpath.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


def _module_closure(moddir: Path, names: Sequence[str], version: str) -> list[str]:
    """The relative paths of the modules `names` and their dependencies, dependencies first."""
    if not names:
        return []
    try:
        dep_text = (moddir / "modules.dep").read_text()
    except OSError:
        raise ImageError(f"no {moddir}/modules.dep: the modules of kernel {version} are not installed "
                         f"(install linux-image-{version})") from None
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path.strip(), rest.split())
    try:
        builtin = {_module_name(line.strip()) for line in (moddir / "modules.builtin").read_text().splitlines()}
    except OSError:
        builtin = set()
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen or key in chain:
            return
        if key not in deps:
            if key in builtin:
                return
            raise ImageError(f"no kernel module named {name} for kernel {version} (not in {moddir}/modules.dep; "
                             f"built-in modules need no loading)")
        path, needs = deps[key]
        for dep in needs:
            visit(_module_name(dep), chain + (key,))
        seen.add(key)
        order.append(path)

    for n in names:
        visit(n, ())
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(f"{path} is zstd-compressed and there is no zstd program (install zstd)")
        return subprocess.run([zstd, "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def _ko_path(rel: str) -> str:
    for ext in (".xz", ".zst", ".gz"):
        if rel.endswith(ext):
            return rel[: -len(ext)]
    return rel


# -- busybox -------------------------------------------------------------------------------------

def _find_busybox(busybox: Optional[PathLike]) -> Path:
    if busybox is not None:
        p = Path(busybox)
    elif Path("/bin/busybox").is_file():
        p = Path("/bin/busybox")
    else:
        found = shutil.which("busybox")
        if found is None:
            raise ImageError("no busybox (install busybox-static)")
        p = Path(found)
    try:
        head = p.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read busybox {p}: {e.strerror}") from None
    if head[:4] != b"\x7fELF":
        raise ImageError(f"{p} is not an ELF program (install busybox-static)")
    if _has_interpreter(head):
        raise ImageError(f"{p} is dynamically linked: install busybox-static (an initramfs has no shared libraries)")
    return p


def _has_interpreter(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF has a PT_INTERP program header (a dynamic executable)."""
    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return True  # not what a static x86-64 busybox is
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize = int.from_bytes(elf[54:56], "little")
    phnum = int.from_bytes(elf[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(elf[off:off + 4], "little") == 3:  # PT_INTERP
            return True
    return False


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ImageError(f"{busybox} --list failed: {e}") from None
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


# -- cpio (newc) -----------------------------------------------------------------------------------

class CpioWriter:
    """A deterministic cpio "newc" archive: entries in the order written, mtime 0, owner root."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.lstrip("/").encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name_bytes), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name_bytes)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer, gzip-compressed (no name, mtime 0: reproducible)."""
        self._entry("TRAILER!!!", 0)
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(self._out.getvalue())
        return buf.getvalue()


# -- /init ---------------------------------------------------------------------------------------

INIT = f"""#!/bin/sh
# swiftvmm-kit guest /init (python/swiftvmm_kit/image.py)
export PATH=/bin:/sbin HOME=/root
errors=""
mount -t proc proc /proc 2>/dev/null || errors="$errors proc"
mount -t sysfs sysfs /sys 2>/dev/null || errors="$errors sys"
mount -t devtmpfs devtmpfs /dev 2>/dev/null || errors="$errors dev"
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
echo "{MARKER_INIT}"
[ -z "$errors" ] || echo "swiftvmm-guest: could not mount:$errors"
if [ -s /etc/kit/load-modules ]; then
    modload $(cat /etc/kit/load-modules) || echo "swiftvmm-guest: modload $(cat /etc/kit/load-modules) failed"
fi
status=0
if [ -f /case.sh ]; then
    (cd / && sh /case.sh)
    status=$?
fi
echo "{MARKER_CASE_EXIT}$status"
if [ "$(cat /etc/kit/after 2>/dev/null)" = shell ]; then
    if [ -e /bin/cttyhack ]; then setsid cttyhack sh; else sh; fi
fi
echo "{MARKER_POWEROFF}"
if [ -e /sys/firmware/acpi/tables/FACP ]; then poweroff -f; else reboot -f; fi
# Should not get here; returning from init panics the kernel (panic=-1 then reboots).
sleep 30
echo "swiftvmm-guest: power-off did not happen"
"""

MODLOAD = """#!/bin/sh
# modload NAME...: insmod each module and, first, its dependencies (from modules.dep).
dir=/lib/modules/$(uname -r)
load() {
    local name pat line deps d
    name=$(echo "$1" | tr - _)
    [ -d "/sys/module/$name" ] && return 0
    pat=$(echo "$name" | sed 's/_/[-_]/g')
    line=$(grep -E "(^|/)${pat}\\.ko:" "$dir/modules.dep" | head -n 1)
    if [ -z "$line" ]; then
        grep -qE "(^|/)${pat}\\.ko$" "$dir/modules.builtin" 2>/dev/null && return 0
        echo "modload: no module $1 in $dir/modules.dep" >&2
        return 1
    fi
    deps=${line#*:}
    for d in $deps; do
        d=${d##*/}
        load "${d%.ko}" || return 1
    done
    insmod "$dir/${line%%:*}" || [ -d "/sys/module/$name" ]
}
status=0
for m in "$@"; do load "$m" || status=1; done
exit $status
"""


# -- building ------------------------------------------------------------------------------------

def _cache_dir(cache_dir: Optional[PathLike]) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("SWIFTVMM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "swiftvmm") / "kit"


def _stat_key(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()} {st.st_size} {st.st_mtime_ns}"


def _check_dest(dest: str) -> str:
    if not isinstance(dest, str) or not dest.startswith("/"):
        raise ImageError(f"initrd path {dest!r} must be absolute")
    norm = posixpath.normpath(dest)
    if norm != dest or ".." in dest.split("/") or norm == "/":
        raise ImageError(f"initrd path {dest!r} is not a plain normalised path")
    if norm in ("/init", "/case.sh") or norm == "/etc/kit" or norm.startswith("/etc/kit/"):
        raise ImageError(f"initrd path {dest} is the kit's own (/init, /case.sh, /etc/kit)")
    return norm


def _file_data(dest: str, content: FileContent) -> tuple[bytes, int]:
    if isinstance(content, (str, bytes)):
        data = content.encode() if isinstance(content, str) else content
        return data, 0o755 if data[:2] == b"#!" or data[:4] == b"\x7fELF" else 0o644
    p = Path(content)
    try:
        return p.read_bytes(), stat.S_IMODE(p.stat().st_mode)
    except OSError as e:
        raise ImageError(f"cannot read {p} (for {dest} in the initrd): {e.strerror}") from None


def _parents(path: str) -> Iterable[str]:
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/" + "/".join(parts[:i])


def _store(target_dir: Path, filename: str, data: bytes) -> Path:
    """Writes target_dir/filename complete or not at all: into a temporary directory beside it,
    renamed into place; if another builder got there first, theirs is kept."""
    parent = target_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    _sweep(parent)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent))
    try:
        with open(tmp / filename, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, target_dir)
        except OSError:
            if not (target_dir / filename).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target_dir / filename


def _sweep(parent: Path) -> None:
    """Removes temporary build directories left by builders that died more than an hour ago."""
    now = time.time()
    for d in parent.glob(_TMP_PREFIX + "*"):
        try:
            if now - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _prune(cache: Path, keep: Sequence[Path]) -> None:
    """Removes the images and bases under `cache` unused for PRUNE_AFTER_DAYS (a use touches its
    directory), except `keep`. Each goes in one rename, to a temporary name that _sweep also
    clears, so that no reader ever finds one half removed."""
    limit = time.time() - PRUNE_AFTER_DAYS * 86400
    kept = {k.resolve() for k in keep}
    for kind in ("images", "bases"):
        parent = cache / kind
        for d in parent.glob("[0-9a-f]*"):
            try:
                if d.resolve() in kept or d.stat().st_mtime >= limit:
                    continue
                doomed = parent / f"{_TMP_PREFIX}pruned-{d.name}-{os.getpid()}"
                os.rename(d, doomed)
            except OSError:
                continue  # gone already, or another process pruned it
            shutil.rmtree(doomed, ignore_errors=True)


def _touch(directory: Path) -> None:
    """Marks a cached image or base as used now (what _prune goes by)."""
    try:
        os.utime(directory)
    except OSError:
        pass


def _build_base(busybox: Path, moddir: Path, version: str, modules: list[str]) -> bytes:
    w = CpioWriter()
    for d in ("bin", "sbin", "dev", "proc", "sys", "etc", "root", "lib", "lib/modules", f"lib/modules/{version}"):
        w.directory(d)
    w.directory("tmp", 0o1777)
    w.char_device("dev/console", 5, 1)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _applets(busybox):
        w.symlink(f"bin/{applet}", "busybox")
    w.file("bin/modload", MODLOAD.encode(), 0o755)
    w.file("init", INIT.encode(), 0o755)
    made = {"lib", "lib/modules", f"lib/modules/{version}"}
    dep_lines = []
    wanted = set(modules)
    for rel in modules:
        ko = _ko_path(rel)
        for parent in _parents(f"/lib/modules/{version}/{ko}"):
            p = parent.lstrip("/")
            if p not in made:
                w.directory(p)
                made.add(p)
        try:
            data = _read_module(moddir / rel)
        except OSError as e:
            raise ImageError(f"cannot read module {moddir / rel}: {e.strerror}") from None
        w.file(f"lib/modules/{version}/{ko}", data)
    for line in (moddir / "modules.dep").read_text().splitlines() if modules else []:
        path, _, rest = line.partition(":")
        if path.strip() in wanted:
            dep_lines.append(_ko_path(path.strip()) + ":" + "".join(" " + _ko_path(d) for d in rest.split()))
    w.file(f"lib/modules/{version}/modules.dep", ("\n".join(sorted(dep_lines)) + "\n" if dep_lines else "").encode())
    try:
        w.file(f"lib/modules/{version}/modules.builtin", (moddir / "modules.builtin").read_bytes())
    except OSError:
        pass
    return w.finish()


def _build_case(script: str, load: Sequence[str], after: str, files: list[tuple[str, bytes, int]]) -> bytes:
    w = CpioWriter()
    made = {"/etc"}
    w.directory("etc")
    w.directory("etc/kit")
    w.file("etc/kit/after", after.encode() + b"\n")
    w.file("etc/kit/load-modules", (" ".join(load) + "\n").encode() if load else b"")
    if script:
        w.file("case.sh", script.encode() + (b"" if script.endswith("\n") else b"\n"), 0o755)
    for dest, data, mode in files:
        for parent in _parents(dest):
            if parent not in made:
                w.directory(parent, 0o1777 if parent == "/tmp" else 0o755)
                made.add(parent)
        w.file(dest, data, mode)
    return w.finish()


def guest_image(script: str = "", *, modules: Sequence[str] = (), files: Optional[Mapping[str, FileContent]] = None,
                after: str = "poweroff", load_modules: bool = True, kernel: Optional[PathLike] = None,
                busybox: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None) -> GuestImage:
    """A guest image whose /init mounts proc, sysfs and devtmpfs, prints MARKER_INIT, loads
    `modules` (with their dependencies; only put into the image with load_modules=False: `modload
    NAME` loads one from the script), runs `script` as /case.sh, prints MARKER_CASE_EXIT and the
    script's status, and powers off (after="shell": a shell on the console first, then the power-off
    when it exits).

    files    initrd path -> content: str or bytes (mode 0755 if it starts with "#!" or is an ELF
             program, else 0644), or a host file to copy (its mode kept)
    kernel   the bzImage (default: default_kernel()); its modules come from /lib/modules/VERSION
    busybox  a static busybox (default /bin/busybox, else on PATH)
    Cached under cache_dir (default $SWIFTVMM_CACHE/kit, else ~/.cache/swiftvmm/kit) by everything that
    goes into it; building one removes the cached images unused for PRUNE_AFTER_DAYS. ImageError on a missing kernel, module or busybox, or a bad initrd path."""
    if after not in ("poweroff", "shell"):
        raise ValueError(f"after={after!r}: must be 'poweroff' or 'shell'")
    kernel_path = Path(kernel) if kernel is not None else default_kernel()
    if not kernel_path.is_file():
        raise ImageError(f"kernel not found: {kernel_path}")
    version = kernel_version_of(kernel_path)
    bb = _find_busybox(busybox)
    moddir = Path("/lib/modules") / version
    mods = _module_closure(moddir, list(modules), version)
    checked = []
    for dest, content in sorted((files or {}).items()):
        norm = _check_dest(dest)
        data, mode = _file_data(norm, content)
        checked.append((norm, data, mode))

    cache = _cache_dir(cache_dir)
    h = hashlib.sha256()
    h.update(FORMAT_VERSION.encode())
    h.update(_stat_key(bb).encode())
    h.update(version.encode())
    for rel in mods:
        h.update(_stat_key(moddir / rel).encode())
    base_key = h.hexdigest()[:32]
    h.update(b"\0case\0" + script.encode() + b"\0" + after.encode() + b"\0")
    load = list(modules) if load_modules else []
    h.update(" ".join(load).encode())
    for dest, data, mode in checked:
        h.update(f"\0{dest}\0{mode}\0{len(data)}\0".encode() + hashlib.sha256(data).digest())
    key = h.hexdigest()

    image_dir = cache / "images" / key[:32]
    initrd = image_dir / "initramfs.cpio.gz"
    base_dir = cache / "bases" / base_key
    if initrd.is_file():
        _touch(image_dir)
        _touch(base_dir)  # its images are in use: a later build of another one needs it
    else:
        base = base_dir / "base.cpio.gz"
        if base.is_file():
            _touch(base_dir)
        else:
            base = _store(base_dir, "base.cpio.gz", _build_base(bb, moddir, version, mods))
        initrd = _store(image_dir, "initramfs.cpio.gz", base.read_bytes() + _build_case(script, load, after, checked))
        _prune(cache, keep=(image_dir, base_dir))
    return GuestImage(kernel=kernel_path, initrd=initrd, kernel_version=version, key=key)
