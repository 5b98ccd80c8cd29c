# shellcheck shell=bash
# guest-tests/lib/common.sh: helpers shared by the guest-test scripts and Benchmarks/. Source it.
#   GT_DIR, REPO_DIR       this guest-tests directory and the repository around it
#   CACHE_ROOT             ${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}
#   ensure_deps            (lib/deps.sh) installs missing Debian packages / pytest
#   kernel_version         the kernel ABI version that linux-image-amd64 pulls in, e.g. 6.1.0-56-amd64
#   module_closure KVER M… module files for modules M… and their dependencies, dependencies first
#   install_module SRC DST copies a module, decompressing .ko.xz/.ko.zst/.ko.gz to .ko
#   pack_cpio DIR OUT      reproducible gzip'd newc cpio of DIR
#   python_bin             the real python3 interpreter (not a pyenv shim)

# shellcheck disable=SC2034 # used by the scripts that source this file
GT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$GT_DIR/.." && pwd)
# shellcheck disable=SC2034
CACHE_ROOT=${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}
CACHE_DIR=$CACHE_ROOT # older name
# shellcheck source=guest-tests/lib/deps.sh
source "$GT_DIR/lib/deps.sh"

# The ABI version of the kernel that the linux-image-amd64 metapackage depends on; if that cannot
# be read, the newest /boot/vmlinuz-*-amd64. SWIFTVMM_KERNEL_VERSION overrides.
kernel_version() {
    if [ -n "${SWIFTVMM_KERNEL_VERSION:-}" ]; then echo "$SWIFTVMM_KERNEL_VERSION"; return; fi
    local v
    v=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null | grep -o 'linux-image-[^ ,(]*' | head -n1 | sed 's/^linux-image-//; s/-unsigned$//') || true
    if [ -n "$v" ] && [ -f "/boot/vmlinuz-$v" ]; then echo "$v"; return; fi
    v=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' -printf '%f\n' 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n1)
    [ -n "$v" ] || { echo "guest-tests: no /boot/vmlinuz-*-amd64 (install linux-image-amd64)" >&2; return 1; }
    echo "$v"
}

# module_closure KVER NAME...: prints absolute paths of the module files for NAME... (module names;
# '-' and '_' are interchangeable, as for modprobe) and all their dependencies, each dependency before
# the modules that need it, each file once. Fails if a module is unknown (built-in modules are not in
# modules.dep: check modules.builtin first if that matters).
module_closure() {
    local kver=$1; shift
    local moddir=/lib/modules/$kver
    [ -f "$moddir/modules.dep" ] || { echo "guest-tests: no $moddir/modules.dep" >&2; return 1; }
    awk -v want="$*" -v moddir="$moddir" '
        function norm(s) { sub(/.*\//, "", s); sub(/\.ko(\.[a-z]+)?$/, "", s); gsub(/-/, "_", s); return s }
        function visit(path,   n, parts, i) {
            if (path in seen) return
            seen[path] = 1
            n = split(deps[path], parts, " ")
            for (i = 1; i <= n; i++) visit(parts[i])
            print moddir "/" path
        }
        { p = $1; sub(/:$/, "", p); d = $0; sub(/^[^:]*:[ ]*/, "", d); deps[p] = d; byname[norm(p)] = p }
        END {
            n = split(want, names, " ")
            for (i = 1; i <= n; i++) {
                m = names[i]; gsub(/-/, "_", m)
                if (!(m in byname)) { print "guest-tests: no module " names[i] " in " moddir "/modules.dep" > "/dev/stderr"; bad = 1; continue }
                visit(byname[m])
            }
            exit bad
        }' "$moddir/modules.dep"
}

# install_module SRC DSTDIR: copies module SRC into DSTDIR as NAME.ko, decompressing if needed
# (busybox insmod cannot read compressed modules). Prints the destination file name.
install_module() {
    local src=$1 dstdir=$2 base
    base=$(basename "$src")
    mkdir -p "$dstdir"
    case $base in
        *.ko.xz) xz -dc "$src" > "$dstdir/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$src" > "$dstdir/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$src" > "$dstdir/${base%.gz}"; base=${base%.gz} ;;
        *) cp "$src" "$dstdir/$base" ;;
    esac
    chmod 0644 "$dstdir/$base"
    echo "$base"
}

