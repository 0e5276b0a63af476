#!/usr/bin/env bash
# Entry point of the ha-stack PostgreSQL image. ROLE=primary initialises an empty data directory
# (superuser + application role and database, replication allowed from the network); ROLE=standby
# bootstraps an empty data directory with pg_basebackup from $PRIMARY_HOST. Then PostgreSQL runs in
# the foreground as the postgres user, under docker/pg-node.sh (`pg-node supervise`), which can
# stop it, rewind it and start it again as a standby when dbproxy's rejoin asks. A data directory
# that exists is started as it is: after a failover its role is whatever the cluster made it.
set -euo pipefail
# The passwords made at the topology's first start (docker/secrets.sh), when that volume is mounted.
secrets=${SECRETS_FILE:-/run/ha-stack/secrets.env}
# shellcheck disable=SC1090
if [ -r "$secrets" ]; then . "$secrets"; fi
: "${ROLE:=primary}" "${NODE_NAME:=$(hostname)}" "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" "${APP_USER:=app}" "${APP_PASSWORD:?set APP_PASSWORD}"
: "${PRIMARY_HOST:=pg-primary}" "${PRIMARY_PORT:=5432}" "${SYNCHRONOUS:=off}"
export PGDATA
mkdir -p "$PGDATA"
chown postgres:postgres "$PGDATA"
chmod 700 "$PGDATA"
as_pg() { runuser -u postgres -- "$@"; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  case $ROLE in
    primary)
      pw=$(mktemp); echo "$POSTGRES_PASSWORD" > "$pw"; chown postgres "$pw"
      as_pg initdb -D "$PGDATA" -U postgres -E UTF8 --locale=C --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pw" >/dev/null
      rm -f "$pw"
      cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
hot_standby_feedback = on
wal_keep_size = '256MB'
wal_log_hints = on
wal_receiver_status_interval = '1s'
log_line_prefix = '%m [%p] %q%a '
CONF
      [ "$SYNCHRONOUS" = on ] && echo "synchronous_standby_names = '*'" >> "$PGDATA/postgresql.conf"
      echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
      echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
      as_pg pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
      as_pg psql -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres \
        -c "create role \"$APP_USER\" login password '$APP_PASSWORD'" \
        -c "create database \"$APP_USER\" owner \"$APP_USER\""
      as_pg pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
      ;;
    standby)
      export PGPASSWORD=$POSTGRES_PASSWORD
      until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        echo "waiting for $PRIMARY_HOST:$PRIMARY_PORT" >&2; sleep 1
      done
      as_pg env PGPASSWORD="$POSTGRES_PASSWORD" pg_basebackup -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U postgres \
        -D "$PGDATA" -R -X stream -c fast
      ;;
    *) echo "ROLE must be primary or standby, not $ROLE" >&2; exit 2 ;;
  esac
  echo "cluster_name = '$NODE_NAME'" >> "$PGDATA/postgresql.conf"
fi
# The postgres user's own password file: pg_rewind, pg_basebackup and the WAL receiver log in to
# the other nodes with it (the secrets volume is readable by root only).
home=/var/lib/postgresql
escaped=${POSTGRES_PASSWORD//\\/\\\\}
escaped=${escaped//:/\\:}
(umask 077; printf '*:*:*:postgres:%s\n' "$escaped" > "$home/.pgpass")
chown postgres:postgres "$home" "$home/.pgpass"
export NODE_NAME PGPASSFILE="$home/.pgpass" HOME="$home"
exec setpriv --reuid=postgres --regid=postgres --init-groups /usr/local/bin/pg-node supervise
