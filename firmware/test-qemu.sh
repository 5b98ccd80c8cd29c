#!/usr/bin/env bash
# firmware/test-qemu.sh [--machine pc|q35|pc-4g|pc-nodma]... [--timeout SECONDS] [--keep]
#
# Boots the Debian test guest (guest-tests/build-guest.sh) with QEMU (TCG) using the firmware as its
# BIOS (-bios firmware/build/swiftvmm-fw.bin: mapped at 0xFFFF0000 like SwiftVMM maps it; QEMU offers
# the same fw_cfg items and the etc/e820, etc/table-loader and etc/acpi/* files). QEMU then knows
# nothing about Linux's boot protocol: only the firmware loads and enters the kernel.
#
# Machines (default: all four, ~10-40 s each under TCG):
#   pc     -M pc, 256 MiB, -device vmgenid   (the shape closest to SwiftVMM: i440FX, no PCIe)
#   q35    -M q35, 256 MiB, -device vmgenid
#   pc-4g  -M pc, 4 GiB (RAM above 4 GiB; the initrd must stay below initrd_addr_max = 2 GiB - 1
#          while the ACPI tables go to the top of the RAM below 4 GiB)
#   pc-nodma -M pc, 256 MiB, fw_cfg without DMA: the data-port fallback (rep insb) for every read;
#          no vmgenid (QEMU refuses it without DMA, and WRITE_POINTER needs DMA)
#
# A case script in the initramfs reports what the guest saw; the checks print PASS/FAIL lines:
#   firmware line ("swiftvmm-fw: tables loaded, booting Linux after N us|TSC cycles") first, no
#   firmware error lines; /init reached (so the initrd was loaded); /proc/cmdline carries a marker;
#   /sys/firmware/acpi/tables has FACP, APIC, DSDT (QEMU's tables, placed and patched by the
#   firmware's table-loader); no ACPI checksum or BIOS errors in dmesg; the RSDP is in the FSEG and
#   the RSDT/XSDT in an e820-reserved range; with vmgenid: QEMUVGID:00 present (_STA 15, which needs
#   ADD_POINTER) and bound to the vmgenid driver, etc/vmgenid_addr (read back through qemu_fw_cfg
#   sysfs) = VGIA + 40 (WRITE_POINTER), and the GUID QEMU then wrote is at that address; the guest
#   powered off through ACPI. Exit status 0 only if every check passed. --keep keeps the logs.
set -euo pipefail
machines=() timeout_s=300 keep=0
while [ $# -gt 0 ]; do
    case $1 in
        --machine) machines+=("${2:?--machine needs pc, q35, pc-4g or pc-nodma}"); shift 2 ;;
        --timeout) timeout_s=${2:?--timeout needs seconds}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "test-qemu.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#machines[@]} -gt 0 ] || machines=(pc q35 pc-4g pc-nodma)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
command -v qemu-system-x86_64 >/dev/null || { echo "test-qemu.sh: qemu-system-x86_64 is not installed" >&2; exit 1; }
fw=$("$here/build.sh" --quiet)
VMLINUZ="" INITRAMFS=""
eval "$("$repo/guest-tests/build-guest.sh" --quiet)"

work=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-fwtest.XXXXXX")
if [ "$keep" = 1 ]; then echo "logs in $work"; else trap 'rm -rf "$work"' EXIT; fi

cat > "$work/case.sh" <<'CASE'
#!/bin/sh
# Reports what the guest sees, one "case: " line per fact (parsed by firmware/test-qemu.sh).
echo "case: cmdline=$(cat /proc/cmdline)"
echo "case: acpi-tables=$(ls /sys/firmware/acpi/tables 2>/dev/null | tr '\n' ' ')"
d=/sys/bus/acpi/devices/QEMUVGID:00
if [ -e "$d" ]; then
    echo "case: vmgenid-status=$(cat "$d/status" 2>/dev/null)"
    [ -e "$d/driver" ] && echo "case: vmgenid-driver=$(basename "$(readlink "$d/driver")")"
