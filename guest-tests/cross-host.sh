#!/usr/bin/env bash
# cross-host.sh: the snapshot tests that concern moving between hosts, run again on another KVM and
# another CPU: inside the nested test host (kvm_amd on QEMU's emulated EPYC), once without and once
# with protection keys (PKU). The committed fixtures were written on the development machines' kvm_pvm;
# here they must restore (the baseline one) or be refused naming a feature (the host-model one), and
# a snapshot claiming PKRU state must restore or be refused as the host's PKU support says.
# Needs the test build (`swift test` builds it). Exit status: 0 when both sessions pass.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=guest-tests/lib/common.sh
source guest-tests/lib/common.sh
filter='SnapshotFixtureTests|ForeignXSAVERestoreTests|HostFitTests|fixtureRestores'
log=$(mktemp "${TMPDIR:-/tmp}/cross-host.XXXXXX")
trap 'rm -f "$log"' EXIT
for cpu in EPYC EPYC,+pku; do
    want=no; [[ $cpu == *+pku ]] && want=yes
    # A session whose test host itself locked up (testhost.sh ends it at once when the L1 kernel's
    # watchdogs fire, README "The test host") runs once more, never twice, as the e2e
    # suite does; any other failure counts.
    for attempt in 1 2; do
        echo "cross-host: test host with -cpu $cpu" >&2
        st=0
        TESTHOST_CPU=$cpu guest-tests/testhost.sh --timeout 900 -- bash -c "
            have=no; grep -q -w pku /proc/cpuinfo && have=yes
            if [ \$have != $want ]; then echo 'cross-host: the test host with -cpu $cpu has PKU: '\$have', expected $want' >&2; exit 1; fi
            swift test --skip-build --filter '$filter' 2>&1 | grep -E '✘|Test run'
            exit \${PIPESTATUS[0]}" 2> >(tee "$log" >&2) || st=$?
        wait  # the tee
        [ $st = 0 ] && break
        if [ $attempt = 1 ] && [ $st = 125 ] && grep -q 'its kernel locked up (' "$log"; then
            echo "cross-host: the test host's kernel locked up (status $st): running the -cpu $cpu session once more" >&2
            continue
        fi
        exit $st
    done
done
