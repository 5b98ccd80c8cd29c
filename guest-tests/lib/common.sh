# Shared helpers for the guest-test scripts.
GT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$GT_DIR/.." && pwd)
CACHE_DIR=${SWIFTVMM_GUEST_CACHE:-$HOME/.cache/swiftvmm}

# Installs the Debian packages the guest tests need, only when something is missing.
ensure_deps() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86 qemu-system-data)
    [ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || missing+=(busybox-static)
    command -v cpio >/dev/null || missing+=(cpio)
    ls /boot/vmlinuz-*-amd64 >/dev/null 2>&1 || missing+=(linux-image-amd64)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "guest-tests: installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

kernel_version() { ls /boot/vmlinuz-*-amd64 | sort -V | tail -n1 | sed 's|/boot/vmlinuz-||'; }

# Prints the module files needed for the named modules, dependencies first.
module_closure() {
    local kver=$1; shift
    local moddir=/lib/modules/$kver dep
    for m in "$@"; do
        local line
        line=$(grep -E "(^|/)${m}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1) || { echo "no module $m" >&2; return 1; }
        local self=${line%%:*} deps=${line#*:}
        local rev=()
        for dep in $deps; do rev=("$dep" "${rev[@]}"); done
        for dep in "${rev[@]}"; do echo "$moddir/$dep"; done
        echo "$moddir/$self"
    done | awk '!seen[$0]++'
}

# Packs directory $1 into a gzip'd newc cpio at $2, reproducibly.
pack_cpio() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null --reproducible -o -H newc --quiet) | gzip -n -9 > "$2"
}
