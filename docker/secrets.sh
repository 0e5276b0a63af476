#!/usr/bin/env bash
# The compose topology's first start: writes the secrets every other container reads from the
# shared `secrets` volume (docker/with-secrets.sh, docker/postgres-entrypoint.sh), so no default
# password or token is published. A value given in the environment of `docker compose up` wins
# (POSTGRES_PASSWORD, APP_PASSWORD, DBPROXY_ADMIN_TOKEN, LB_ADMIN_TOKEN, OPERATOR_PASSWORD; use
# URL-safe characters); every other one is 192 random bits. Later starts keep the file as it is.
set -euo pipefail
file=${SECRETS_FILE:-/run/ha-stack/secrets.env}
if [ -s "$file" ]; then
  echo "secrets exist in $file"
  exit 0
fi
umask 077
random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
tmp="$file.tmp.$$"
{
  printf 'POSTGRES_PASSWORD=%q\n' "${POSTGRES_PASSWORD:-$(random)}"
  printf 'APP_PASSWORD=%q\n' "${APP_PASSWORD:-$(random)}"
  printf 'DBPROXY_ADMIN_TOKEN=%q\n' "${DBPROXY_ADMIN_TOKEN:-$(random)}"
  printf 'LB_ADMIN_TOKEN=%q\n' "${LB_ADMIN_TOKEN:-$(random)}"
  printf 'OPERATOR_PASSWORD=%q\n' "${OPERATOR_PASSWORD:-$(random)}"
} > "$tmp"
mv "$tmp" "$file"
echo "secrets written to $file (read them with: docker compose exec dbproxy cat $file)"
