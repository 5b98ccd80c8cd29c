#!/usr/bin/env bash
# make-initrd.sh --case SCRIPT --out FILE [--base INITRAMFS] [--add SRC:DEST]...
#
# Writes FILE = the test guest's initramfs (build-guest.sh's) with SCRIPT as /case.sh, made by
# swiftvmm-kit (`python3 -m swiftvmm_kit image`): its base archive followed by a second gzip'd cpio
# archive holding SCRIPT and the --add files (Linux unpacks concatenated archives in order, so the
# guest's /init finds /case.sh and runs it with `sh`, output to the console).
# --add SRC:DEST (repeatable) also puts the file SRC at the absolute path DEST (e.g. a static tool as
# /bin/NAME; it keeps SRC's permission bits). DEST must not be /case.sh or /init.
# --base is accepted for the callers that pass build-guest.sh's INITRAMFS: the kit makes that same base.
# Keep case scripts quiet: every character on the guest's serial console is slow in the test host.
# Reproducible: the same SCRIPT and files give the same bytes. FILE is complete or absent.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case_script="" out=""
files=()
while [ $# -gt 0 ]; do
    case $1 in
        --case) case_script=${2:?--case needs a file}; shift 2 ;;
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --base) shift 2 ;;
        --add) files+=(--file "${2:?--add needs SRC:DEST}"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make-initrd.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$case_script" ] || [ -z "$out" ]; then
    echo "usage: make-initrd.sh --case SCRIPT --out FILE [--base INITRAMFS] [--add SRC:DEST]..." >&2; exit 2
fi
[ -f "$case_script" ] || { echo "make-initrd.sh: no such case script: $case_script" >&2; exit 2; }
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
kit_image --script "$case_script" "${files[@]}" --out "$out" >/dev/null
