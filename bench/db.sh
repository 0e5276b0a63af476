#!/usr/bin/env bash
# bench/db.sh: dbproxy side by side with direct connections, PgBouncer 1.18 (session mode) and
# pgpool-II 4.3 (load_balance_mode on), all in front of the same primary + streaming standby on
# loopback. Runs `pgbench -S` (simple and -M prepared), a mix with writes, and `orm` (short
# transactions the way an ORM with psycopg2 sends them: BEGIN; SELECT; SELECT; COMMIT 90%, pgbench's
# simple-update 10%, simple protocol; each client's own counter, bumped by its writes and read back
# by its reads, counts stale reads), every setup taking
# turns, ROUNDS times, and prints a markdown table (median TPS and latency, with ratios); the raw
# numbers go to bench/results/db.json. Each round starts with the next setup in the list, and a setup
# starts only once the previous one's server connections are gone. Below the table, TPS ratios
# taken within each round (which cancels the machine's drift between rounds): dbproxy over
# PgBouncer, and both over `relay`.
#
# `relay` (dbproxy/examples/bare_relay.rs) copies bytes between each client and its own backend
# connection and does nothing else: no parsing, no routing, one thread, no async runtime. It is
# the ceiling for any proxy on this machine, and shows how much of a gap to PgBouncer a proxy
# could close at all.
#
# `connect` is `pgbench -S -C -c 8` (a new connection for every transaction, as PHP, serverless
# functions and cron jobs connect): it measures logins, which PgBouncer and dbproxy answer from
# their pools. For each setup with a process of its own the table also gives that process's CPU
# time per transaction (user + system from /proc/PID/stat, its children included, around the run).
#
# `many-clients` is `pgbench -S -M prepared -c 500` against transaction pooling: 500 clients share
# 20 server connections to the standby. It runs only for `dbproxy-tx` (dbproxy with `pool.mode =
# "transaction"`, `pool.size = 20`) and `pgbouncer-tx` (PgBouncer with `pool_mode = transaction`,
# `default_pool_size = 20`). PgBouncer keeps protocol-level prepared statements across transaction
# pooling only from 1.21 (`max_prepared_statements`); an older one (Debian 12 ships 1.18) runs this
# workload with `-M simple` instead, which the table's `note` column says. `many-clients-simple`
# is the same with `-M simple` for both. Direct connections, the relay and pgpool-II (one process
# and one backend connection per client, no transaction pooling) cannot serve 500 clients with
# the servers' `max_connections = 200`, and do not run them.
#
# Usage: bench/db.sh            (as root or as a user who can run PostgreSQL)
# Env:   DURATION=10 ROUNDS=3 CLIENTS=16 THREADS=2 SCALE=10
#        SETUPS="direct pgbouncer pgpool dbproxy relay pgbouncer-tx dbproxy-tx"
#        (also dbproxy-causal and dbproxy-nocausal: dbproxy with routing.read_your_writes_by_lsn on/off)
#        WORKLOADS="select-simple select-prepared mix orm connect many-clients many-clients-simple"
#        DBPROXY=/path/to/dbproxy (a binary to measure instead of building this checkout)
#
# Reads are sent to the standby in every setup (direct and PgBouncer connect to it; pgpool-II and
# dbproxy get weight 0 on the primary), so the figures compare proxies, not servers. The mix goes
# to the primary for direct, PgBouncer and relay, and is routed by pgpool-II and dbproxy themselves.
# So is `orm`; for it the table also gives the share of account lookups (index scans of
# pgbench_accounts, from each node's statistics, read with the setup stopped so every backend has
# flushed them) that ran on the standby. simple-update's UPDATE and the SELECT after it in the same
# transaction are lookups on the primary by design, so about 1 in 10 lookups cannot be balanced.
# The primary runs with PostgreSQL's default `synchronous_commit = on` (and `fsync = off`: the disk
# is not what is measured): with it off, a commit reaches the standby only when the WAL writer
# writes it, up to `wal_writer_delay` later, and causal reads send the reads after it to the primary.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
SETUPS=${SETUPS:-"direct pgbouncer pgpool dbproxy relay pgbouncer-tx dbproxy-tx"}
WORKLOADS=${WORKLOADS:-"select-simple select-prepared mix orm connect many-clients many-clients-simple"}
MANY=500

