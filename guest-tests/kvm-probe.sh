#!/usr/bin/env bash
# kvm-probe.sh [-v]
#
# Prints what /dev/kvm is on this machine, one word, and exits 0 in every case:
#   hardware  /dev/kvm is usable (a read-write character device) and backed by real hardware
#             virtualization: vmx or svm in /proc/cpuinfo and no kvm_pvm module loaded
#   pvm       /dev/kvm is kvm_pvm (paravirtual nested KVM: works, but guest code is emulated and a
#             Linux guest is far too slow; use guest-tests/testhost.sh)
#   none      /dev/kvm is missing or not usable (no permission, no vmx/svm)
# -v also prints the reason on stderr.
set -euo pipefail
verbose=0
case ${1:-} in
    -v|--verbose) verbose=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "kvm-probe.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac
result() { echo "$1"; [ "$verbose" = 0 ] || echo "kvm-probe: $2" >&2; exit 0; }

[ -c /dev/kvm ] || result none "no /dev/kvm"
{ [ -r /dev/kvm ] && [ -w /dev/kvm ]; } || result none "/dev/kvm is not readable and writable for $(id -un 2>/dev/null || id -u)"
[ -d /sys/module/kvm_pvm ] && result pvm "kvm_pvm is loaded: /dev/kvm is paravirtual nested KVM"
if grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null; then
    result hardware "$(grep -owE 'vmx|svm' /proc/cpuinfo | head -n1) in /proc/cpuinfo and no kvm_pvm"
fi
result none "/dev/kvm exists but /proc/cpuinfo has neither vmx nor svm"
