#!/usr/bin/env bash
# End-to-end drills on the compose topology (compose.yaml), every piece a real container:
#   page     the page through lb on :8080 names the serving instance and the database node
#   webapp   `docker kill` one webapp: zero failed GETs through lb; it comes back
#   primary  `docker kill` the primary: writes through dbproxy resume and the page shows the standby
#            as the primary; the old primary, started again, stays fenced
#   samples  the collector lost no sample: every sample it took is in the database exactly once
# Usage: docker/drills.sh [DRILL...]   (default: page webapp primary samples; BUILD=0 skips the build,
#        KEEP=1 leaves the stack running). Prints one line per drill and exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
drills=("$@")
[ ${#drills[@]} -gt 0 ] || drills=(page webapp primary samples)
project=${PROJECT:-hastack-drill}
if docker compose version >/dev/null 2>&1; then dc=(docker compose -p "$project"); else dc=(docker-compose -p "$project"); fi
export COLLECTOR_INTERVAL=${COLLECTOR_INTERVAL:-2s} COLLECTOR_HOST=${COLLECTOR_HOST:-drill-host}
t0=$(date +%s)
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
fail() { say "FAIL: $*"; "${dc[@]}" ps || true; for s in dbproxy lb collector; do "${dc[@]}" logs --tail 30 "$s" || true; done; exit 1; }
cleanup() { [ "${KEEP:-0}" = 1 ] || "${dc[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

if [ "${BUILD:-1}" = 1 ]; then
  say "building images"
  PROFILE=${PROFILE:-release} bash docker/compose-build.sh >/dev/null
fi
"${dc[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
say "docker compose up -d"
"${dc[@]}" up -d >/dev/null 2>&1 || fail "compose up"

# The passwords were made at first start (docker/secrets.sh); read the app's from the volume.
secret() { docker exec "$("${dc[@]}" ps -q dbproxy)" sh -c ". /run/ha-stack/secrets.env; echo \"\$$1\""; }
app_password=$(secret APP_PASSWORD) || fail "cannot read the generated secrets"
[ -n "$app_password" ] || fail "no APP_PASSWORD in the secrets volume"
psql_app() { PGPASSWORD=$app_password PGCONNECT_TIMEOUT=3 psql -X -qAt -h 127.0.0.1 -p 9999 -U app app "$@"; }
until_ok() { # seconds command...
  local limit=$1; shift; local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done
}
page_ok() { curl -fsS -m 10 http://127.0.0.1:8080/ >/dev/null; }
until_ok 120 page_ok || fail "the page through lb never answered"
say "up"

for drill in "${drills[@]}"; do
  case $drill in
    page)
      body=$(curl -fsS -m 5 http://127.0.0.1:8080/)
      grep -q "webapp[12]" <<<"$body" || fail "page: no serving instance"
      grep -q "pg-\(primary\|standby\)" <<<"$body" || fail "page: no database node"
      # No published default: the seeds' passwords do not open the proxied superuser or app.
      for user in postgres:pg-secret app:app-secret; do
        if PGPASSWORD=${user#*:} PGCONNECT_TIMEOUT=3 psql -X -qAt -h 127.0.0.1 -p 9999 -U "${user%%:*}" \
          postgres -c "select 1" >/dev/null 2>&1; then
          fail "page: ${user%%:*} logs in on :9999 with a default password"
        fi
      done
      # dbproxy's promote endpoint refuses a request without its token, even inside the network.
      code=$(docker exec "$("${dc[@]}" ps -q webapp1)" curl -s -o /dev/null -w '%{http_code}' -X POST \
        http://dbproxy:9930/nodes/1/promote)
      [ "$code" = 401 ] || fail "page: dbproxy's promote without a token answered $code, not 401"
      # The dashboard's switchover through lb needs an operator login.
      code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'x-hastack-switchover: 1' \
        http://127.0.0.1:8080/dashboard/switchover/1)
      [ "$code" = 401 ] || fail "page: the switchover through lb without a login answered $code, not 401"
      say "page: ok (instance and database node shown; no default password, admin and switchover refused without credentials)"
      ;;
    webapp)
      docker kill "$("${dc[@]}" ps -q webapp1)" >/dev/null
      failed=0
      for _ in $(seq 1 200); do page_ok || failed=$((failed + 1)); done
      [ "$failed" -eq 0 ] || fail "webapp: $failed of 200 GETs failed with webapp1 dead"
      "${dc[@]}" start webapp1 >/dev/null 2>&1
      until_ok 60 sh -c "curl -fsS -m 2 http://127.0.0.1:8080/ | grep -q webapp" || fail "webapp: page lost after restart"
      say "webapp: ok (0 of 200 GETs failed with webapp1 killed; it is back)"
      ;;
    primary)
      psql_app -c "create table if not exists drill_writes (id serial primary key, at timestamptz default now())" \
        || fail "primary: cannot write before the drill"
      docker kill "$("${dc[@]}" ps -q pg-primary)" >/dev/null
      killed=$(date +%s%N)
      until_ok 30 psql_app -c "insert into drill_writes default values" || fail "primary: writes did not resume within 30 s"
      resumed=$(( ($(date +%s%N) - killed) / 1000000 ))
      until_ok 30 sh -c "curl -fsS -m 2 http://127.0.0.1:8080/ | grep -q 'pg-standby.*primary'" \
        || fail "primary: the page does not show pg-standby as the primary"
      # Bring the old primary back: it restarts as a primary on the old timeline, and dbproxy keeps
      # it fenced (no traffic) while writes go on to pg-standby.
      "${dc[@]}" start pg-primary >/dev/null 2>&1 || fail "primary: cannot restart pg-primary"
      dbproxy_status() { docker exec "$("${dc[@]}" ps -q dbproxy)" curl -fsS -m 2 http://127.0.0.1:9930/status; }
      fenced_up() { dbproxy_status | python3 -c 'import json,sys; n=json.load(sys.stdin)["nodes"][0]; sys.exit(0 if n["fenced"] and n["pg_status"]=="up" and n["pg_role"]=="primary" else 1)'; }
      until_ok 60 fenced_up || fail "primary: the restarted pg-primary is not reported up and fenced"
      psql_app -c "insert into drill_writes default values" >/dev/null || fail "primary: writes fail with the old primary back"
      say "primary: ok (writes resumed ${resumed} ms after the kill; the restarted old primary is fenced)"
      ;;
    samples)
      taken=$(curl -fsS -m 3 "http://127.0.0.1:9101/metrics" 2>/dev/null | sed -n 's/^collector_samples_total \([0-9]*\)$/\1/p') || true
      if [ -z "$taken" ]; then
        # The admin listener is inside the compose network only: ask from the container itself.
        taken=$(docker exec "$("${dc[@]}" ps -q collector)" curl -fsS -m 3 http://127.0.0.1:9101/metrics \
          | sed -n 's/^collector_samples_total \([0-9]*\)$/\1/p')
      fi
      sleep_until_flushed() {
        local stored
        stored=$(psql_app -c "select count(*) from samples where host = '$COLLECTOR_HOST'")
        [ "$stored" -ge "$taken" ]
      }
      until_ok 60 sleep_until_flushed || fail "samples: the collector took $taken samples, fewer are stored"
      dups=$(psql_app -c "select count(*) - count(distinct sampled_at) from samples where host = '$COLLECTOR_HOST'")
      [ "$dups" -eq 0 ] || fail "samples: $dups duplicates"
      say "samples: ok ($taken taken, all stored once)"
      ;;
    *) fail "unknown drill $drill" ;;
  esac
done
say "all drills passed: ${drills[*]}"
