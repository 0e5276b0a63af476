#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 60), one after the other,
# with libFuzzer through cargo-fuzz. Needs `cargo install cargo-fuzz`; on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags. New inputs go to fuzz/corpus/<target>/
# (ignored by git except seed-*); a crash is saved in fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECONDS_PER_TARGET:-60}
export RUSTC_BOOTSTRAP=1
# The product code forbids unsafe code, so AddressSanitizer has little to find; without it the
# runs are about twice as fast. Debug assertions (-a) turn integer overflow into a finding.
flags=(-O -a --sanitizer none)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build "${flags[@]}"
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s"
    cargo fuzz run "${flags[@]}" "$t" -- -max_total_time="$secs" -rss_limit_mb=1024 -max_len=65536 \
        -timeout=10 -print_final_stats=1 2>&1 | grep -E "^(stat::|==|INFO: Done|SUMMARY|Test unit)|panicked|Crash|leak|timeout" || true
    if ls "artifacts/$t"/* >/dev/null 2>&1; then
        echo "== $t: finding in artifacts/$t"; exit 1
    fi
done
