"""python3 -m swiftvmm_kit image [OPTIONS]: a guest image from the shell (what guest-tests/build-guest.sh
and make-initrd.sh use). Prints shell-quoted VMLINUZ=, INITRAMFS= and KERNEL_VERSION= lines (eval-able)."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from .errors import KitError
from .image import guest_image


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m swiftvmm_kit", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    im = sub.add_parser("image", help="build (or find in the cache) a guest image")
    im.add_argument("--script", metavar="FILE", help="the shell script /init runs as /case.sh")
    im.add_argument("--module", action="append", default=[], metavar="NAME",
                    help="a kernel module to put in, with its dependencies (repeatable)")
    im.add_argument("--load", action="store_true", help="/init loads the modules at boot (default: only "
                                                         "`modload NAME` in the script does)")
    im.add_argument("--file", action="append", default=[], metavar="SRC:DEST",
                    help="put the host file SRC at DEST in the initramfs (repeatable)")
    im.add_argument("--after", choices=("poweroff", "shell"), default="poweroff")
    im.add_argument("--kernel", metavar="PATH", help="the bzImage (default: the host's)")
    im.add_argument("--out", metavar="FILE", help="also copy the initramfs to FILE (written under a temporary "
                                                  "name and renamed)")
    args = ap.parse_args(argv)
    # SIGTERM ends the command as an exception does, so that `finally` removes what it wrote under a
    # temporary name (the default action would end the process on the spot and leave it).
    if threading.current_thread() is not threading.main_thread():
        return _image(args)  # only the main thread may set a handler
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _image(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _image(args: argparse.Namespace) -> int:
    try:
        files = {}
        for spec in args.file:
            src, sep, dest = spec.partition(":")
            if not sep or not src or not dest:
                raise KitError(f"--file {spec!r}: expected SRC:DEST")
            files[dest] = Path(src)
        script = Path(args.script).read_text() if args.script else ""
        image = guest_image(script, modules=args.module, load_modules=args.load, files=files, after=args.after,
                            kernel=args.kernel)
        initrd = image.initrd
        if args.out:
            out = Path(args.out)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            try:
                shutil.copyfile(image.initrd, tmp)
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
            initrd = out.resolve()
    except (KitError, OSError) as e:
        print(f"swiftvmm_kit: {e}", file=sys.stderr)
        return 1
    print(f"VMLINUZ={shlex.quote(str(image.kernel))}")
    print(f"INITRAMFS={shlex.quote(str(initrd))}")
    print(f"KERNEL_VERSION={shlex.quote(image.kernel_version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
