#!/usr/bin/env bash
# make-initrd.sh --case SCRIPT --out FILE [--base INITRAMFS] [--add SRC:DEST]...
#
# Writes FILE = the base test initramfs (build-guest.sh's, built or taken from its cache; or --base)
# followed by a second gzip'd cpio archive holding SCRIPT as /case.sh. Linux unpacks concatenated
# archives in order, so the guest's /init finds /case.sh and runs it with `sh` (output to the console).
# --add SRC:DEST (repeatable) also puts the file SRC at the absolute path DEST in that archive (e.g. a
# static tool as /bin/NAME; it keeps SRC's permission bits; its directories are created with mode
# 0755, /tmp 1777, which the guest's existing directories of the same name then get). DEST must not
# be /case.sh or /init and must not contain ':'.
# Keep case scripts quiet: every character on the guest's serial console is slow in the test host.
# Reproducible: the same SCRIPT and base give the same bytes.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case_script="" out="" base=""
adds=()
while [ $# -gt 0 ]; do
    case $1 in
        --case) case_script=${2:?--case needs a file}; shift 2 ;;
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --base) base=${2:?--base needs a file}; shift 2 ;;
        --add) adds+=("${2:?--add needs SRC:DEST}"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make-initrd.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$case_script" ] || [ -z "$out" ]; then
    echo "usage: make-initrd.sh --case SCRIPT --out FILE [--base INITRAMFS] [--add SRC:DEST]..." >&2; exit 2
fi
[ -f "$case_script" ] || { echo "make-initrd.sh: no such case script: $case_script" >&2; exit 2; }
for a in "${adds[@]}"; do
    src=${a%%:*} dest=${a#*:}
    case $a in *:*) ;; *) echo "make-initrd.sh: --add $a: expected SRC:DEST" >&2; exit 2 ;; esac
    [ -f "$src" ] || { echo "make-initrd.sh: --add $a: no such file: $src" >&2; exit 2; }
    case $dest in
        /case.sh|/init|*:*|*/../*|*/..|*/./*|*/) echo "make-initrd.sh: --add $a: bad destination $dest" >&2; exit 2 ;;
        /?*) ;;
        *) echo "make-initrd.sh: --add $a: the destination must be an absolute path" >&2; exit 2 ;;
    esac
done
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
if [ -z "$base" ]; then
    INITRAMFS=""
    eval "$("$GT_DIR/build-guest.sh" --quiet)"
    base=$INITRAMFS
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-case.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/root"
cp "$case_script" "$work/root/case.sh"
chmod 0755 "$work/root/case.sh"
for a in "${adds[@]}"; do
    src=${a%%:*} dest=${a#*:}
    mkdir -p "$work/root$(dirname "$dest")"
    cp "$src" "$work/root$dest"
    chmod "$(stat -c %a "$src")" "$work/root$dest"
done
# The archive's directory entries overwrite the modes of the base's directories of the same name.
[ ! -d "$work/root/tmp" ] || chmod 1777 "$work/root/tmp"
pack_cpio "$work/root" "$work/case.cpio.gz"
cat "$base" "$work/case.cpio.gz" > "$out.tmp"
mv "$out.tmp" "$out"
