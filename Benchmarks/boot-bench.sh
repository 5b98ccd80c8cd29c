#!/usr/bin/env bash
# boot-bench.sh [--runs N]: boot time of swiftvmm against QEMU -M microvm (the peer), same kernel,
# initramfs, memory and vCPU count, in ONE test-host session (or directly on hardware KVM).
# Measures process start → "swiftvmm-guest: init reached" in the console output (polled every
# 100 ms), and for swiftvmm its own RSS (VmRSS minus the resident part of the guest-memory mapping).
# Prints min/median per VMM and the ratio swiftvmm/QEMU.
set -euo pipefail
runs=3
[ "${1:-}" = --runs ] && runs=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../guest-tests/lib/common.sh"
ensure_deps
(cd "$REPO_DIR" && swift build -c release --product swiftvmm 2>&1 | grep -E "error|omplete" >&2 || true)
vmm=$REPO_DIR/.build/release/swiftvmm
read -r kernel initrd < <("$GT_DIR/build-guest.sh")
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet"
inner=$(mktemp /var/tmp/swiftvmm-bench.XXXXXX)
trap 'rm -f "$inner"' EXIT
cat > "$inner" <<INNER
#!/bin/sh
# Runs inside the test host. Prints "RESULT vmm run ms_to_init ms_total rss_kib".
measure() { # measure NAME CMD...
    name=\$1; shift
    out=/tmp/bench.out; rm -f \$out
    start=\$(date +%s%N)
    "\$@" > \$out 2>&1 < /dev/null &
    pid=\$!
    init=""; rss=""
    while kill -0 \$pid 2>/dev/null; do
        if [ -z "\$init" ] && grep -q "swiftvmm-guest: init reached" \$out 2>/dev/null; then
            init=\$(( (\$(date +%s%N) - start) / 1000000 ))
            if [ "\$name" = swiftvmm ]; then
                total=\$(awk '/^VmRSS:/{print \$2}' /proc/\$pid/status)
                guest=\$(awk '/^Size:/{s=\$2} /^Rss:/{if (s == 262144) print \$2}' /proc/\$pid/smaps | head -n1)
                rss=\$(( total - \${guest:-0} ))
            fi
        fi
        sleep 0.1
    done
    wait \$pid; status=\$?
    end=\$(( (\$(date +%s%N) - start) / 1000000 ))
    echo "RESULT \$name \${init:-none} \$end \${rss:--} \$status"
}
i=0
while [ \$i -lt $runs ]; do
    measure swiftvmm timeout 300 $vmm run --kernel $kernel --initrd $initrd --cmdline "$cmdline" --memory 256M
    measure qemu timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256M -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel $kernel -initrd $initrd -append "console=ttyS0 reboot=t panic=-1 quiet"
    i=\$((i + 1))
done
INNER
chmod +x "$inner"
if "$vmm" host-info | grep -q '^hardware'; then sh "$inner"; else "$GT_DIR/testhost.sh" --timeout 1200 -- sh "$inner"; fi | tee /dev/stderr | awk '
/^RESULT/ { n[$2]++; t[$2, n[$2]] = $3; total[$2, n[$2]] = $4; if ($5 != "-") rss[$2] = rss[$2] " " $5 }
function sort_list(name, arr,   i, j, k, tmp, m) { m = n[name]; for (i = 1; i <= m; i++) tmp[i] = arr[name, i]
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (tmp[j] + 0 < tmp[i] + 0) { k = tmp[i]; tmp[i] = tmp[j]; tmp[j] = k }
    for (i = 1; i <= m; i++) sorted[i] = tmp[i] }
END {
    for (v in n) { sort_list(v, t); mn[v] = sorted[1]; md[v] = sorted[int((n[v] + 1) / 2)]
        printf "%-9s to /init: min %6d ms  median %6d ms  (%d runs)\n", v, mn[v], md[v], n[v] }
    if (md["qemu"] > 0) printf "ratio swiftvmm/qemu-microvm (median to /init): %.2f\n", md["swiftvmm"] / md["qemu"]
    printf "swiftvmm own RSS at /init (KiB, excluding guest RAM):%s\n", rss["swiftvmm"]
}'
