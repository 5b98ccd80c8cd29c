#!/usr/bin/env bash
# testhost-selftest.sh: checks that testhost.sh ends a session whose test host's kernel stalls, panics or
# goes silent, at once and with its diagnostics, instead of letting it run into its timeout (a CI run
# lost an hour that way). Three sessions, about two minutes together:
#  1. the command writes a hung-task report into the test host's kernel log (/dev/kmsg): the session
#     must end with status 125, "its kernel locked up (INFO: task ...)", and the diagnostics (the
#     test host's processes, with the command's `sleep` among them);
#  2. the command stops the test host's /init watchdog (SIGSTOP), so its heartbeat stops, as when
#     the kernel hangs outright: with TESTHOST_SILENCE=45 the session must end with status 125 and
#     "console silent for 45 s", well before its timeout, and say where its vCPUs were (tools/l1-state.py:
#     QEMU's vCPU threads and registers, the instruction pointers named in the test host's kernel);
#  3. the command crashes the test host's kernel (sysrq c): status 125, "its kernel panicked (...)".
# Exit status 0 when all hold; each check prints PASS or FAIL.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fails=0
check() {  # check MESSAGE COMMAND...: PASS when COMMAND succeeds
    local msg=$1; shift
    if "$@"; then echo "PASS $msg"; else echo "FAIL $msg"; fails=$((fails + 1)); fi
}
has() { grep -qF -- "$2" <<< "$1"; }

out=$("$here/testhost.sh" --no-stream --timeout 300 -- sh -c \
    'echo "<3>INFO: task selftest:1 blocked for more than 120 seconds." > /dev/kmsg; sleep 280' 2>&1) && st=0 || st=$?
check "a reported hung task ends the session with status 125 (got $st)" [ "$st" = 125 ]
check "the message names the kernel's report" \
    has "$out" "its kernel locked up (INFO: task selftest:1 blocked for more than 120 seconds.)"
check "the test host's diagnostics are printed" \
    has "$out" "==== diagnostics: the kernel reported a hung task or an RCU stall"
check "the diagnostics list the command's sleeping process" grep -qE "testhost-l1: pid [0-9]+ ppid [0-9]+ S sleep: " <<< "$out"
[ "$fails" = 0 ] || printf '%s\n' "$out" | tail -n 60 >&2

start=$SECONDS
out=$(TESTHOST_SILENCE=45 "$here/testhost.sh" --no-stream --timeout 400 -- sh -c '
    for d in /proc/[0-9]*; do
        read -r stat < "$d/stat" 2>/dev/null || continue
        rest=${stat##*) }; ppid=${rest#* }; ppid=${ppid%% *}
        case $stat in *"(init) "*) [ "$ppid" = 1 ] && kill -STOP "${d#/proc/}" ;; esac
    done
    sleep 380' 2>&1) && st=0 || st=$?
took=$((SECONDS - start))
check "a silent test host ends the session with status 125 (got $st)" [ "$st" = 125 ]
check "the message says the console went silent" has "$out" "its kernel locked up (its console silent for 45 s, no heartbeat)"
check "it ended long before its 400 s timeout (after $took s)" [ "$took" -lt 300 ]
check "the report says where the test host's vCPUs were" has "$out" "its vCPUs before it was ended"
# Its vCPUs idle in its kernel (the command sleeps, /init is stopped): each named from the kernel's symbols.
check "an idle vCPU's instruction pointer is named in the test host's kernel" \
    grep -qE "testhost:    vCPU [0-9]+: RIP=ffffffff[0-9a-f]+ CPL=0 HLT=[01] CR3=[0-9a-f]+ [A-Za-z0-9_.]+\+0x[0-9a-f]+" <<< "$out"
[ "$fails" = 0 ] || printf '%s\n' "$out" | tail -n 60 >&2

before=$fails
out=$("$here/testhost.sh" --no-stream --timeout 300 -- sh -c 'echo c > /proc/sysrq-trigger; sleep 280' 2>&1) && st=0 || st=$?
check "a panicking test host ends the session with status 125 (got $st)" [ "$st" = 125 ]
check "the message names the panic" has "$out" "its kernel panicked (sysrq triggered crash)"
[ "$fails" = "$before" ] || printf '%s\n' "$out" | tail -n 60 >&2
[ "$fails" = 0 ]
