#!/usr/bin/env bash
# dbproxy's rejoin command in the compose topology (failover.rejoin, docker/config/dbproxy.toml):
# asks the PostgreSQL node at HOST:PORT, through its own server, to turn itself into a standby of
# PRIMARY_HOST:PRIMARY_PORT. Each node runs in its own container, so dbproxy cannot run pg_rewind
# on its data directory; the node's supervisor (docker/pg-node.sh) does, when told:
#   COPY (SELECT pg_backend_pid()) TO PROGRAM 'pg-node rejoin-request PRIMARY_HOST PRIMARY_PORT'
# runs that program inside the node's container, as the postgres user (a superuser's right).
# The request returns at once; dbproxy then waits (failover.rejoin.timeout) until the node streams
# from the primary before it lifts the fence.
# Usage: rejoin-node HOST PORT PRIMARY_HOST PRIMARY_PORT   (the password: $POSTGRES_PASSWORD)
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: rejoin-node HOST PORT PRIMARY_HOST PRIMARY_PORT" >&2
  exit 2
fi
host=$1 port=$2 primary_host=$3 primary_port=$4
# The values go into an SQL string literal: only host names, addresses and ports.
for v in "$primary_host" "$primary_port"; do
  if ! [[ $v =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    echo "rejoin-node: '$v' is not a host name, address or port" >&2
    exit 2
  fi
done
export PGPASSWORD=${POSTGRES_PASSWORD:?rejoin-node needs POSTGRES_PASSWORD}
exec psql -X -qAt -v ON_ERROR_STOP=1 \
  "host=$host port=$port user=postgres dbname=postgres connect_timeout=5 application_name=dbproxy-rejoin" \
  -c "copy (select pg_backend_pid()) to program '/usr/local/bin/pg-node rejoin-request $primary_host $primary_port'"
