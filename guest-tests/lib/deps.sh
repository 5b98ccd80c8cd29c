# shellcheck shell=bash
# guest-tests/lib/deps.sh: source this file, then call `ensure_deps`.
#
# ensure_deps installs whatever is missing of what the guest tests, the nested test host and the
# benchmarks need: the Debian packages qemu-system-x86, qemu-system-data (qboot and the other
# firmware images), busybox-static, cpio, kmod, zstd, linux-image-amd64, acpica-tools, libtpms-dev,
# libssl-dev and swtpm (the TPM backends), libseccomp-dev, libfdt-dev and device-tree-compiler, and pytest and
# qemu.qmp for python3 (through pip). It runs `apt-get update` at most once, and makes no apt call at all when
# everything is present (the checks are file tests and one dpkg-query, a few milliseconds).
#
# Environment: SWIFTVMM_NO_INSTALL=1 only reports what is missing (exit status 1) instead of installing.
#              PYTHON: the interpreter that must have pytest (default: python3 on PATH).

# The packages, each with a cheap presence test (a file the package ships, or a dpkg status).
_deps_missing_packages() {
    local -a missing=()
    [ -x /usr/bin/qemu-system-x86_64 ] || missing+=(qemu-system-x86)
    [ -f /usr/share/qemu/qboot.rom ] || missing+=(qemu-system-data)
    # busybox-static and busybox both ship /bin/busybox; only the static one works in an initramfs.
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || missing+=(cpio)
    [ -x /usr/bin/kmod ] || [ -x /bin/kmod ] || missing+=(kmod)
    command -v zstd >/dev/null 2>&1 || missing+=(zstd)
    dpkg-query -W -f='${Status}' linux-image-amd64 2>/dev/null | grep -q 'ok installed' || missing+=(linux-image-amd64)
    command -v iasl >/dev/null 2>&1 || missing+=(acpica-tools)
    # The TPM: libtpms (linked statically into swiftvmm) with OpenSSL's libcrypto, and swtpm for the
    # external backend's tests.
    [ -f /usr/lib/x86_64-linux-gnu/libtpms.a ] || missing+=(libtpms-dev)
    [ -f /usr/lib/x86_64-linux-gnu/libcrypto.a ] || missing+=(libssl-dev)
    [ -x /usr/bin/swtpm ] || missing+=(swtpm)
    # Hardening: libseccomp and libfdt (both linked statically) and dtc, which reads the device tree back.
    [ -f /usr/lib/x86_64-linux-gnu/libseccomp.a ] || missing+=(libseccomp-dev)
    [ -f /usr/lib/x86_64-linux-gnu/libfdt.a ] || missing+=(libfdt-dev)
    [ -x /usr/bin/dtc ] || missing+=(device-tree-compiler)
    command -v python3 >/dev/null 2>&1 || [ -n "${PYTHON:-}" ] || missing+=(python3 python3-pip)
    if [ ${#missing[@]} -gt 0 ]; then printf '%s\n' "${missing[@]}"; fi
}

ensure_deps() {
    local -a missing
    mapfile -t missing < <(_deps_missing_packages)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "${SWIFTVMM_NO_INSTALL:-0}" = 1 ]; then
            echo "guest-tests: missing packages: ${missing[*]} (SWIFTVMM_NO_INSTALL=1: not installing)" >&2
            return 1
        fi
        echo "guest-tests: installing ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        if [ -z "${_DEPS_APT_UPDATED:-}" ]; then
            DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq || return 1
            _DEPS_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || return 1
    fi
    local python=${PYTHON:-python3}
    if ! "$python" -c 'import pytest' >/dev/null 2>&1; then
        if [ "${SWIFTVMM_NO_INSTALL:-0}" = 1 ]; then
            echo "guest-tests: pytest is missing for $python (SWIFTVMM_NO_INSTALL=1: not installing)" >&2
            return 1
        fi
        echo "guest-tests: installing pytest for $python" >&2
        # Debian's own python3 is "externally managed" (PEP 668): pip needs --break-system-packages there.
        "$python" -m pip install -q pytest >/dev/null 2>&1 ||
            "$python" -m pip install -q --break-system-packages pytest >/dev/null || return 1
    fi
    # The real QMP client library, for the control-socket tests.
    if ! "$python" -c 'import qemu.qmp' >/dev/null 2>&1; then
        if [ "${SWIFTVMM_NO_INSTALL:-0}" = 1 ]; then
            echo "guest-tests: qemu.qmp is missing for $python (SWIFTVMM_NO_INSTALL=1: not installing)" >&2
            return 1
        fi
        echo "guest-tests: installing qemu.qmp for $python" >&2
        "$python" -m pip install -q qemu.qmp >/dev/null 2>&1 ||
            "$python" -m pip install -q --break-system-packages qemu.qmp >/dev/null || return 1
    fi
}

# testhost_qemu DIR: prints the QEMU binary the test host runs on (call it holding DIR's lock).
# QEMU 7.2, bookworm's, livelocks the test host's kernel when it patches its own code (text_poke_bp's
# int3s) while the other vCPU runs it (README, "The test host"); the QEMU of bookworm-backports did
# not. So the test host runs on that one: qemu-system-x86 of version TESTHOST_QEMU_VERSION (the one
# tested), else the newest in bookworm-backports, fetched by apt (its signatures checked, with lists
# of its own: the system's apt sources and packages are left alone) and unpacked under DIR/qemu-VERSION
# (complete or absent). Its firmware files are the system's (qemu-system-data). When neither can be
# had, the system's QEMU, with a warning. SWIFTVMM_NO_INSTALL=1: only what is in the cache.
TESTHOST_QEMU_VERSION_TESTED='1:10.0.2+ds-2+deb13u1~bpo12+1'
testhost_qemu() {
    local dir=$1 want=${TESTHOST_QEMU_VERSION:-$TESTHOST_QEMU_VERSION_TESTED} version tmp bin
    local -a opts
    _qemu_bin() { echo "$dir/qemu-$(printf '%s' "$1" | tr -c 'A-Za-z0-9.+\n' '_')/usr/bin/qemu-system-x86_64"; }
    bin=$(_qemu_bin "$want")
    if [ -x "$bin" ]; then echo "$bin"; return 0; fi
    if [ "${SWIFTVMM_NO_INSTALL:-0}" != 1 ]; then
        rm -rf "$dir"/.qemu-fetch.*  # left by a fetch that was killed (the caller holds the lock)
        tmp=$(mktemp -d "$dir/.qemu-fetch.XXXXXX")
        mkdir -p "$tmp/lists/partial" "$tmp/unpacked"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' > "$tmp/sources.list"
        opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$tmp/lists" -o APT::Sandbox::User=root)
        if apt-get -qq "${opts[@]}" update >/dev/null 2>&1; then
            version=$want
            if ! (cd "$tmp" && apt-get -qq "${opts[@]}" download "qemu-system-x86=$version" >/dev/null 2>&1); then
                version=$(apt-cache "${opts[@]}" policy qemu-system-x86 2>/dev/null |
                          awk '/bpo/ && $1 ~ /^[0-9]/ {print $1; exit} /bpo/ && $1 == "***" {print $2; exit}')
                if [ -n "$version" ]; then
                    echo "testhost: QEMU $want is not in bookworm-backports; taking $version" >&2
                    bin=$(_qemu_bin "$version")
                    if [ -x "$bin" ]; then rm -rf "$tmp"; echo "$bin"; return 0; fi
                    (cd "$tmp" && apt-get -qq "${opts[@]}" download "qemu-system-x86=$version" >/dev/null 2>&1) ||
                        version=
                fi
            fi
            if [ -n "$version" ] && dpkg-deb -x "$tmp"/qemu-system-x86_*.deb "$tmp/unpacked" &&
               "$tmp/unpacked/usr/bin/qemu-system-x86_64" -version >/dev/null 2>&1; then
                echo "testhost: QEMU $version (bookworm-backports) unpacked for the test host" >&2
                bin=$(_qemu_bin "$version")
                rm -rf "${bin%/usr/bin/*}"
                mv "$tmp/unpacked" "${bin%/usr/bin/*}"
                rm -rf "$tmp"
                echo "$bin"
                return 0
            fi
        fi
        rm -rf "$tmp"
    fi
    echo "testhost: warning: no QEMU from bookworm-backports for the test host (wanted $want); running on the" \
         "system's, whose multi-threaded TCG locks the test host up more often (README, \"The test host\")" >&2
    echo qemu-system-x86_64
}
