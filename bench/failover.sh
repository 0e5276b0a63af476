#!/usr/bin/env bash
# bench/failover.sh: failover drills. Each drill starts a real primary + standby(s) (testkit), puts
# dbproxy (in-process, default health settings) in front, runs writers through it, then kill -9s
# the primary and measures detection, promotion, time from the kill to the first acknowledged
# write (p50 and max), acknowledged writes lost (async and sync replication) and the errors
# clients saw. Prints a markdown table and writes it to bench/results/failover.md, with every
# drill's raw numbers in bench/results/failover.json. The drill itself is the Rust example
# dbproxy/examples/failover_drill.rs.
# `bench/failover.sh chain ...` runs the chain drill instead (dbproxy/examples/chain_drill.rs):
# primary + 2 standbys, automatic rewind rejoin on, the current primary killed three times in a
# row; it writes bench/results/failover-chain.md and .json.
# `bench/failover.sh restart ...` runs the "dbproxy restarted during failover" drill
# (dbproxy/examples/restart_drill.rs): the dbproxy binary in front of primary + 2 standbys,
# `kill -9`ed while it promotes, then `kill -9`ed before the primary it promoted is; it writes
# bench/results/failover-restart.md and .json.
# `bench/failover.sh --proxies 2 ...` runs the two-instance drill (dbproxy/examples/pair_drill.rs,
# issue 17): two dbproxy binaries coordinated through a real one-member etcd in front of primary +
# standby; the primary, the leader instance, or both `kill -9`ed; it writes
# bench/results/failover-pair.md and .json.
#
# Usage: bench/failover.sh [--drills 10] [--modes async,sync] [--standbys 1] [--writers 4]
#                          [--load 1.5] [--after 2] [--note TEXT]...
#        bench/failover.sh chain [--drills 3] [--modes async,sync] [--writers 4] [--load 1]
#                          [--note TEXT]...
#        bench/failover.sh restart [--drills 3] [--modes async,sync] [--writers 4] [--load 1]
#                          [--note TEXT]...
#        bench/failover.sh --proxies 2 [--drills 3] [--modes async,sync]
#                          [--kinds primary,leader,both] [--ttl 10] [--writers 4] [--load 1]
#                          [--note TEXT]...
#        (arguments go to the example; as root, the servers run as the postgres user)
# Env:   OUT (bench/results), RUST_LOG (dbproxy=warn; e.g. dbproxy=info for more),
#        LOG (where dbproxy's log and progress go besides stderr; default a temp file)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
OUT=${OUT:-$root/bench/results}
mkdir -p "$OUT"

PGBIN=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
if [ ! -x "$PGBIN/initdb" ] && ! command -v pg_config >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "please install the PostgreSQL server (apt-get install -y postgresql-15)" >&2
    exit 1
  fi
  echo "installing postgresql-15" >&2
  # Keep the package from starting a server of its own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 >/dev/null
  rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi

example=failover_drill
name=failover
bins=()
case ${1:-} in
  chain)
    shift
    example=chain_drill
    name=failover-chain
    ;;
  --proxies)
    [ "${2:-}" = 2 ] || { echo "--proxies takes 2 (the two-instance drill)" >&2; exit 2; }
    shift 2
    example=pair_drill
    name=failover-pair
    bins=(--bin dbproxy)
    ;;
  restart)
    shift
    example=restart_drill
    name=failover-restart
    # It runs the dbproxy binary, so that it can be killed.
    bins=(--bin dbproxy)
    ;;
esac
echo "building the $example drill (release)" >&2
cargo build --release -q -p dbproxy --example "$example" "${bins[@]}"

# What was measured: the commit, and whether dbproxy's sources differed from it.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD -- dbproxy/src common/src 2>/dev/null; then
  commit="$commit+uncommitted changes in dbproxy/src or common/src"
fi
export BENCH_COMMIT=$commit
export RUST_LOG=${RUST_LOG:-dbproxy=warn}
export NO_COLOR=1
LOG=${LOG:-$(mktemp /tmp/failover-drill.XXXXXX.log)}
echo "dbproxy log and progress: $LOG" >&2

tmp_md=$(mktemp /tmp/failover-md.XXXXXX)
tmp_json=$(mktemp /tmp/failover-json.XXXXXX)
trap 'rm -f "$tmp_md" "$tmp_json"' EXIT
# The results files are replaced only when the run finishes.
"$root/target/release/examples/$example" --json "$tmp_json" --note "commit $commit" "$@" \
  2> >(tee -a "$LOG" >&2) | tee "$tmp_md"
cat "$tmp_md" > "$OUT/$name.md"
cat "$tmp_json" > "$OUT/$name.json"
echo "wrote $OUT/$name.md and $OUT/$name.json" >&2
