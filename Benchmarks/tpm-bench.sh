#!/usr/bin/env bash
# tpm-bench.sh [--runs N] [--vmms builtin,swtpm,qemu] [--timeout SECONDS] [--via auto|direct|testhost]
#              [--getrandom COUNT] [--createprimary COUNT] [--nvwrite COUNT]
#
# TPM command throughput seen by a Linux guest, swiftvmm against QEMU, in ONE test-host session (or
# directly when /dev/kvm is hardware virtualization; --via overrides). The same stock Debian kernel +
# busybox test initramfs + guest-tests/tools/tpm2cmd (as /bin/tpm2cmd), 256 MiB, 1 vCPU, command
# line "console=ttyS0 reboot=k panic=-1 pci=off quiet", boots N times (default 1) under each of:
#   builtin  swiftvmm run --kernel K --initrd I --cmdline C --memory 256M --tpm builtin,state=/run/.../tpm-state
#   swtpm    the same with --tpm swtpm,socket=/run/.../swtpm.sock
#   qemu     qemu-system-x86_64 -M q35 -enable-kvm -cpu host -m 256M -smp 1 -nodefaults -no-user-config
#            -nographic -no-reboot -serial stdio -kernel K -initrd I -append C (without pci=off: q35's ACPI
#            tables reach PCI config space, and the kernel would print an error per PCI link)
#            -chardev socket,id=chrtpm,path=/run/.../swtpm.sock -tpmdev emulator,id=tpm0,chardev=chrtpm
#            -device tpm-tis,tpmdev=tpm0
# (guest-tests/e2e/tpm_driver.py runs each boot: a fresh TPM state per boot, under the test host's /run
# for both sides; `swtpm socket --tpm2 --ctrl type=unixio,... --tpmstate dir=...` started for it.)
# In each boot the guest runs, after one warm-up GetRandom:
#   tpm2cmd bench getrandom 200 32     200 TPM2_GetRandom of 32 bytes
#   tpm2cmd bench createprimary 20     20 TPM2_CreatePrimary (RSA 2048 storage key) + FlushContext,
#                                      20 different keys (unique = 1..20)
#   tpm2cmd bench nvwrite 200 64       200 TPM2_NV_Write of 64 bytes (different data each time) to an
#                                      index it defines; the index is read back and must hold the last
#                                      data written (verify=ok; a figure without it is not counted),
#                                      then undefined. The builtin backend writes (pwrite + fsync) its
#                                      state file before a command that changed NV is answered
#                                      (Sources/Backends/LibtpmsEngine.swift): the figure includes that.
# and prints the elapsed milliseconds (CLOCK_MONOTONIC in the guest). CreatePrimary is mostly the
# TPM's search for RSA primes, whose length depends on the owner seed and the key: every run has a
# fresh TPM (a new seed), and the 20 different keys average that out (natively with swtpm: 20 times
# the same key took 320-1220 ms over 6 fresh states, 20 different keys 620-780 ms). Use --runs 3 or
# more for figures to quote. Prints min/median per VMM and
# the ratios swiftvmm/QEMU of the medians (targets: builtin <= 0.5, swtpm <= 1.0; for nvwrite too). A VMM whose runs all
# failed gets no ratio: its failure (exit status, driver log, last console lines) is printed instead,
# and the exit status is 1. Compare ratios, not absolute times: the test host is emulated.
# Builds the release swiftvmm first unless SWIFTVMM is set or only qemu is measured (--vmms qemu).
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
runs=1 vmms=builtin,swtpm,qemu per_run_timeout=600 via=auto n_random=200 n_primary=20 n_nvwrite=200
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?}; shift 2 ;;
        --vmms) vmms=${2:?}; shift 2 ;;
        --timeout) per_run_timeout=${2:?}; shift 2 ;;
        --via) via=${2:?}; shift 2 ;;
        --getrandom) n_random=${2:?}; shift 2 ;;
        --createprimary) n_primary=${2:?}; shift 2 ;;
        --nvwrite) n_nvwrite=${2:?}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "tpm-bench.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$runs" "$per_run_timeout" "$n_random" "$n_primary" "$n_nvwrite"; do
    case $v in ''|*[!0-9]*|0) echo "tpm-bench.sh: --runs/--timeout/--getrandom/--createprimary/--nvwrite need positive numbers" >&2; exit 2 ;; esac
done
IFS=, read -r -a vmm_list <<< "$vmms"
for v in "${vmm_list[@]}"; do
    case $v in builtin|swtpm|qemu) ;; *) echo "tpm-bench.sh: --vmms: unknown $v (builtin, swtpm, qemu)" >&2; exit 2 ;; esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest-tests/lib/common.sh
source "$here/../guest-tests/lib/common.sh"
ensure_deps
via=$(bench_via "$via")
command -v swtpm >/dev/null || { echo "tpm-bench: swtpm is not installed (apt-get install swtpm)" >&2; exit 1; }