PGBIN=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
need_pkgs=()
[ -x "$PGBIN/initdb" ] || need_pkgs+=(postgresql-15)
# Only what the chosen setups run.
if [[ " $SETUPS " == *" pgbouncer "* ]]; then
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_pkgs+=(pgbouncer)
fi
if [[ " $SETUPS " == *" pgpool "* ]]; then
  command -v pgpool >/dev/null 2>&1 || [ -x /usr/sbin/pgpool ] || need_pkgs+=(pgpool2)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing ${need_pkgs[*]}" >&2
  # Keep the packages from starting services of their own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
PGPOOL=$(command -v pgpool || echo /usr/sbin/pgpool)

# DBPROXY=/path/to/dbproxy measures that binary instead of building this checkout's (an A/B of
# two commits with the same script).
DBPROXY=${DBPROXY:-}
RELAY=$root/target/release/examples/bare_relay
if [ -z "$DBPROXY" ] && [[ " $SETUPS " == *" dbproxy"* ]]; then
  DBPROXY=$root/target/release/dbproxy
  echo "building dbproxy (release)" >&2
  cargo build --release -q -p dbproxy
fi
if [[ " $SETUPS " == *" relay "* ]]; then
  echo "building the bare relay (release)" >&2
  cargo build --release -q -p dbproxy --example bare_relay
fi

