#!/usr/bin/env bash
# Fuzz/run.sh [--seconds N] [--max-len BYTES] [--ledger] [TARGET...]
# Fuzz/run.sh --totals
#
# Builds the libFuzzer targets (swift build --sanitize fuzzer --sanitize address, release) and runs
# each for N seconds (default 60) with a seed corpus from Fuzz/corpus/TARGET (when present) and a
# working corpus in ~/.cache/swiftvmm/fuzz/TARGET. Exit status 0 when no target found a crash;
# a crash leaves its input as crash-* in the working directory and is printed.
# Targets: every directory under Fuzz/Sources (default: all).
# --max-len  the largest input libFuzzer makes (default: 4096, or the target's largest committed
#            seed when that is longer; longer working-corpus files are read cut to it).
#            Without a cap, libFuzzer takes the largest file in the working corpus as its limit, and
#            the operation-list targets grew inputs of 40-116 KB that ran at 60-400 per second.
# --ledger   also append each run to ~/.cache/swiftvmm/fuzz/ledger.tsv (UTC time, target, seconds it
#            ran, executions, new units, crashed 0/1, the commit of the sources fuzzed, "+changes"
#            when they differ from it). --totals prints the ledger's sums per target (the executions
#            each target has survived, and whether any run crashed), for the README's table.
# SIGINT to a fuzzer (or Ctrl-C) ends its run early: what it executed is recorded, marked
# "+interrupted", no crash is counted, and no later target runs (exit status 130).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
seconds=60 ledger=0 maxlen=
targets=()
cache=${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}/fuzz
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) seconds=${2:?}; shift 2 ;;
        --max-len) maxlen=${2:?}; shift 2 ;;
        --ledger) ledger=1; shift ;;
        --totals)
            [ -s "$cache/ledger.tsv" ] || { echo "fuzz: no ledger yet ($cache/ledger.tsv)" >&2; exit 1; }
            awk -F'\t' '{ e[$2] += $4; s[$2] += $3; r[$2]++; c[$2] += $6 }
                END { for (t in e) printf "%s\t%d executions\t%d runs\t%d s\t%d crashes\n", t, e[t], r[t], s[t], c[t] }' \
                "$cache/ledger.tsv" | sort
            exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case $seconds in ''|*[!0-9]*|0) echo "fuzz: --seconds needs a positive whole number" >&2; exit 2 ;; esac
[ -z "$maxlen" ] || case $maxlen in *[!0-9]*|0*) echo "fuzz: --max-len needs a positive whole number" >&2; exit 2 ;; esac
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(ls "$here/Sources")
mkdir -p "$here/.deps"
ln -sfn "$(cd "$here/.." && pwd)" "$here/.deps/swiftvmm"
echo "fuzz: building ${targets[*]} with libFuzzer + AddressSanitizer" >&2
# swiftc keeps only the last of several -sanitize= flags, and SwiftPM passes `--sanitize fuzzer
# --sanitize address` as two: the Swift code got AddressSanitizer but no coverage counters (the
# fuzzer ran blind). The combined flag, after them, gives it both; C targets keep SwiftPM's flags.
build=(swift build -c release --sanitize fuzzer --sanitize address -Xswiftc -sanitize=fuzzer,address)
(cd "$here" && "${build[@]}" >&2)
bin=$(cd "$here" && "${build[@]}" --show-bin-path)
status=0
commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$here/.." status --porcelain -- Sources Fuzz/Sources 2>/dev/null)" ] || commit="$commit+changes"
for t in "${targets[@]}"; do
    corpus=$cache/$t
    mkdir -p "$corpus"
    seeds=() len=${maxlen:-4096}
    if [ -d "$here/corpus/$t" ]; then
        seeds=("$here/corpus/$t")
        if [ -z "$maxlen" ]; then
            largest=$(find "$here/corpus/$t" -type f -printf '%s\n' | sort -n | tail -n 1)
            [ "${largest:-0}" -le "$len" ] || len=$largest
        fi
    fi
    echo "fuzz: $t for ${seconds}s, inputs up to $len bytes" >&2
    crashed=0 interrupted=0 t0=$SECONDS
    # This run's own log (another run of the same target may share the corpus directory), kept as
    # last.log when it is done.
    runlog=$corpus/.run.$$.log
    rc=0
    (cd "$corpus" && "$bin/$t" -max_total_time="$seconds" -max_len="$len" -print_final_stats=1 "$corpus" "${seeds[@]}" 2> "$runlog") || rc=$?
    if [ "$rc" = 72 ] && grep -aq "libFuzzer: run interrupted; exiting" "$runlog"; then
        # SIGINT (Ctrl-C, or kill -INT to the fuzzer): libFuzzer prints its statistics and exits
        # with 72. The run counts for what it executed; the targets after it do not run.
        echo "fuzz: $t interrupted after $((SECONDS - t0))s" >&2
        status=130 interrupted=1
    elif [ "$rc" != 0 ]; then
        echo "fuzz: $t FOUND A CRASH; log tail:" >&2
        tail -n 40 "$runlog" >&2
        status=1 crashed=1
    else
        grep -aE "stat::number_of_executed_units|stat::new_units_added" "$runlog" | sed "s/^/fuzz: $t: /" >&2
    fi
    mv -f "$runlog" "$corpus/last.log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$corpus/last.log" | tail -n 1)
    # A crash without final statistics still enters the ledger.
    if [ -z "$execs" ] && [ "$crashed" = 1 ]; then execs=0; fi
    if [ "$ledger" = 1 ] && [ -n "$execs" ]; then
        added=$(sed -n 's/^stat::new_units_added: *//p' "$corpus/last.log" | tail -n 1)
        # One line per run, appended in one write (several campaigns may share the ledger).
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$t" "$((SECONDS - t0))" "$execs" \
            "${added:-0}" "$crashed" "$commit$([ "$interrupted" = 0 ] || echo +interrupted)" >> "$cache/ledger.tsv"
    fi
    [ "$interrupted" = 0 ] || break
done
exit "$status"