vmm=""
case ,$vmms, in
    *,builtin,*|*,swtpm,*)
        [ -n "${SWIFTVMM:-}" ] || build_release || { echo "tpm-bench: building swiftvmm failed" >&2; exit 1; }
        vmm=${SWIFTVMM:-$REPO_DIR/.build/release/swiftvmm}
        [ -x "$vmm" ] || { echo "tpm-bench: no swiftvmm binary at $vmm" >&2; exit 1; }
        vmm=$(bench_binary "$via" "$vmm") ;;
esac

VMLINUZ="" INITRAMFS=""
eval "$("$GT_DIR/build-guest.sh" --quiet)"
tool=$("$GT_DIR/tools/build-tools.sh" tpm2cmd)
work=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-tpm-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat > "$work/case.sh" <<CASE
tpm2cmd getrandom 8 > /dev/null || echo "bench: warm-up failed: \$(tpm2cmd getrandom 8 2>&1)"
echo "bench: \$(tpm2cmd bench getrandom $n_random 32 2>&1)"
echo "bench: \$(tpm2cmd bench createprimary $n_primary 2>&1)"
echo "bench: \$(tpm2cmd bench nvwrite $n_nvwrite 64 2>&1)"
CASE
"$GT_DIR/make-initrd.sh" --case "$work/case.sh" --base "$INITRAMFS" --out "$work/initrd" --add "$tool:/bin/tpm2cmd"
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet"

inner=$work/bench-inner.sh
{
    echo '#!/bin/bash'
    echo '# generated by Benchmarks/tpm-bench.sh; runs where the VMMs run'
    printf 'work=%q kernel=%q initrd=%q cmdline=%q vmm=%q python=%q driver=%q limit=%q runs=%q\n' \
        "$work" "$VMLINUZ" "$work/initrd" "$cmdline" "$vmm" "$(python_bin)" "$GT_DIR/e2e/tpm_driver.py" \
        "$per_run_timeout" "$runs"
    printf 'vmm_list=(%s)\n' "${vmm_list[*]}"
    cat <<'INNER'
# one NAME RUN: a boot under NAME through tpm_driver.py; prints
# "RESULT name run status getrandom_ms createprimary_ms nvwrite_ms" ("-" where the guest printed no figure;
# nvwrite counts only with verify=ok: the last write read back).
one() {
    local name=$1 run=$2 art=$work/art/$1.$2 backend kind st g c w
    local -a cmd
    mkdir -p "$art"
    case $name in
        qemu) kind=qemu backend=swtpm
              cmd=(qemu-system-x86_64 -M q35 -enable-kvm -cpu host -m 256M -smp 1 -nodefaults -no-user-config
                   -nographic -no-reboot -serial stdio -kernel "$kernel" -initrd "$initrd" -append "${cmdline/ pci=off/}") ;;
        *) kind=swiftvmm backend=$name
           cmd=("$vmm" run --kernel "$kernel" --initrd "$initrd" --cmdline "$cmdline" --memory 256M) ;;
    esac
    E2E_ARTIFACTS=$art E2E_VMM=$kind timeout --kill-after=10 $((limit + 60)) \
        "$python" "$driver" --backend "$backend" --boots 1 --boot-timeout "$limit" -- "${cmd[@]}" \
        > "$art/driver.log" 2>&1 < /dev/null
    st=$?
    g=$(sed -n 's/^bench: bench getrandom rc=0x000 .* ms=\([0-9.]*\).*/\1/p' "$art/boot1.out" 2>/dev/null | head -n 1)
    c=$(sed -n 's/^bench: bench createprimary rc=0x000 .* ms=\([0-9.]*\).*/\1/p' "$art/boot1.out" 2>/dev/null | head -n 1)
    w=$(sed -n 's/^bench: bench nvwrite rc=0x000 .* ms=\([0-9.]*\) .*verify=ok.*/\1/p' "$art/boot1.out" 2>/dev/null | head -n 1)
    echo "RESULT $name $run $st ${g:--} ${c:--} ${w:--}"
    echo "bench: $name run $run: driver exit $st, getrandom ${g:--} ms, createprimary ${c:--} ms, nvwrite ${w:--} ms" >&2
    [ -n "$w" ] || sed -n 's/^bench: \(bench nvwrite .*\)/bench: '"$name run $run"': \1/p' "$art/boot1.out" 2>/dev/null | head -n 1 >&2
    # swiftvmm's own account of the TPM backend's share (commands run, time inside the backend).
    b=$(sed -n 's/.*\(TPM: [0-9]* commands.*backend time\).*/\1/p' "$art/boot1.err" 2>/dev/null | head -n 1)
    [ -z "$b" ] || echo "bench: $name run $run: $b" >&2
}
for ((i = 1; i <= runs; i++)); do
    for v in "${vmm_list[@]}"; do one "$v" "$i"; done