work=$(mktemp -d /tmp/bench-db.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$work"
  as_pg=(runuser -u postgres --)
fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
} 2>/dev/null
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_pg() { # port [dbname]
  for _ in $(seq 1 400); do
    "$PGBIN/psql" -X -qAt -h 127.0.0.1 -p "$1" -U postgres -d "${2:-postgres}" -c 'select 1' >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "server on port $1 did not come up" >&2; return 1
}
poll_until() { # port want seconds sql: polls until the query prints `want`; fails at the deadline
  local got
  for _ in $(seq 1 $(($3 * 20))); do
    got=$("$PGBIN/psql" -XqAt -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$4" 2>/dev/null) || true
    [ "$got" = "$2" ] && return 0
    sleep 0.05
  done
  return 1
}

P_PRIMARY=$(free_port); P_STANDBY=$(free_port); P_BOUNCER=$(free_port); P_POOL=$(free_port)
P_PCP=$(free_port); P_PROXY=$(free_port); P_PROXY_ADMIN=$(free_port)
P_RELAY=$(free_port); P_RELAY_RW=$(free_port); P_PROXY_TX=$(free_port); P_PROXY_TX_ADMIN=$(free_port)

echo "starting primary :$P_PRIMARY and standby :$P_STANDBY in $work" >&2
"${as_pg[@]}" "$PGBIN/initdb" -D "$work/primary" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
cat >> "$work/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
port = $P_PRIMARY
max_connections = 200
shared_buffers = '256MB'
wal_level = replica
hot_standby = on
fsync = off
synchronous_commit = on
EOF
"${as_pg[@]}" "$PGBIN/postgres" -D "$work/primary" > "$work/primary.log" 2>&1 &
pids+=($!)
wait_pg "$P_PRIMARY"
"${as_pg[@]}" "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P_PRIMARY" -U postgres -D "$work/standby" -R -X stream -c fast --no-sync
echo "port = $P_STANDBY" >> "$work/standby/postgresql.conf"
"${as_pg[@]}" "$PGBIN/postgres" -D "$work/standby" > "$work/standby.log" 2>&1 &
pids+=($!)
wait_pg "$P_STANDBY"

"$PGBIN/createdb" -h 127.0.0.1 -p "$P_PRIMARY" -U postgres bench
"$PGBIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$P_PRIMARY" -U postgres bench 2>/dev/null
# `orm`'s per-client counters and the empty table a stale read scans (see orm-read.sql below).
"$PGBIN/psql" -XqAt -h 127.0.0.1 -p "$P_PRIMARY" -U postgres -d bench -c "
  create table orm_marks (client int primary key, n bigint not null);
  insert into orm_marks select g, 0 from generate_series(0, $((CLIENTS + MANY))) g;
  create table orm_stale (x int);"
lsn=$("$PGBIN/psql" -XqAt -h 127.0.0.1 -p "$P_PRIMARY" -U postgres -c 'select pg_current_wal_lsn()')
poll_until "$P_STANDBY" t 60 "select pg_last_wal_replay_lsn() >= '$lsn'" ||
  { echo "the standby did not replay $lsn within 60 s" >&2; exit 1; }

# PgBouncer, session pooling, in front of the standby (reads) and the primary (mix).
cat > "$work/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$P_STANDBY dbname=bench
bench_rw = host=127.0.0.1 port=$P_PRIMARY dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $P_BOUNCER
unix_socket_dir =
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
EOF
# The same in transaction pooling, for `many-clients`.
sed -e 's/^pool_mode = session/pool_mode = transaction/' -e "s/^max_client_conn = 200/max_client_conn = $((MANY + 100))/" \
  -e 's/^default_pool_size = 40/default_pool_size = 20/' -e 's/pgbouncer\.\(log\|pid\)$/pgbouncer-tx.\1/' \
  "$work/pgbouncer.ini" > "$work/pgbouncer-tx.ini"
# PgBouncer before 1.21 cannot keep prepared statements across transaction pooling.
bouncer_version=$("$PGBOUNCER" --version 2>/dev/null | sed -n 's/^PgBouncer \([0-9.]*\).*/\1/p' | head -n1)
bouncer_prepared=no
if [ -n "$bouncer_version" ] && printf '1.21\n%s\n' "$bouncer_version" | sort -C -V; then
  bouncer_prepared=yes
  echo "max_prepared_statements = 200" >> "$work/pgbouncer-tx.ini"
fi
echo '"postgres" ""' > "$work/userlist.txt"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/pgbouncer.ini" "$work/pgbouncer-tx.ini" "$work/userlist.txt"

# pgpool-II, streaming replication mode, reads balanced to the standby only.
mkdir -p "$work/pgpool"
cat > "$work/pgpool/pgpool.conf" <<EOF
backend_clustering_mode = 'streaming_replication'
listen_addresses = '127.0.0.1'
port = $P_POOL
unix_socket_directories = '$work/pgpool'
pcp_listen_addresses = '127.0.0.1'
pcp_port = $P_PCP
pcp_socket_dir = '$work/pgpool'
pid_file_name = '$work/pgpool/pgpool.pid'
logdir = '$work/pgpool'
backend_hostname0 = '127.0.0.1'
backend_port0 = $P_PRIMARY
backend_weight0 = 0
backend_flag0 = 'ALLOW_TO_FAILOVER'
backend_hostname1 = '127.0.0.1'
backend_port1 = $P_STANDBY
backend_weight1 = 1
backend_flag1 = 'ALLOW_TO_FAILOVER'
num_init_children = $((CLIENTS + 8))
max_pool = 2
enable_pool_hba = off
pool_passwd = ''
load_balance_mode = on
disable_load_balance_on_write = 'transaction'
sr_check_period = 0
health_check_period = 0
log_min_messages = warning
EOF

# dbproxy, same shape: reads to the standby only, trust for clients.
cat > "$work/dbproxy.toml" <<EOF
listen = "127.0.0.1:$P_PROXY"
admin_listen = "127.0.0.1:$P_PROXY_ADMIN"
state_dir = "$work/dbproxy-state"
[[nodes]]
name = "primary"
host = "127.0.0.1"
port = $P_PRIMARY
weight = 0
[[nodes]]
name = "standby"
host = "127.0.0.1"
port = $P_STANDBY
weight = 1
[[hba]]
method = "trust"
EOF
# The same with causal reads on and off (`SETUPS="dbproxy-causal dbproxy-nocausal"` measures
# their cost; `dbproxy` runs the default).
for causal in true false; do
  name=dbproxy-causal; [ "$causal" = false ] && name=dbproxy-nocausal
  { cat "$work/dbproxy.toml"; printf '[routing]\nread_your_writes_by_lsn = %s\n' "$causal"; } > "$work/$name.toml"
done

# dbproxy in transaction pooling, for `many-clients`.
{ cat "$work/dbproxy.toml"; printf '[pool]\nmode = "transaction"\nsize = 20\n'; } > "$work/dbproxy-tx.toml"
sed -i -e "s/^listen = .*/listen = \"127.0.0.1:$P_PROXY_TX\"/" -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$P_PROXY_TX_ADMIN\"/" \
  -e "s|^state_dir = .*|state_dir = \"$work/dbproxy-tx-state\"|" "$work/dbproxy-tx.toml"

# Whether a workload runs on a setup: `many-clients*` only on the transaction-pooling setups, the
# others only on the rest.
applies() { # setup workload
  case $1:$2 in
    pgbouncer-tx:many-clients*|dbproxy-tx:many-clients*) return 0 ;;
    *:many-clients*|pgbouncer-tx:*|dbproxy-tx:*) return 1 ;;
  esac
  return 0
}

