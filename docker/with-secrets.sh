#!/usr/bin/env bash
# Entry point of the app image: reads the secrets made at first start (docker/secrets.sh) and hands
# the program it runs only the ones it needs, as that program's own settings, then execs it.
# `{APP_PASSWORD}` in WEBAPP_DATABASE_URL / COLLECTOR_DATABASE_URL is replaced by the password.
set -euo pipefail
file=${SECRETS_FILE:-/run/ha-stack/secrets.env}
if [ ! -r "$file" ]; then
  echo "no secrets in $file: the compose service 'secrets' makes them at first start" >&2
  exit 2
fi
# shellcheck disable=SC1090
. "$file"
case $(basename "${1:-}") in
  dbproxy)
    export APP_PASSWORD POSTGRES_PASSWORD DBPROXY_ADMIN_TOKEN
    export DBPROXY_HEALTH__PASSWORD=$POSTGRES_PASSWORD
    ;;
  webapp)
    export WEBAPP_DBPROXY_ADMIN_TOKEN=$DBPROXY_ADMIN_TOKEN WEBAPP_OPERATOR_PASSWORD=$OPERATOR_PASSWORD
    export WEBAPP_DATABASE_URL=${WEBAPP_DATABASE_URL//\{APP_PASSWORD\}/$APP_PASSWORD}
    ;;
  lb)
    export LB_ADMIN_TOKEN
    ;;
  collector)
    export COLLECTOR_DATABASE_URL=${COLLECTOR_DATABASE_URL//\{APP_PASSWORD\}/$APP_PASSWORD}
    ;;
esac
exec "$@"
