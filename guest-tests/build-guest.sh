#!/usr/bin/env bash
# build-guest.sh [--quiet]
#
# The small test guest, made by swiftvmm-kit (python/swiftvmm_kit/image.py; `python3 -m swiftvmm_kit
# image`), cached by content under ${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}/kit:
#   the kernel         the stock Debian kernel of the host (/boot/vmlinuz-*), not copied
#   the initramfs      busybox-static plus an /init that mounts proc, sys and devtmpfs, prints
#                      "swiftvmm-guest: init reached" as its first line, runs /case.sh if present
#                      (output to the console), prints "swiftvmm-guest: case exit=N" and
#                      "swiftvmm-guest: powering off", then `poweroff -f` when the guest has ACPI
#                      (/sys/firmware/acpi/tables/FACP), else `reboot -f` (with reboot=k on the kernel
#                      command line that is an i8042 reset, which swiftvmm treats as power-off).
#                      Kernel modules for case scripts, with their dependencies, decompressed, are in
#                      /lib/modules/<ver>/ (GUEST_MODULES below); `/bin/modload NAME...` insmods
#                      modules and their dependencies.
# Reproducible (mtimes 0, owner root, gzip without a name or time): the same inputs give the same bytes.
#
# Prints, on stdout, shell-quoted assignments (eval-able; one per line):
#   VMLINUZ=...  INITRAMFS=...  KERNEL_VERSION=...
# --quiet is accepted for the callers (the kit prints nothing but these lines; errors go to stderr).
set -euo pipefail
while [ $# -gt 0 ]; do
    case $1 in
        --quiet|--force) shift ;;  # --force: the cache is keyed by everything that goes in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-guest.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_deps
kit_image