done > "$work/results.txt"
INNER
} > "$inner"

case $via in
    direct) where="directly on this machine's KVM" ;;
    testhost) where="in one test-host session (QEMU TCG -cpu EPYC + kvm_amd)" ;;
    *) echo "tpm-bench.sh: --via must be auto, direct or testhost" >&2; exit 2 ;;
esac
echo "tpm-bench: $runs run(s) each of $vmms; guest: bench getrandom $n_random 32, bench createprimary $n_primary, bench nvwrite $n_nvwrite 64; $where" >&2
status=0
if [ "$via" = direct ]; then
    bash "$inner" || status=$?
else
    "$GT_DIR/testhost.sh" --timeout $(( runs * ${#vmm_list[@]} * (per_run_timeout + 90) + 240 )) --rw "$work" \
        -- bash "$inner" || status=$?
fi
[ -s "$work/results.txt" ] || { echo "tpm-bench: no results (test-host/driver status $status)" >&2; exit 1; }

echo "# raw: vmm run driver_exit getrandom_ms createprimary_ms nvwrite_ms (guest-measured, $n_random x GetRandom(32) / $n_primary x CreatePrimary(RSA 2048)+FlushContext / $n_nvwrite x NV_Write(64))"
sed 's/^RESULT /# /' "$work/results.txt"
# Why a VMM's runs failed: the driver's log and the guest's last console lines.
failed=0
for v in "${vmm_list[@]}"; do
    if ! awk -v v="$v" '$1 == "RESULT" && $2 == v && $4 == 0 && $5 != "-" && $6 != "-" && $7 != "-" { ok = 1 } END { exit !ok }' "$work/results.txt"; then
        failed=1
        echo "tpm-bench: $v FAILED: no run gave all three figures; last run's driver log and console:" >&2
        last=$(awk -v v="$v" '$1 == "RESULT" && $2 == v { r = $3 } END { print r }' "$work/results.txt")
        art=$work/art/$v.${last:-1}
        sed 's/^/  driver| /' "$art/driver.log" 2>/dev/null | tail -n 12 >&2 || true
        [ ! -s "$art/boot1.err" ] || sed 's/^/  stderr| /' "$art/boot1.err" | tail -n 8 >&2
        [ ! -f "$art/boot1.out" ] || tr -d '\r' < "$art/boot1.out" | sed 's/^/  console| /' | tail -n 12 >&2
    fi
done
awk -v runs="$runs" -v order="$vmms" '
function median(list,   n, a, i, j, t) {
    n = split(list, a, " "); if (n == 0) return "-"
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function minimum(list,   n, a, i, m) {
    n = split(list, a, " "); if (n == 0) return "-"
    m = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 < m + 0) m = a[i]
    return m
}
$1 == "RESULT" {
    v = $2; count[v]++
    if ($4 == 0 && $5 != "-" && $6 != "-" && $7 != "-") { ok[v]++; g[v] = g[v] " " $5; c[v] = c[v] " " $6; w[v] = w[v] " " $7 }
}
END {
    n = split(order, names, ",")
    printf "%-8s %6s %26s %26s %26s\n", "VMM", "ok", "getrandom min/median ms", "createprimary min/median ms", "nvwrite min/median ms"
    for (i = 1; i <= n; i++) {
        v = names[i]
        printf "%-8s %3d/%-2d %12s/%-13s %12s/%-13s %12s/%-13s\n", v, ok[v], count[v], minimum(g[v]), median(g[v]), minimum(c[v]), median(c[v]), minimum(w[v]), median(w[v])
    }
    target["builtin"] = 0.5; target["swtpm"] = 1.0
    for (i = 1; i <= n; i++) {
        v = names[i]
        if (v == "qemu") continue
        if (ok[v] + 0 == 0) { printf "ratio swiftvmm %s/qemu: none (swiftvmm --tpm %s failed, see above)\n", v, v; continue }
        if (ok["qemu"] + 0 == 0) { printf "ratio swiftvmm %s/qemu: none (QEMU failed or was not measured)\n", v; continue }
        a = median(g[v]); b = median(g["qemu"])
        printf "ratio swiftvmm %s/qemu, median getrandom: %.2f (target <= %.1f)\n", v, a / b, target[v]
        a = median(c[v]); b = median(c["qemu"])
        printf "ratio swiftvmm %s/qemu, median createprimary: %.2f (target <= %.1f)\n", v, a / b, target[v]
        a = median(w[v]); b = median(w["qemu"])
        printf "ratio swiftvmm %s/qemu, median nvwrite: %.2f (target <= %.1f)\n", v, a / b, target[v]
    }
}' "$work/results.txt"
if [ "$failed" = 1 ] || [ "$status" != 0 ]; then exit 1; fi
