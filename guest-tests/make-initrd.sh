#!/usr/bin/env bash
# make-initrd.sh --case SCRIPT --out FILE: the base test initramfs with SCRIPT appended as /case.sh
# (Linux unpacks concatenated cpio archives in order).
set -euo pipefail
case_script= out=
while [ $# -gt 0 ]; do
    case $1 in
        --case) case_script=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,3p' "$0"; exit 0 ;;
        *) echo "make-initrd.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$case_script" ] && [ -n "$out" ] || { echo "usage: make-initrd.sh --case SCRIPT --out FILE" >&2; exit 2; }
source "$(dirname "$0")/lib/common.sh"
read -r _ base < <("$GT_DIR/build-guest.sh")
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
cp "$case_script" "$dir/case.sh"; chmod +x "$dir/case.sh"; touch -d @0 "$dir/case.sh" "$dir"
pack_cpio "$dir" "$dir.cpio.gz"
cat "$base" "$dir.cpio.gz" > "$out"
rm -f "$dir.cpio.gz"
