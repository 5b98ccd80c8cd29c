#!/usr/bin/env bash
# Fuzz/run.sh [--seconds N] [TARGET...]
#
# Builds the libFuzzer targets (swift build --sanitize fuzzer --sanitize address, release) and runs
# each for N seconds (default 60) with a seed corpus from Fuzz/corpus/TARGET (when present) and a
# working corpus in ~/.cache/swiftvmm/fuzz/TARGET. Exit status 0 when no target found a crash;
# a crash leaves its input as crash-* in the working directory and is printed.
# Targets: every directory under Fuzz/Sources (default: all).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
seconds=60
targets=()
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) seconds=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
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
for t in "${targets[@]}"; do
    corpus=${SWIFTVMM_CACHE:-$HOME/.cache/swiftvmm}/fuzz/$t
    mkdir -p "$corpus"
    seeds=()
    [ -d "$here/corpus/$t" ] && seeds=("$here/corpus/$t")
    echo "fuzz: $t for ${seconds}s" >&2
    if ! (cd "$corpus" && "$bin/$t" -max_total_time="$seconds" -print_final_stats=1 "$corpus" "${seeds[@]}" 2> "$corpus/last.log"); then
        echo "fuzz: $t FOUND A CRASH; log tail:" >&2
        tail -n 40 "$corpus/last.log" >&2
        status=1
    else
        grep -E "stat::number_of_executed_units|stat::new_units_added" "$corpus/last.log" | sed "s/^/fuzz: $t: /" >&2
    fi
done
exit "$status"
