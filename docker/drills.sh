#!/usr/bin/env bash
# End-to-end drills on the compose topology (compose.yaml), every piece a real container:
#   page     the page through lb on :8080 names the serving instance and the database node
#   webapp   `docker kill` one webapp: zero failed GETs through lb; it comes back
#   proxy    `docker kill` the dbproxy instance holding the leader lease in etcd: writes go on through
#            the other one at once, the page still answers (the webapps move to the other instance
#            of their multi-host URL), the other takes the lease within the TTL, and the killed one,
#            started again, follows
#   primary  `docker kill` the primary: writes through dbproxy resume and the page shows the standby
#            as the primary; the old primary, started again (`docker compose start`), rejoins on
#            its own (dbproxy's automatic rejoin, docker/rejoin-node.sh + docker/pg-node.sh): it
#            streams from the new primary (pg_stat_replication there shows it) and is unfenced
#   second   the same again with the roles swapped (the second failure): `docker kill` the current
#            primary; the node that rejoined takes over, and the killed one rejoins in turn
#   samples  the collector lost no sample: every sample it took is in the database exactly once
# Usage: docker/drills.sh [DRILL...]   (default: page webapp proxy primary second samples; BUILD=0 skips the build,
#        KEEP=1 leaves the stack running). Prints one line per drill and exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
drills=("$@")
[ ${#drills[@]} -gt 0 ] || drills=(page webapp proxy primary second samples)
project=${PROJECT:-hastack-drill}
if docker compose version >/dev/null 2>&1; then dc=(docker compose -p "$project"); else dc=(docker-compose -p "$project"); fi
export COLLECTOR_INTERVAL=${COLLECTOR_INTERVAL:-2s} COLLECTOR_HOST=${COLLECTOR_HOST:-drill-host}
t0=$(date +%s)
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
fail() { say "FAIL: $*"; "${dc[@]}" ps || true; for s in etcd dbproxy dbproxy2 lb collector; do "${dc[@]}" logs --tail 30 "$s" || true; done; exit 1; }
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
# Through either dbproxy instance (libpq tries the next host when one does not answer).
psql_app() { psql_port 9999,9998 "$@"; }
psql_port() { local port=$1; shift; PGPASSWORD=$app_password PGCONNECT_TIMEOUT=3 psql -X -qAt -h 127.0.0.1,127.0.0.1 -p "$port" -U app app "$@"; }
until_ok() { # seconds command...
  local limit=$1; shift; local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done
}
page_ok() { curl -fsS -m 10 http://127.0.0.1:8080/ >/dev/null; }
dbproxy_status() { proxy_status dbproxy; }
# /status of dbproxy instance (service) $1.
proxy_status() { docker exec "$("${dc[@]}" ps -q "$1")" curl -fsS -m 2 http://127.0.0.1:9930/status; }
# The instance $1 holds the leader lease.
leads() { proxy_status "$1" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["record"]["coordination"]["is_leader"] else 1)'; }
# The instance $1 follows $2 (reaches etcd, sees $2 as the leader).
follows() {
  proxy_status "$1" | python3 -c 'import json,sys; c=json.load(sys.stdin)["record"]["coordination"]; sys.exit(0 if c["etcd_reachable"] and not c["is_leader"] and c["leader"]==sys.argv[1] else 1)' "$2"
}
# The elected primary's name, per dbproxy.
elected() { dbproxy_status | python3 -c 'import json,sys; s=json.load(sys.stdin); p=s["primary"]; print(s["nodes"][p]["name"] if p is not None else "")'; }
# The standbys streaming from node (service) $1, by application_name.
streaming_on() {
  docker exec -u postgres "$("${dc[@]}" ps -q "$1")" psql -X -qAt -U postgres -d postgres \
    -c "select application_name from pg_stat_replication where state = 'streaming' order by 1"
}
# Node $1 streams from $2 (pg_stat_replication on $2 shows it) and dbproxy has lifted its fence.
rejoined() {
  streaming_on "$2" | grep -qx "$1" || return 1
  dbproxy_status | python3 -c 'import json,sys; n=[n for n in json.load(sys.stdin)["nodes"] if n["name"]==sys.argv[1]][0]; sys.exit(0 if not n["fenced"] and n["pg_role"]=="standby" else 1)' "$1"
}
# `docker kill` the current primary $1 with $2 streaming from it: writes through dbproxy resume on
# $2 (sets `resumed`, ms from the kill to the first write).
fail_primary() {
  local old=$1 new=$2 killed
  until_ok 60 rejoined "$new" "$old" || fail "$drill: $new is not a streaming, unfenced standby of $old before the kill"
  psql_app -c "create table if not exists drill_writes (id serial primary key, at timestamptz default now())" \
    || fail "$drill: cannot write before the drill"
  docker kill "$("${dc[@]}" ps -q "$old")" >/dev/null
  killed=$(date +%s%N)
  until_ok 30 psql_app -c "insert into drill_writes default values" || fail "$drill: writes did not resume within 30 s"
  resumed=$(( ($(date +%s%N) - killed) / 1000000 ))
  [ "$(elected)" = "$new" ] || fail "$drill: dbproxy elected $(elected), not $new"
}
# The killed primary $1, started again, comes back as a streaming standby of $2 on its own.
restart_rejoins() {
  local old=$1 new=$2 t
  # The killed node starts again as the primary of its old timeline: dbproxy keeps it fenced (no
  # traffic) and its automatic rejoin turns it into a standby of the new primary.
  "${dc[@]}" start "$old" >/dev/null 2>&1 || fail "$drill: cannot start $old again"
  t=$(date +%s)
  until_ok 90 rejoined "$old" "$new" || fail "$drill: $old is not back as a streaming standby of $new within 90 s"
  back=$(( $(date +%s) - t ))
  [ "$(elected)" = "$new" ] || fail "$drill: dbproxy elected $(elected) after $old came back, not $new"
  local id
  id=$(psql_app -c "insert into drill_writes default values returning id") || fail "$drill: writes fail with $old back"
  # It replays what the new primary takes, and refuses writes of its own.
  until_ok 30 sh -c "docker exec -u postgres $("${dc[@]}" ps -q "$old") psql -X -qAt -U postgres -d app \
    -c 'select 1 from drill_writes where id = $id' | grep -q 1" || fail "$drill: $old does not replay the new primary's writes"
  if docker exec -u postgres "$("${dc[@]}" ps -q "$old")" psql -X -qAt -U postgres -d app \
    -c "insert into drill_writes default values" >/dev/null 2>&1; then
    fail "$drill: $old took a write of its own"
  fi
}
fail_and_rejoin() { fail_primary "$@" && restart_rejoins "$@"; }
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
    proxy)
      if leads dbproxy; then old=dbproxy new=dbproxy2 new_port=9998
      elif leads dbproxy2; then old=dbproxy2 new=dbproxy new_port=9999
      else fail "proxy: neither dbproxy instance holds the leader lease"; fi
      psql_app -c "create table if not exists drill_writes (id serial primary key, at timestamptz default now())" \
        || fail "proxy: cannot write before the drill"
      docker kill "$("${dc[@]}" ps -q "$old")" >/dev/null
      killed=$(date +%s%N)
      # Writes through the other instance never depended on the leader.
      until_ok 20 psql_port "$new_port" -c "insert into drill_writes default values" \
        || fail "proxy: no write through $new within 20 s of killing $old"
      resumed=$(( ($(date +%s%N) - killed) / 1000000 ))
      failed=0
      for _ in $(seq 1 50); do page_ok || failed=$((failed + 1)); done
      [ "$failed" -eq 0 ] || fail "proxy: $failed of 50 GETs of the page failed with $old dead"
      ttl=$(proxy_status "$new" | python3 -c 'import json,sys; print(json.load(sys.stdin)["record"]["coordination"]["lease_ttl_s"])')
      until_ok $(( ttl + 5 )) leads "$new" || fail "proxy: $new did not take the lease within ${ttl} s + 5 s"
      took=$(( ($(date +%s%N) - killed) / 1000000 ))
      "${dc[@]}" start "$old" >/dev/null 2>&1 || fail "proxy: cannot start $old again"
      until_ok 60 follows "$old" "$new" || fail "proxy: $old, started again, does not follow $new"
      [ "$(proxy_status "$old" | python3 -c 'import json,sys; print(json.load(sys.stdin)["record"]["primary"])')" \
        = "$(proxy_status "$new" | python3 -c 'import json,sys; print(json.load(sys.stdin)["record"]["primary"])')" ] \
        || fail "proxy: the instances disagree on the recorded primary"
      say "proxy: ok (leader $old killed: a write through $new ${resumed} ms later, 0 of 50 page GETs failed, $new leads ${took} ms after the kill (TTL ${ttl} s); $old back as a follower)"
      ;;
    primary)
      fail_primary pg-primary pg-standby
      # While it is the only node, the page's reads come from it.
      until_ok 30 sh -c "curl -fsS -m 2 http://127.0.0.1:8080/ | grep -q 'pg-standby.*primary'" \
        || fail "primary: the page does not show pg-standby as the primary"
      restart_rejoins pg-primary pg-standby
      say "primary: ok (writes resumed ${resumed} ms after the kill; pg-primary, started again, streams from pg-standby ${back} s later, unfenced)"
      ;;
    second)
      # The second failure: whichever node is primary now is killed, the other takes over.
      old=$(elected)
      case $old in
        pg-primary) new=pg-standby ;;
        pg-standby) new=pg-primary ;;
        *) fail "second: no elected primary (dbproxy says '$old')" ;;
      esac
      fail_and_rejoin "$old" "$new"
      say "second: ok (the second failure: $old killed, writes resumed on $new ${resumed} ms later; $old streams from $new ${back} s after its start)"
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