start_setup() {
  case $1 in
    pgbouncer-tx)
      "${as_pg[@]}" "$PGBOUNCER" "$work/pgbouncer-tx.ini" > /dev/null 2>&1 &
      pids+=($!); wait_pg "$P_BOUNCER" bench ;;
    dbproxy-tx)
      RUST_LOG=warn "$DBPROXY" --config "$work/dbproxy-tx.toml" > "$work/dbproxy-tx.log" 2>&1 &
      pids+=($!); wait_pg "$P_PROXY_TX" bench ;;
    pgbouncer)
      "${as_pg[@]}" "$PGBOUNCER" "$work/pgbouncer.ini" > /dev/null 2>&1 &
      pids+=($!); wait_pg "$P_BOUNCER" bench ;;
    pgpool)
      "$PGPOOL" -n -f "$work/pgpool/pgpool.conf" -F /dev/null > "$work/pgpool/out.log" 2>&1 &
      pids+=($!); wait_pg "$P_POOL" bench ;;
    dbproxy|dbproxy-causal|dbproxy-nocausal)
      RUST_LOG=warn "$DBPROXY" --config "$work/$1.toml" > "$work/$1.log" 2>&1 &
      pids+=($!); wait_pg "$P_PROXY" bench ;;
    relay)
      "$RELAY" "127.0.0.1:$P_RELAY=127.0.0.1:$P_STANDBY" "127.0.0.1:$P_RELAY_RW=127.0.0.1:$P_PRIMARY" \
        > "$work/relay.log" 2>&1 &
      pids+=($!); wait_pg "$P_RELAY" bench ;;
  esac
}
stop_setup() {
  local pid
  case $1 in
    direct) settle; return 0 ;;
  esac
  pid=${pids[-1]}
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
  unset 'pids[-1]'
  [ "$1" = pgpool ] && rm -f "$work"/pgpool/.s.* "$work/pgpool/pgpool.pid" || true
  settle
}
# Waits until no client backend but this check's own is left on either node, so the next setup
# does not share the CPUs with the previous one's connections still being torn down.
settle() {
  local port
  for port in "$P_PRIMARY" "$P_STANDBY"; do
    poll_until "$port" 0 10 "select count(*) from pg_stat_activity
      where backend_type = 'client backend' and pid <> pg_backend_pid()" ||
      echo "note: connections still open on port $port 10 s after the previous setup" >&2
  done
}
# CPU clock ticks (user + system) used so far by a process and its direct children.
cpu_ticks() { # pid
  local total=0 p f
  for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do
    f=$(cut -d')' -f2- "/proc/$p/stat" 2>/dev/null) || continue
    # After the command name: state is field 3; utime and stime are fields 14 and 15.
    read -r -a fields <<<"$f"
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
target() { # setup workload -> "port dbname"
  case $1:$2 in
    direct:mix|direct:orm) echo "$P_PRIMARY bench" ;;
    direct:*) echo "$P_STANDBY bench" ;;
    pgbouncer:mix|pgbouncer:orm) echo "$P_BOUNCER bench_rw" ;;
    pgbouncer:*|pgbouncer-tx:*) echo "$P_BOUNCER bench" ;;
    dbproxy-tx:*) echo "$P_PROXY_TX bench" ;;
    pgpool:*) echo "$P_POOL bench" ;;
    dbproxy*:*) echo "$P_PROXY bench" ;;
    relay:mix|relay:orm) echo "$P_RELAY_RW bench" ;;
    relay:*) echo "$P_RELAY bench" ;;
  esac
}

# The ORM's read transaction (psycopg2 sends BEGIN before the first statement, COMMIT at the end),
# and its write transaction (pgbench's simple-update). Each client also keeps a counter of its
# own in `orm_marks`: the write transaction bumps it and keeps the value (`written`), the read
# transaction reads it back (`seen`), and a read older than the client's own last write (a stale
# read) runs `SELECT count(*) FROM orm_stale`, which the table's scan statistics count on
# whichever node it ran (no write, so counting does not change the routing).
cat > "$work/orm-read.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid + 1;
SELECT n AS seen FROM orm_marks WHERE client = :client_id \gset
COMMIT;
\if :seen < :written
SELECT count(*) FROM orm_stale;
\endif
EOF
cat > "$work/orm-write.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
UPDATE orm_marks SET n = n + 1 WHERE client = :client_id RETURNING n AS written \gset
END;
EOF
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/orm-read.sql" "$work/orm-write.sql"
lookups() { # port -> "index scans of pgbench_accounts, scans of orm_stale" counted by that node
  "$PGBIN/psql" -XqAt -F ' ' -h 127.0.0.1 -p "$1" -U postgres -d bench -c \
    "select coalesce(sum(idx_scan) filter (where relname = 'pgbench_accounts'), 0),
            coalesce(sum(seq_scan) filter (where relname = 'orm_stale'), 0)
     from pg_stat_user_tables"
}

