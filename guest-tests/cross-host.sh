#!/usr/bin/env bash
# cross-host.sh: the snapshot tests that concern moving between hosts, run again on another KVM and
# another CPU: inside the nested test host (kvm_amd on QEMU's emulated EPYC), once without and once
# with protection keys (PKU). The committed fixtures were written on the development machines' kvm_pvm;
# here they must restore (the baseline one) or be refused naming a feature (the host-model one), and
# a snapshot claiming PKRU state must restore or be refused as the host's PKU support says.
# Needs the test build (`swift test` builds it); runs its test bundle directly. Exit status: 0 when both sessions pass.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=guest-tests/lib/common.sh
source guest-tests/lib/common.sh
filter='SnapshotFixtureTests|ForeignXSAVERestoreTests|HostFitTests|fixtureRestores'
# The test bundle `swift test` runs, run directly in the test host: SwiftPM there would first compile
# the package manifests under the emulated CPU (minutes in a fresh clone, whose manifest cache was
# filled with another environment), which is where CI's first session spent its time.
bundle=$(swift build --show-bin-path)/SwiftVMMPackageTests.xctest
[ -x "$bundle" ] || { echo "cross-host: no test build at $bundle (run swift build --build-tests)" >&2; exit 1; }
log=$(mktemp "${TMPDIR:-/tmp}/cross-host.XXXXXX")
trap 'rm -f "$log"' EXIT
for cpu in EPYC EPYC,+pku; do
    want=no; [[ $cpu == *+pku ]] && want=yes
    # A session whose test host's kernel itself locked up or panicked (testhost.sh ends it at once
    # when the L1 kernel's watchdogs fire, README "The test host") runs again, at most twice, as
    # the e2e suite does; any other failure counts.
    for attempt in 1 2 3; do
        echo "cross-host: test host with -cpu $cpu" >&2
        st=0
        TESTHOST_CPU=$cpu guest-tests/testhost.sh --timeout 300 -- bash -c "
            have=no; grep -q -w pku /proc/cpuinfo && have=yes
            if [ \$have != $want ]; then echo 'cross-host: the test host with -cpu $cpu has PKU: '\$have', expected $want' >&2; exit 1; fi
            out=\$('$bundle' --testing-library swift-testing --filter '$filter' 2>&1); st=\$?
            grep -E '✘|Test run' <<< \"\$out\"
            # A filter that selects nothing would pass: it must select tests.
            grep -qE 'Test run with [1-9][0-9]* tests' <<< \"\$out\" || { echo 'cross-host: no test ran' >&2; exit 1; }
            exit \$st" 2> >(tee "$log" >&2) || st=$?
        wait  # the tee
        [ $st = 0 ] && break
        if [ $attempt -lt 3 ] && [ $st = 125 ] && grep -qE 'testhost: .*its kernel (locked up|panicked) \(' "$log"; then
            echo "cross-host: the test host's kernel failed (status $st): running the -cpu $cpu session again ($attempt of at most 2 reruns)" >&2
            continue
        fi
        exit $st
    done
done