# pack_cpio DIR OUT: a reproducible archive: every mtime set to SOURCE_DATE_EPOCH (default 0), owner
# root, names sorted, inode/device numbers renumbered (cpio --reproducible), gzip without name/time.
pack_cpio() {
    local dir=$1 out=$2 epoch=${SOURCE_DATE_EPOCH:-0}
    find "$dir" -exec touch -h -d "@$epoch" {} +
    (cd "$dir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) | gzip -n -9 > "$out.tmp"
    mv "$out.tmp" "$out"
}

# The python interpreter itself (pyenv's shims do not work where pyenv is not set up, e.g. in the
# test host's chroot): PYTHON if set, else python3's sys.executable.
python_bin() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    python3 -c 'import sys; print(sys.executable)'
}

# build_release: builds the release swiftvmm the way it ships (the Swift runtime linked statically:
# faster start-up, fewer pages touched) into <repo>/.build/release/swiftvmm; quiet when up to date.
build_release() {
    echo "guest-tests: swift build -c release --product swiftvmm --static-swift-stdlib -Xswiftc -static-executable" >&2
    (cd "$REPO_DIR" && swift build -c release --product swiftvmm --static-swift-stdlib -Xswiftc -static-executable >&2)
}

# bench_via VIA: where a benchmark runs: VIA, with auto resolved to direct where /dev/kvm is hardware
# virtualization and to testhost (the nested test host) elsewhere.
bench_via() {
    if [ "$1" != auto ]; then echo "$1"
    elif [ "$("$GT_DIR/kvm-probe.sh")" = hardware ]; then echo direct
    else echo testhost; fi
}

# bench_binary VIA PATH: the swiftvmm binary a benchmark runs, as an absolute path (PATH empty:
# none). In the test host, a copy of PATH in the cache (named by its content; copies and temporary
# files older than an hour are removed), so that it runs from the test host's read-only root share as
# QEMU does, whose pages stay in its page cache: the repository is a read-write share that keeps no
# pages across opens (cache=mmap), where every start of the 40 MiB binary reads it over 9p again
# (~400 ms there; QEMU starts in ~300).
bench_binary() {
    local via=$1 src=$2
    [ -n "$src" ] || return 0
    src=$(cd "$(dirname "$src")" && pwd -P)/$(basename "$src")
    if [ "$via" != testhost ]; then echo "$src"; return; fi
    local dir="$CACHE_ROOT/bench-bin" dst
    dst="$dir/swiftvmm-$(sha256sum "$src" | cut -c1-16)"
    if [ ! -x "$dst" ]; then
        mkdir -p "$dir"
        find "$dir" -maxdepth 1 \( -name 'swiftvmm-*' -o -name '.copy.*' \) -mmin +60 -delete 2>/dev/null || true
        local tmp
        tmp=$(mktemp "$dir/.copy.XXXXXX")
        if ! { cp "$src" "$tmp" && chmod 755 "$tmp" && mv -f "$tmp" "$dst"; }; then
            rm -f "$tmp"
            echo "bench: cannot copy $src to $dir" >&2
            return 1
        fi
    fi
    echo "$dst"
}

# kit_pytest_args: the pytest arguments that load swiftvmm-kit's plugin (python/swiftvmm_kit) from
# this checkout: nothing when the kit is pip-installed (its pytest11 entry point loads it), else -p.
# Callers put <repo>/python on PYTHONPATH.
kit_pytest_args() {
    if "$(python_bin)" -c 'import sys; from importlib.metadata import entry_points as e; sys.exit(0 if any(p.name == "swiftvmm" for p in e(group="pytest11")) else 1)' 2>/dev/null; then
        return 0
    fi
    echo "-p swiftvmm_kit.pytest_plugin"
}

# The kernel modules every test guest holds (loaded by a case script with `modload NAME`, not at boot).
# guest-tests/e2e/guestrun.py's GUEST_MODULES is the same list.
GUEST_MODULES=(qemu_fw_cfg button virtio_mmio virtio_blk virtio_net virtio_rng virtio_console)

# kit_image [ARGS...]: `python3 -m swiftvmm_kit image` (python/swiftvmm_kit) with GUEST_MODULES and ARGS;
# prints VMLINUZ=, INITRAMFS= and KERNEL_VERSION= lines.
kit_image() {
    local -a mods=()
    local m
    for m in "${GUEST_MODULES[@]}"; do mods+=(--module "$m"); done
    PYTHONPATH=$REPO_DIR/python${PYTHONPATH:+:$PYTHONPATH} "$(python_bin)" -m swiftvmm_kit image "${mods[@]}" "$@"
}

