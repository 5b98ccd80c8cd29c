#!/usr/bin/env bash
# firmware/build.sh [--force] [--quiet]
#
# Builds SwiftVMM's guest firmware: firmware/build/swiftvmm-fw.bin, a flat 64 KiB image for
# guest-physical 0xFFFF0000-0xFFFFFFFF whose last 16 bytes are the reset vector.
#
# Toolchain: Debian's gcc (-m32 -ffreestanding, no 32-bit libc or libgcc needed) and binutils
# (GNU as via gcc, ld -m elf_i386, objcopy). Missing packages are installed with apt-get when run
# as root. Idempotent: nothing is rebuilt while the sources, this script and the tool versions are
# unchanged (a content hash is kept in build/.stamp). Prints the image path on stdout.
# --force rebuilds anyway; --quiet prints nothing on stderr.
set -euo pipefail
force=0 quiet=0
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1; shift ;;
        --quiet) quiet=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
log() { [ "$quiet" = 1 ] || echo "firmware: $*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$here/src
out=$here/build
bin=$out/swiftvmm-fw.bin

# Tools (Debian package names in brackets).
need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
for t in ld objcopy; do command -v "$t" >/dev/null 2>&1 || need+=(binutils); done
if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
            { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
    else
        echo "build.sh: missing tools; install the Debian packages: ${need[*]}" >&2
        exit 1
    fi
fi

mkdir -p "$out"
exec 9> "$out/.lock"
flock 9

sources=("$src/entry.S" "$src/main.c" "$src/layout.h" "$src/fw.ld")
key=$( {
    cat "${BASH_SOURCE[0]}" "${sources[@]}"
    gcc --version | head -n 1
    ld --version | head -n 1
} | sha256sum | cut -c1-32)
if [ "$force" = 0 ] && [ -f "$bin" ] && [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$key" ]; then
    log "up to date: $bin"
    echo "$bin"
    exit 0
fi

CFLAGS=(-m32 -march=i686 -mtune=generic -Os -std=gnu11 -ffreestanding -fno-pic -fno-pie -nostdlib
    -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables -fno-common
    -mgeneral-regs-only -mno-red-zone -ffunction-sections -fdata-sections -fno-strict-aliasing
    -Wall -Wextra -Werror -I "$src")
tmp=$(mktemp -d "$out/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
gcc "${CFLAGS[@]}" -c "$src/entry.S" -o "$tmp/entry.o"
gcc "${CFLAGS[@]}" -c "$src/main.c" -o "$tmp/main.o"
gcc -E -P -x c -undef -I "$src" "$src/fw.ld" -o "$tmp/fw.lds"
ld -m elf_i386 -nostdlib --gc-sections --build-id=none -z noexecstack -T "$tmp/fw.lds" \
    -Map "$tmp/swiftvmm-fw.map" -o "$tmp/swiftvmm-fw.elf" "$tmp/entry.o" "$tmp/main.o"
objcopy -O binary -j .text16 -j .text -j .resetvector "$tmp/swiftvmm-fw.elf" "$tmp/swiftvmm-fw.bin"

size=$(stat -c %s "$tmp/swiftvmm-fw.bin")
[ "$size" = 65536 ] || { echo "build.sh: image is $size bytes, not 65536" >&2; exit 1; }
# The reset vector must start with cli (fa), cld (fc), jmp rel16 (e9).
rv=$(tail -c 16 "$tmp/swiftvmm-fw.bin" | od -An -tx1 -N3 | tr -d ' \n')
[ "$rv" = fafce9 ] || { echo "build.sh: unexpected reset vector bytes: $rv" >&2; exit 1; }
used=$(( $(nm "$tmp/swiftvmm-fw.elf" | awk '$3 == "_rom_used" { print "0x" $1 }') - 0xFFFF0000 ))

mv "$tmp/swiftvmm-fw.elf" "$out/swiftvmm-fw.elf"
mv "$tmp/swiftvmm-fw.map" "$out/swiftvmm-fw.map"
mv "$tmp/swiftvmm-fw.bin" "$bin"
echo "$key" > "$out/.stamp"
log "built $bin (65536 bytes, $used bytes of code and constants)"
echo "$bin"