fi
# VGIA: QEMU's SSDT has Name (VGIA, DWordConst) = 08 'VGIA' 0C <le32>, patched by ADD_POINTER.
for t in /sys/firmware/acpi/tables/SSDT*; do
    [ -f "$t" ] || continue
    hex=" $(od -An -v -tx1 "$t" | tr '\n' ' ' | tr -s ' ')"
    rest=${hex#* 56 47 49 41 0c }
    if [ "$rest" != "$hex" ]; then
        set -- $rest
        echo "case: vgia=0x$4$3$2$1"
    fi
done
# etc/vmgenid_addr as QEMU holds it (written by the firmware's WRITE_POINTER), and what is there.
if [ -e "$d" ]; then
    modload qemu_fw_cfg >/dev/null 2>&1
    f=/sys/firmware/qemu_fw_cfg/by_name/etc/vmgenid_addr/raw
    if [ -e "$f" ]; then
        set -- $(od -An -v -tx1 "$f")
        addr=0x$8$7$6$5$4$3$2$1
        echo "case: vmgenid-addr=$addr"
        # devmem maps /dev/mem uncached, which conflicts with the vmgenid driver's write-back mapping
        # (EAGAIN): unbind the driver first (its binding was reported above).
        echo QEMUVGID:00 > /sys/bus/acpi/drivers/vmgenid/unbind 2>/dev/null
        if [ "$addr" != 0x0000000000000000 ]; then
            g=""
            for o in 0 4 8 12; do g="$g $(devmem $((addr + o)) 32 2>&1)"; done
            echo "case: guid-dwords=$g"
        fi
    fi
fi
dmesg | grep -E 'BIOS-e820|ACPI: (RSDP|RSDT|XSDT) |RAMDISK:|tsc: Detected|Incorrect checksum|ACPI BIOS Error|ACPI Error|vmgenid' |
    sed 's/^\[[^]]*\] */case: dmesg: /'
echo "case: done"
CASE
"$repo/guest-tests/make-initrd.sh" --case "$work/case.sh" --base "$INITRAMFS" --out "$work/initrd.img"

guid=c0ffee00-1234-5678-9abc-def012345678
# The GUID as QEMU stores it in guest memory: little-endian field order (time_low, time_mid, time_hi).
guid_le=00eeffc0341278569abcdef012345678
guid_dwords=$(for o in 0 8 16 24; do b=${guid_le:o:8}; printf '0x%s ' "${b:6:2}${b:4:2}${b:2:2}${b:0:2}"; done)
guid_dwords=${guid_dwords% }
failures=0
pass() { echo "PASS [$m] $*"; }
fail() { echo "FAIL [$m] $*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
in_range_of_type() { # in_range_of_type ADDR TYPE: ADDR lies in an e820 range of TYPE (from dmesg)
    local addr=$(($1)) type=$2 line s e
    while read -r line; do
        [[ $line =~ \[mem\ (0x[0-9a-f]+)-(0x[0-9a-f]+)\]\ (.*)$ ]] || continue
        s=${BASH_REMATCH[1]} e=${BASH_REMATCH[2]}
        if [ "${BASH_REMATCH[3]}" = "$type" ] && [ "$addr" -ge $((s)) ] && [ "$addr" -le $((e)) ]; then return 0; fi
    done < <(grep 'BIOS-e820:' "$out")
    return 1
}

for m in "${machines[@]}"; do
    case $m in
        pc) qargs=(-M pc -m 256M -device "vmgenid,guid=$guid"); vmgenid=1 ;;
        q35) qargs=(-M q35 -m 256M -device "vmgenid,guid=$guid"); vmgenid=1 ;;
        pc-4g) qargs=(-M pc -m 4G); vmgenid=0 ;;
        pc-nodma) qargs=(-M pc -m 256M -global fw_cfg_io.dma_enabled=off); vmgenid=0 ;;
        *) echo "test-qemu.sh: unknown machine $m" >&2; exit 2 ;;
    esac
    marker=swiftvmm.fwtest=$RANDOM$RANDOM
    out=$work/$m.log
    start=$(date +%s.%N)
    status=0
    timeout "$timeout_s" qemu-system-x86_64 "${qargs[@]}" -accel tcg -smp 1 \
        -bios "$fw" -kernel "$VMLINUZ" -initrd "$work/initrd.img" \
        -append "console=ttyS0 panic=-1 quiet $marker" \
        -vga none -nodefaults -display none -serial stdio -monitor none -no-reboot \
        </dev/null >"$out.raw" 2>"$work/$m.qemu-stderr" || status=$?
    elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    tr -d '\r' < "$out.raw" > "$out"
    echo "---- [$m] qemu exit status $status after ${elapsed}s"

    fwline=$(grep -m1 '^swiftvmm-fw: ' "$out" || true)
    check "firmware line: ${fwline:-<none>}" \
        grep -qE '^swiftvmm-fw: tables loaded, booting Linux after [0-9]+ (us|TSC cycles)$' <<<"$fwline"
    check "firmware line is the first console output" \
        test "$(head -n 1 "$out")" = "$fwline"
    errs=$(grep '^swiftvmm-fw: ' "$out" | grep -v 'tables loaded, booting Linux' || true)
    check "no firmware error lines${errs:+: $errs}" test -z "$errs"
    check "kernel reached the initramfs /init (initrd loaded): swiftvmm-guest: init reached" \
        grep -q '^swiftvmm-guest: init reached' "$out"
    check "case script from the initrd ran to its end" grep -q '^case: done' "$out"
    cmdline=$(sed -n 's/^case: cmdline=//p' "$out")
    check "/proc/cmdline carries the command line: $cmdline" grep -qF -- "$marker" <<<"$cmdline"
    tables=$(sed -n 's/^case: acpi-tables=//p' "$out")
    for t in FACP APIC DSDT; do
        check "/sys/firmware/acpi/tables has $t (tables: $tables)" grep -qw "$t" <<<"$tables"
    done
    bad=$(grep -E '^case: dmesg: .*(Incorrect checksum|ACPI BIOS Error|ACPI Error)' "$out" || true)
    check "no ACPI checksum/BIOS errors in dmesg${bad:+: $bad}" test -z "$bad"
    rsdp=$(sed -nE 's/^case: dmesg: ACPI: RSDP (0x[0-9A-Fa-f]+) .*/\1/p' "$out" | head -n 1)
    check "RSDP ${rsdp:-<none>} is in the FSEG (0xE0000-0xFFFFF), e820-reserved" \
        eval '[ -n "$rsdp" ] && [ $((rsdp)) -ge $((0xE0000)) ] && [ $((rsdp)) -le $((0xFFFFF)) ] && in_range_of_type "$rsdp" reserved'
    sdt=$(sed -nE 's/^case: dmesg: ACPI: (RSDT|XSDT) (0x[0-9A-Fa-f]+) .*/\2/p' "$out" | head -n 1)
    check "RSDT/XSDT ${sdt:-<none>} lies in an e820-reserved range (the firmware's HIGH block)" \
        eval '[ -n "$sdt" ] && in_range_of_type "$sdt" reserved'
    if [ "$m" = pc-4g ]; then
        rd=$(sed -nE 's/^case: dmesg: RAMDISK: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\].*/\1 \2/p' "$out")
        check "initrd ${rd:-<none>} ends below initrd_addr_max (2 GiB) although RAM reaches 4 GiB" \
            eval '[ -n "$rd" ] && [ $((${rd#* })) -lt $((0x80000000)) ] && [ $((${rd#* })) -ge $((0x70000000)) ]'
    fi
    if [ "$vmgenid" = 1 ]; then
        check "vmgenid ACPI device QEMUVGID:00 present, _STA 15 (VGIA patched by ADD_POINTER)" \
            grep -qx 'case: vmgenid-status=15' "$out"
        check "QEMUVGID:00 bound to the vmgenid driver" grep -qx 'case: vmgenid-driver=vmgenid' "$out"
        vgia=$(sed -n 's/^case: vgia=//p' "$out")
        vaddr=$(sed -n 's/^case: vmgenid-addr=//p' "$out")
        check "etc/vmgenid_addr = ${vaddr:-<none>} = VGIA ${vgia:-<none>} + 40 (WRITE_POINTER reached QEMU)" \
            eval '[ -n "$vgia" ] && [ -n "$vaddr" ] && [ $((vaddr)) -eq $((vgia + 40)) ] && [ $((vgia)) -ne 0 ]'
        got=$(sed -n 's/^case: guid-dwords= *//p' "$out")
        check "QEMU wrote the GUID there (${got:-<none>}, expected $guid_dwords)" test "${got,,}" = "$guid_dwords"
        vgerr=$(grep -E '^case: dmesg: .*vmgenid' "$out" || true)
        check "no vmgenid messages in dmesg${vgerr:+: $vgerr}" test -z "$vgerr"
    fi
    check "guest powered off through ACPI (reboot: Power down), qemu exit 0" \
        eval '[ "$status" = 0 ] && grep -q "reboot: Power down" "$out"'

    cycles=$(sed -nE 's/^swiftvmm-fw: .* after ([0-9]+) TSC cycles$/\1/p' <<<"$fwline")
    mhz=$(sed -nE 's/^case: dmesg: tsc: Detected ([0-9.]+) MHz.*/\1/p' "$out" | head -n 1)
    if [ -n "$cycles" ] && [ -n "$mhz" ]; then
        echo "INFO [$m] firmware time: $cycles TSC cycles = $(awk -v c="$cycles" -v f="$mhz" 'BEGIN { printf "%.0f", c / f }') us at the guest's TSC rate of $mhz MHz (QEMU TCG)"
    elif [ -n "$fwline" ]; then
        echo "INFO [$m] firmware time: ${fwline#*after }"
    fi
done

if [ "$failures" = 0 ]; then echo "test-qemu.sh: all checks passed"; else echo "test-qemu.sh: $failures check(s) failed"; fi
[ "$failures" = 0 ]
