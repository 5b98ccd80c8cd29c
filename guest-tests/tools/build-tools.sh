#!/usr/bin/env bash
# tools/build-tools.sh [--force] NAME...
#
# Builds the static guest tools guest-tests/tools/NAME.c (`gcc -static -O2`) into
# ${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}/tools/NAME and prints each binary's absolute path on
# stdout, one per line, in the order asked. Cached like the other guest assets: a tool is rebuilt only
# when its source, this script or the compiler/libc change (--force: always). Put a tool into a
# guest's initrd with `make-initrd.sh --add PATH:/bin/NAME` (or GuestRun(tools=("NAME",)) in the
# e2e tests). Needs gcc and the static glibc (libc6-dev), both in Debian's build-essential.
set -euo pipefail
force=0
names=()
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-tools.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) names+=("$1"); shift ;;
    esac
done
[ ${#names[@]} -gt 0 ] || { echo "usage: build-tools.sh [--force] NAME..." >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}/tools
mkdir -p "$out"
cc=${CC:-gcc}
command -v "$cc" >/dev/null || { echo "build-tools.sh: no $cc (install gcc and libc6-dev)" >&2; exit 1; }
toolchain=$("$cc" --version | head -n 1; dpkg-query -W -f='${Version}' libc6-dev 2>/dev/null || true)
exec 9> "$out/.lock"
flock 9
for name in "${names[@]}"; do
    case $name in *[!A-Za-z0-9_-]*|'') echo "build-tools.sh: bad tool name $name" >&2; exit 2 ;; esac
    src=$here/$name.c
    [ -f "$src" ] || { echo "build-tools.sh: no $src" >&2; exit 1; }
    key=$( { cat "$src" "${BASH_SOURCE[0]}"; echo "$toolchain"; } | sha256sum | cut -c1-32)
    if [ "$force" = 1 ] || [ ! -x "$out/$name" ] || [ "$(cat "$out/$name.key" 2>/dev/null)" != "$key" ]; then
        echo "build-tools: $cc -static -O2 $name.c" >&2
        "$cc" -static -O2 -Wall -Wextra -o "$out/$name.tmp" "$src"
        mv "$out/$name.tmp" "$out/$name"
        echo "$key" > "$out/$name.key"
    fi
    echo "$out/$name"
done
