#!/usr/bin/env bash
# Runs every fuzz target (or those named) with libFuzzer through cargo-fuzz: SECONDS_PER_TARGET
# seconds each (default 60), or until RUNS executions when RUNS is set (then no time limit),
# JOBS targets at a time (default 2, one per core of the CI box). Needs cargo-fuzz
# (`cargo install --locked cargo-fuzz`); on a stable toolchain RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# pass its -Z flags. All targets are built once, then the binaries run directly. New inputs go
# to fuzz/corpus/<target>/ (ignored by git except seed-*); a crash is saved in
# fuzz/artifacts/<target>/, its path is printed, and the run fails. Each target's full libFuzzer
# output is kept in fuzz/logs/<target>.log; the last line per target is its stats as
# "== <target>: runs=N exec_per_sec=N new_units=N peak_rss_mb=N".
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECONDS_PER_TARGET:-60}
runs=${RUNS:-}
jobs=${JOBS:-2}
export RUSTC_BOOTSTRAP=1
# The product code forbids unsafe code, so AddressSanitizer has little to find; without it the
# runs are about twice as fast. Debug assertions (-a) turn integer overflow into a finding.
flags=(-O -a --sanitizer none)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build "${flags[@]}"
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="target/$triple/release"
mkdir -p logs

limit=(-max_total_time="$secs")
if [ -n "$runs" ]; then
    limit=(-runs="$runs")
fi

# One target: its binary over its corpus; prints a summary line, returns 1 on a finding.
run_one() {
    local t=$1 log="logs/$1.log"
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: start ($(date -u +%H:%M:%S))"
    local rc=0
    "$bin_dir/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" "${limit[@]}" -rss_limit_mb=1024 \
        -max_len=65536 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    field() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
    echo "== $t: runs=$(field number_of_executed_units) exec_per_sec=$(field average_exec_per_sec)" \
        "new_units=$(field new_units_added) peak_rss_mb=$(field peak_rss_mb)"
    if ls "artifacts/$t"/* >/dev/null 2>&1; then
        grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written|artifact_prefix" "$log" | head -n 20 || true
        echo "== $t: FINDING: $(ls "artifacts/$t"/* | tr '\n' ' ')(full output in fuzz/$log)"
        return 1
    fi
    # A run that ends badly without leaving an input behind (killed, a missing binary, a bad
    # flag) fails too: libFuzzer exits 0 when its time or run count is up.
    if [ "$rc" -ne 0 ]; then
        tail -n 20 "$log"
        echo "== $t: FINDING: the fuzzer exited with $rc and saved no input (full output in fuzz/$log)"
        return 1
    fi
}

failed=0
running=0
for t in "${targets[@]}"; do
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
    run_one "$t" &
    running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
if [ "$failed" -ne 0 ]; then
    echo "== fuzzing failed: see the FINDING lines above" >&2
    exit 1
fi
echo "== fuzzing: no finding in ${#targets[@]} targets"