results="$work/results.tsv"
: > "$results"
read -r -a setups <<<"$SETUPS"
for round in $(seq 1 "$ROUNDS"); do
  # Each round starts one setup further along, so none always runs first or after the same one.
  for k in "${!setups[@]}"; do
    setup=${setups[$(( (k + round - 1) % ${#setups[@]} ))]}
    start_setup "$setup"
    for wl in $WORKLOADS; do
      applies "$setup" "$wl" || continue
      read -r port db < <(target "$setup" "$wl")
      share=""; stale=""
      if [ "$wl" = orm ]; then
        # A fresh start, so the statistics counted between the two readings are this run's only.
        stop_setup "$setup"
        read -r p0 ps0 < <(lookups "$P_PRIMARY"); read -r s0 ss0 < <(lookups "$P_STANDBY")
        start_setup "$setup"
      fi
      clients=$CLIENTS
      case $wl in
        select-simple) args=(-S -M simple) ;;
        select-prepared) args=(-S -M prepared) ;;
        mix) args=(-b select-only@9 -b simple-update@1 -M prepared) ;;
        orm) args=(-f "$work/orm-read.sql@9" -f "$work/orm-write.sql@1" -D written=0 -M simple) ;;
        connect) args=(-S -C -M simple); clients=8 ;;
        many-clients) args=(-S -M prepared); clients=$MANY ;;
        many-clients-simple) args=(-S -M simple); clients=$MANY ;;
      esac
      note=""
      if [ "$setup:$wl" = pgbouncer-tx:many-clients ] && [ "$bouncer_prepared" = no ]; then
        args=(-S -M simple); note="PgBouncer ${bouncer_version:-?}: -M simple (no max_prepared_statements before 1.21)"
      fi
      proc=""
      [ "$setup" != direct ] && proc=${pids[-1]}
      before=0; [ -n "$proc" ] && before=$(cpu_ticks "$proc")
      out=$("$PGBIN/pgbench" -n "${args[@]}" -c "$clients" -j "$THREADS" -T "$DURATION" \
        -h 127.0.0.1 -p "$port" -U postgres "$db" 2>&1) || { echo "$out" >&2; tps=0; lat=0; }
      after=0; [ -n "$proc" ] && after=$(cpu_ticks "$proc")
      logins=""
      if [ "$setup" = dbproxy-tx ]; then
        # Server logins during the run (a pooled hand-over costs none): the pool's "new" checkouts.
        logins=$(curl -fsS "http://127.0.0.1:$P_PROXY_TX_ADMIN/metrics" 2>/dev/null \
          | awk '/^dbproxy_pool_checkouts_total\{.*result="new"/ {n += $2} END {print n + 0}')
      fi
      txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out" | head -n1)
      cpu_us=0
      [ -n "$proc" ] && [ "${txs:-0}" -gt 0 ] && cpu_us=$(( (after - before) * TICK_US / txs ))
      tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -n1)
      lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -n1)
      failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out" | head -n1)
      if [ "$wl" = orm ]; then
        stop_setup "$setup"
        read -r p1 ps1 < <(lookups "$P_PRIMARY"); read -r s1 ss1 < <(lookups "$P_STANDBY")
        share=$(python3 -c "p, s = $p1 - $p0, $s1 - $s0; print(f'{s / (p + s):.3f}' if p + s else '')")
        stale=$(( ps1 - ps0 + ss1 - ss0 ))
        start_setup "$setup"
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$setup" "$wl" "${tps:-0}" "${lat:-0}" "${failed:-0}" "$cpu_us" "$share" "$note" "$stale" >> "$results"
      printf 'round %s %-9s %-16s %10s tps %8s ms failed %s proxy CPU %s us/tx %s%s\n' "$round" "$setup" "$wl" "${tps:-0}" "${lat:-0}" "${failed:-0}" "$cpu_us" "${share:+standby share $share stale reads $stale}" "${logins:+ server logins since start $logins}" >&2
    done
    stop_setup "$setup"
  done
done

