#!/usr/bin/env bash
# The PostgreSQL node's supervisor and its rejoin, inside the ha-stack PostgreSQL image. It runs as
# the postgres user, as the container's main process (postgres-entrypoint.sh execs it), so that
# the node can be stopped, rewound and started again as a standby without the container ending.
#
#   pg-node supervise
#       Runs postgres in the foreground. SIGINT/SIGTERM: a fast shutdown, then exit (the
#       container stops). postgres ending on its own: exit with its status (the container's
#       restart policy starts it again). SIGUSR1 (sent by `rejoin-request`): a fast shutdown,
#       the rejoin, and postgres again, now a standby. A request left by a rejoin that was
#       interrupted (the container was killed meanwhile) is carried out before postgres starts.
#   pg-node rejoin-request HOST PORT
#       Asks the supervisor to turn this node into a standby of HOST:PORT. Run by the server
#       itself for dbproxy's rejoin command (docker/rejoin-node.sh):
#         COPY (SELECT pg_backend_pid()) TO PROGRAM 'pg-node rejoin-request HOST PORT'
#       so it reads the requesting backend's pid on stdin; the supervisor lets that session end
#       before it stops the server, and the COPY is acknowledged. Nothing is done when the node
#       already streams from HOST:PORT.
#
# The rejoin: CHECKPOINT on the new primary (so its control file names its new timeline),
# pg_rewind from it, or a fresh pg_basebackup when pg_rewind fails (the old directory is replaced
# only once the copy succeeded); the node's own configuration files are put back (both tools copy
# the primary's), `standby.signal` and `primary_conninfo` (password from ~/.pgpass, the node's
# name as application_name) are written. When the rejoin fails, `standby.signal` is still
# written and the supervisor exits non-zero: the node never starts again as a writable primary,
# and the restarted container tries the request again.
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data}" "${NODE_NAME:=$(hostname)}"
home=${PG_NODE_HOME:-/var/lib/postgresql}
request=$home/rejoin.request
pidfile=$home/supervisor.pid
export PGDATA PGPASSFILE=${PGPASSFILE:-$home/.pgpass}
log() { echo "pg-node: $*" >&2; }

valid_target() { # host port
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$ ]] && [[ $2 =~ ^[0-9]{1,5}$ ]] && [ "$2" -ge 1 ] && [ "$2" -le 65535 ]
}

# The node streams from host:port already (asked of the local server over its socket).
streams_from() { # host port
  local row
  row=$(psql -X -qAt -h /var/run/postgresql -U postgres -d postgres -c \
    "select status || ' ' || coalesce(sender_host, '') || ' ' || coalesce(sender_port::text, '') from pg_stat_wal_receiver" \
    2>/dev/null) || return 1
  [ "$row" = "streaming $1 $2" ]
}

rejoin_request() { # host port (the backend's pid on stdin)
  local host=${1:-} port=${2:-} backend
  if ! valid_target "$host" "$port"; then
    echo "pg-node: rejoin-request needs HOST PORT (a host name or address and a port), not '$host' '$port'" >&2
    exit 2
  fi
  backend=$(head -c 32 | tr -cd '0-9')
  if streams_from "$host" "$port"; then
    echo "$NODE_NAME already streams from $host:$port"
    exit 0
  fi
  [ -s "$pidfile" ] || { echo "pg-node: no supervisor ($pidfile missing)" >&2; exit 1; }
  printf '%s %s %s\n' "$host" "$port" "${backend:-0}" > "$request.tmp"
  mv "$request.tmp" "$request"
  kill -USR1 "$(cat "$pidfile")"
  echo "$NODE_NAME: rejoin as a standby of $host:$port requested"
}

# The configuration files the node keeps through a rewind or a base backup.
own_files=(postgresql.conf postgresql.auto.conf pg_hba.conf pg_ident.conf)

standby_config() { # host port saved_dir
  local host=$1 port=$2 saved=$3 f
  for f in "${own_files[@]}"; do
    [ -f "$saved/$f" ] && cp "$saved/$f" "$PGDATA/$f"
  done
  touch "$PGDATA/postgresql.auto.conf"
  # The settings a rejoin replaces go; the fence's read-only default with them (a standby is
  # read-only anyway, and it must not stay so once promoted).
  grep -Ev '^[[:space:]]*(primary_conninfo|primary_slot_name|recovery_target_timeline|default_transaction_read_only)[[:space:]]*=' \
    "$PGDATA/postgresql.auto.conf" > "$PGDATA/postgresql.auto.conf.new" || true
  {
    echo "primary_conninfo = 'host=$host port=$port user=postgres passfile=$PGPASSFILE application_name=$NODE_NAME'"
    echo "recovery_target_timeline = 'latest'"
  } >> "$PGDATA/postgresql.auto.conf.new"
  mv "$PGDATA/postgresql.auto.conf.new" "$PGDATA/postgresql.auto.conf"
  rm -f "$PGDATA/recovery.signal"
  touch "$PGDATA/standby.signal"
}

