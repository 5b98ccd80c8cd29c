#!/usr/bin/env bash
# e2e.sh: end-to-end tests with real Linux guests under swiftvmm. All guest runs share ONE test-host
# session (each session costs ~10 s to start); each case's output and status are then checked here.
# Runs directly instead when /dev/kvm has hardware virtualization. Prints "N passed, N failed".
set -uo pipefail
source "$(dirname "$0")/lib/common.sh"
ensure_deps
set -e
(cd "$REPO_DIR" && swift build --product swiftvmm 2>&1 | grep -E "error|omplete" >&2 || true)
vmm=${SWIFTVMM:-$REPO_DIR/.build/debug/swiftvmm}
read -r kernel base_initrd < <("$GT_DIR/build-guest.sh")
kver=$(kernel_version)
work=$(mktemp -d /var/tmp/swiftvmm-e2e.XXXXXX)
trap 'rm -rf "$work"' EXIT
set +e

# Each case: NAME, swiftvmm extra arguments, and a case script (run by the guest's /init).
cases=(boot)
boot_args="--memory 256M --cpus 1"
boot_cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet swiftvmm.e2e=boot"
cat > "$work/boot.case" <<'CASE'
echo "uname=$(uname -r)"
echo "cmdline=$(cat /proc/cmdline)"
echo "memtotal=$(sed -n 's/MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "ttyS0=$(cat /sys/class/tty/ttyS0/type 2>/dev/null)"
CASE

# The script that runs in the test host: every case, one after another.
{
    echo 'out=${OUT:-'"$work"'}; mkdir -p "$out"; cd "$out"' 
    for c in "${cases[@]}"; do
        "$GT_DIR/make-initrd.sh" --case "$work/$c.case" --out "$work/$c.initrd"
        args_var="${c}_args" cmd_var="${c}_cmdline"
        printf 'start=$(date +%%s%%N); timeout 300 %q run --kernel %q --initrd %q --cmdline %q %s > %q 2>&1 < /dev/null; echo $? > %q; echo $(( ($(date +%%s%%N) - start) / 1000000 )) > %q\n' \
            "$vmm" "$kernel" "$work/$c.initrd" "${!cmd_var}" "${!args_var}" "$c.out" "$c.status" "$c.ms"
    done
} > "$work/all.sh"

if "$vmm" host-info | grep -q '^hardware'; then
    sh "$work/all.sh"
else
    # The test host sees this machine's files read-only: results go to its /tmp and come back
    # through its output, one "==> NAME" header per file.
    "$GT_DIR/testhost.sh" --timeout 900 -- sh -c "OUT=/tmp/e2e sh $work/all.sh; cd /tmp/e2e && for f in *; do echo \"==> \$f\"; cat \"\$f\"; done" > "$work/host.log" 2> "$work/host.err" || cat "$work/host.err" >&2
    awk -v dir="$work" '/^==> /{f=dir"/"$2; next} f{print > f}' "$work/host.log"
fi

passed=0 failed=0
check() { # check NAME DESCRIPTION CONDITION...
    local name=$1 what=$2; shift 2
    if "$@"; then passed=$((passed + 1)); echo "ok     $name: $what"
    else failed=$((failed + 1)); echo "FAILED $name: $what"; echo "--- last lines of $name's output:"; tail -n 30 "$work/$name.out" 2>/dev/null || tail -n 40 "$work/host.log"; fi
}
has() { grep -qF -- "$2" "$work/$1.out" 2>/dev/null; }
in_order() { # markers appear in this order
    local f=$work/$1.out; shift; local line=0 n
    for m in "$@"; do n=$(grep -nF -- "$m" "$f" 2>/dev/null | head -n1 | cut -d: -f1); [ -n "$n" ] && [ "$n" -gt "$line" ] || return 1; line=$n; done
}
status_is() { [ "$(cat "$work/$1.status" 2>/dev/null)" = "$2" ]; }

check boot "swiftvmm exits 0 after the guest powers off" status_is boot 0
check boot "init reached, case ran, power-off requested, in that order" \
    in_order boot "swiftvmm-guest: init reached" "swiftvmm-guest: case exit=0" "swiftvmm-guest: powering off"
check boot "the guest runs the stock kernel $kver" has boot "uname=$kver"
check boot "the guest got our command line" has boot "cmdline=console=ttyS0 reboot=k panic=-1 pci=off quiet swiftvmm.e2e=boot"
check boot "the guest sees about 256 MiB of RAM" sh -c "v=\$(sed -n 's/^memtotal=//p' '$work/boot.out'); [ -n \"\$v\" ] && [ \"\$v\" -gt 200000 ] && [ \"\$v\" -le 262144 ]"
check boot "ttyS0 is a 16550A" has boot "ttyS0=4"
check boot "no kernel panic or oops" sh -c "[ -s '$work/boot.out' ] && ! grep -qE 'Kernel panic|Oops|BUG:' '$work/boot.out'"
echo "boot: $(cat "$work/boot.ms" 2>/dev/null || echo '?') ms from swiftvmm start to exit (in the test host)"
echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