mkdir -p "$root/bench/results"
python3 - "$results" "$root/bench/results/db.json" "$CLIENTS" "$THREADS" "$DURATION" "$ROUNDS" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
shares = {}
notes = {}
for r in rows:
    if len(r) > 7 and r[7]:
        shares.setdefault(r[2], {}).setdefault(r[1], []).append((float(r[7]), int(r[9] or 0)))
    if len(r) > 8 and r[8]:
        notes[(r[2], r[1])] = r[8]
rows = [r[:7] for r in rows]
clients, threads, duration, rounds = sys.argv[3:7]
data = {}
# The machine's speed drifts between rounds; a ratio taken within one round cancels most of it.
by_round = {}
for rnd, setup, wl, tps, lat, failed, cpu in rows:
    d = data.setdefault(wl, {}).setdefault(setup, {"tps": [], "lat": [], "cpu": [], "failed": 0})
    d["tps"].append(float(tps)); d["lat"].append(float(lat)); d["failed"] += int(failed)
    d["cpu"].append(int(cpu))
    by_round.setdefault(wl, {}).setdefault(rnd, {})[setup] = float(tps)
print(f"\npgbench, {clients} clients (connect: 8, many-clients: 500), {threads} threads, {duration} s per run, median of {rounds} rounds taken in turns\n")
print("| workload | setup | TPS | latency avg (ms) | × direct | × PgBouncer | × pgpool-II | × relay | proxy CPU µs/tx | failed | note |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
summary = {}
for wl, setups in data.items():
    med = {s: statistics.median(v["tps"]) for s, v in setups.items()}
    for s, v in setups.items():
        m = med[s]
        def ratio(o):
            o = {"pgbouncer": "pgbouncer-tx"}.get(o, o) if s.endswith("-tx") else o
            return f"{m / med[o]:.2f}" if o in med and med[o] > 0 else "–"
        cpu = statistics.median(v["cpu"])
        cpu_text = "–" if s == "direct" else f"{cpu:.0f}"
        print(f"| {wl} | {s} | {m:.0f} | {statistics.median(v['lat']):.3f} | {ratio('direct')} | {ratio('pgbouncer')} | {ratio('pgpool')} | {ratio('relay')} | {cpu_text} | {v['failed']} | {notes.get((wl, s), '')} |")
        summary.setdefault(wl, {})[s] = {"tps_median": m, "tps_runs": v["tps"], "latency_ms_median": statistics.median(v["lat"]), "cpu_us_per_tx_median": cpu, "failed": v["failed"]}
for wl, per_setup in shares.items():
    print(f"\n{wl}: share of account lookups that ran on the standby (median over rounds), and stale reads (a client's read older than its own last write; all rounds)\n")
    print("| setup | standby share | stale reads |")
    print("|---|---:|---:|")
    for s, v in per_setup.items():
        share = statistics.median(x for x, _ in v)
        stale = sum(n for _, n in v)
        print(f"| {s} | {share:.1%} | {stale} |")
        summary.setdefault(wl, {}).setdefault(s, {})["standby_share_median"] = share
        summary.setdefault(wl, {}).setdefault(s, {})["stale_reads"] = stale
names = {"dbproxy": "dbproxy", "pgbouncer": "PgBouncer", "relay": "relay",
         "dbproxy-tx": "dbproxy (transaction pooling)", "pgbouncer-tx": "PgBouncer (transaction pooling)"}
paired = {}
for a, b in (("dbproxy", "pgbouncer"), ("pgbouncer", "relay"), ("dbproxy", "relay"), ("dbproxy-tx", "pgbouncer-tx")):
    for wl, rnds in by_round.items():
        ratios = [r[a] / r[b] for r in rnds.values() if r.get(a, 0) > 0 and r.get(b, 0) > 0]
        if ratios:
            paired.setdefault((a, b), {})[wl] = ratios
for (a, b), per_wl in paired.items():
    print()
    for wl, ratios in per_wl.items():
        above = sum(x >= 1.0 for x in ratios)
        print(f"{names[a]} ÷ {names[b]} within a round, {wl}: median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}–{max(ratios):.2f}, at or above 1.00 in {above} of {len(ratios)} rounds")
out = {"clients": int(clients), "threads": int(threads), "duration_s": int(duration), "rounds": int(rounds), "results": summary}
for (a, b), per_wl in paired.items():
    out[f"{a}_over_{b}_by_round"] = per_wl
json.dump(out, open(sys.argv[2], "w"), indent=2)
PY