# A fresh base backup into $PGDATA/.rejoin-new, then it replaces the directory's contents (the
# volume's mount point itself cannot be renamed).
basebackup() { # host port
  local new=$PGDATA/.rejoin-new
  rm -rf "$new"
  pg_basebackup -h "$1" -p "$2" -U postgres -D "$new" -X stream -c fast || { rm -rf "$new"; return 1; }
  find "$PGDATA" -mindepth 1 -maxdepth 1 ! -name .rejoin-new -exec rm -rf {} +
  find "$new" -mindepth 1 -maxdepth 1 -exec mv -t "$PGDATA" {} +
  rmdir "$new"
}

rejoin() { # host port
  local host=$1 port=$2 saved how f
  saved=$(mktemp -d "$home/rejoin-conf.XXXXXX")
  for f in "${own_files[@]}"; do
    [ -f "$PGDATA/$f" ] && cp "$PGDATA/$f" "$saved/$f"
  done
  rm -rf "$PGDATA/.rejoin-new"
  log "rejoining $NODE_NAME as a standby of $host:$port"
  psql -X -q -h "$host" -p "$port" -U postgres -d postgres -c checkpoint \
    || log "CHECKPOINT on $host:$port failed; pg_rewind may see its old timeline"
  if pg_rewind --target-pgdata="$PGDATA" \
    --source-server="host=$host port=$port user=postgres dbname=postgres connect_timeout=10"; then
    how="rewound with pg_rewind"
  elif basebackup "$host" "$port"; then
    how="rebuilt with pg_basebackup (pg_rewind failed)"
  else
    log "pg_rewind and pg_basebackup from $host:$port both failed"
    standby_config "$host" "$port" "$saved"
    rm -rf "$saved"
    return 1
  fi
  standby_config "$host" "$port" "$saved"
  rm -rf "$saved"
  log "$NODE_NAME $how; starting as a standby of $host:$port"
}

# Carries out the request on file, if any. Fails when the rejoin did.
rejoin_if_requested() {
  [ -s "$request" ] || return 0
  local host port backend
  read -r host port backend < "$request" || true
  if ! valid_target "${host:-}" "${port:-}"; then
    log "ignoring a malformed rejoin request: $(head -c 200 "$request")"
    rm -f "$request"
    return 0
  fi
  rejoin "$host" "$port" || return 1
  rm -f "$request"
}

# The session that asked (its backend) ends, so its COPY is acknowledged, before the fast
# shutdown; bounded, since a shutdown must not wait on a client.
let_requester_finish() {
  local backend=0 i
  [ -s "$request" ] && read -r _ _ backend < "$request" || true
  [[ ${backend:-0} =~ ^[1-9][0-9]*$ ]] || return 0
  for i in $(seq 1 100); do
    kill -0 "$backend" 2>/dev/null || return 0
    sleep 0.1
  done
}

supervise() {
  local want='' pg rc
  trap 'want=rejoin' USR1
  trap 'want=stop' INT TERM
  echo $$ > "$pidfile"
  while :; do
    rejoin_if_requested || exit 1
    [ "$want" = stop ] && exit 0
    want=''
    postgres -D "$PGDATA" &
    pg=$!
    # A stop that came between the rejoin and the start.
    [ "$want" = stop ] && kill -INT "$pg"
    while :; do
      rc=0
      wait "$pg" || rc=$?
      kill -0 "$pg" 2>/dev/null || break
      # A signal interrupted the wait; postgres still runs.
      case $want in
        stop) kill -INT "$pg" ;;
        rejoin)
          let_requester_finish
          kill -INT "$pg"
          want=rejoining
          ;;
      esac
    done
    case $want in
      stop) exit 0 ;;
      rejoin | rejoining) continue ;;
      *)
        log "postgres exited on its own ($rc)"
        exit "$rc"
        ;;
    esac
  done
}

case ${1:-} in
  supervise) supervise ;;
  rejoin-request) shift; rejoin_request "$@" ;;
  *) echo "usage: pg-node supervise | pg-node rejoin-request HOST PORT" >&2; exit 2 ;;
esac
