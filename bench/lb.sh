#!/usr/bin/env bash
# lb benchmark: the same two static backends served four ways (direct, nginx 1.22, HAProxy 2.6, lb),
# measured with oha at saturation (-c 64, -c 256) and at a fixed rate (half of nginx's maximum, with
# --latency-correction), each setup taking turns for ROUNDS rounds; plus lb's RSS while holding
# 1,000 concurrent keep-alive connections. Then TLS: HTTPS keep-alive (HTTP/1.1) and HTTP/2 over
# TLS against nginx, HAProxy and lb in the same run, with h2load (nghttp2-client), and each proxy's
# CPU time per request (user+system from /proc/PID/stat, over all its processes); a routed config
# (3 locations: prefix, `^~` prefix and regex, over 2 upstreams) read by nginx and by lb from the
# same nginx.conf, HAProxy with the same routes as ACLs; new TLS handshakes per second (h2load in
# rate mode: a new full handshake and one request per connection) with CPU per handshake; and lb's RSS while 1,000 TLS connections make requests. Prints markdown tables and
# writes them, with the raw numbers as JSON, to $OUT (default bench/results/).
#
# Needs: nginx-light, haproxy and nghttp2-client (Debian packages, installed here when missing
# and run as root), oha (`cargo install oha` when missing: ~11 minutes on 2 cores), python3,
# openssl. Knobs: ROUNDS (3), DURATION (8s), OUT, PORT_BASE (18100), TLS_ROUNDS (1),
# TLS_ONLY=1 (only the TLS rows, without oha).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
OUT=${OUT:-$ROOT/bench/results}
PORT_BASE=${PORT_BASE:-18100}
B1=$((PORT_BASE + 1)) B2=$((PORT_BASE + 2))
P_NGINX=$((PORT_BASE + 10)) P_HAPROXY=$((PORT_BASE + 11)) P_LB=$((PORT_BASE + 12)) P_LB_ADMIN=$((PORT_BASE + 13))
T_NGINX=$((PORT_BASE + 20)) T_HAPROXY=$((PORT_BASE + 21)) T_LB=$((PORT_BASE + 22)) T_LB_ADMIN=$((PORT_BASE + 23))
R_NGINX=$((PORT_BASE + 30)) R_HAPROXY=$((PORT_BASE + 31)) R_LB=$((PORT_BASE + 32)) R_LB_ADMIN=$((PORT_BASE + 33))

log() { printf '[lb-bench] %s\n' "$*" >&2; }

install_missing() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      log "please install: ${missing[*]}"
      exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [[ -z ${TLS_ONLY:-} ]] && ! command -v oha >/dev/null; then
    log "installing oha with cargo (about 11 minutes on 2 cores)"
    cargo install oha --locked
  fi
  command -v python3 >/dev/null || { log "python3 is needed"; exit 1; }
}

install_missing
export PATH="$HOME/.cargo/bin:$PATH"
log "building lb (release)"
(cd "$ROOT" && cargo build --release -p lb --quiet)
LB_BIN="$ROOT/target/release/lb"

WORK=$(mktemp -d /tmp/lb-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$WORK"/*.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "nothing listens on port $1"
  exit 1
}

# --- the two static backends (one nginx worker each side, a fixed small body) -----------------
cat >"$WORK/backends.conf" <<EOF
worker_processes 1;
pid $WORK/backends.pid;
error_log $WORK/backends.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1; location / { return 200 "hello from b1\n"; } }
  server { listen 127.0.0.1:$B2; location / { return 200 "hello from b2\n"; } }
}
EOF
nginx -c "$WORK/backends.conf"
wait_port "$B1"
wait_port "$B2"

# --- nginx 1.22 as the proxy, tuned -------------------------------------------------------------
cat >"$WORK/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 128; }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:$T_NGINX ssl http2;
    ssl_certificate $WORK/bench.crt;
    ssl_certificate_key $WORK/bench.key;
    # nginx 1.22's default stops at TLS 1.2; lb and HAProxy speak 1.3, so nginx does too here.
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
# One self-signed P-256 certificate for the three TLS listeners.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench.test \
  -keyout "$WORK/bench.key" -out "$WORK/bench.crt" 2>/dev/null
cat "$WORK/bench.crt" "$WORK/bench.key" >"$WORK/bench.pem"
nginx -c "$WORK/nginx.conf"

# --- HAProxy 2.6 ----------------------------------------------------------------------------------
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 1500
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
frontend fe_tls
  bind 127.0.0.1:$T_HAPROXY ssl crt $WORK/bench.pem alpn h2,http/1.1
  default_backend be
backend be
  balance roundrobin
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
EOF
haproxy -f "$WORK/haproxy.cfg" -D -p "$WORK/haproxy.pid"

# --- lb -----------------------------------------------------------------------------------------
cat >"$WORK/lb.toml" <<EOF
listen = "127.0.0.1:$P_LB"
admin_listen = "127.0.0.1:$P_LB_ADMIN"
[upstream]
servers = [{ addr = "127.0.0.1:$B1" }, { addr = "127.0.0.1:$B2" }]
[limits]
upstream_keepalive = 128
[access_log]
enabled = false
EOF
RUST_LOG=warn "$LB_BIN" --config "$WORK/lb.toml" 2>"$WORK/lb.err" &
LB_PID=$!
PIDS+=("$LB_PID")
# lb terminating TLS: a process of its own, so its CPU time is the TLS runs' alone.
cat >"$WORK/lb-tls.toml" <<EOF
listen = "127.0.0.1:$((PORT_BASE + 24))"
admin_listen = "127.0.0.1:$T_LB_ADMIN"
[upstream]
name = "app"
servers = [{ addr = "127.0.0.1:$B1" }, { addr = "127.0.0.1:$B2" }]
[limits]
upstream_keepalive = 128
[access_log]
enabled = false
[[vhosts]]
[vhosts.tls]
listen = ["127.0.0.1:$T_LB"]
certificate = "$WORK/bench.crt"
key = "$WORK/bench.key"
[[vhosts.locations]]
path = "/"
proxy_pass = "http://app"
EOF
RUST_LOG=warn "$LB_BIN" --config "$WORK/lb-tls.toml" 2>"$WORK/lb-tls.err" &
LB_TLS_PID=$!
PIDS+=("$LB_TLS_PID")
# --- a routed config: 3 locations over 2 upstreams, the same nginx.conf for nginx and lb ---------
routed_conf() { # port pidfile
  cat <<EOF
worker_processes 2;
pid $2;
error_log $WORK/routed-$1.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 128; }
  upstream api { server 127.0.0.1:$B2; keepalive 128; }
  server {
    listen 127.0.0.1:$1;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location ^~ /api/ { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location ~* \.(css|js)$ { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
}
routed_conf "$R_NGINX" "$WORK/nginx-routed.pid" >"$WORK/nginx-routed.conf"
routed_conf "$R_LB" "$WORK/lb-routed.unused.pid" >"$WORK/lb-routed.conf"
nginx -c "$WORK/nginx-routed.conf"
cat >"$WORK/haproxy-routed.cfg" <<EOF
global
  nbthread 2
  maxconn 1500
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$R_HAPROXY
  acl api path_beg /api/
  acl assets path_reg -i \.(css|js)$
  use_backend api if api
  use_backend app if assets
  default_backend app
backend app
  balance roundrobin
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
backend api
  server b2 127.0.0.1:$B2
EOF
haproxy -f "$WORK/haproxy-routed.cfg" -D -p "$WORK/haproxy-routed.pid"
RUST_LOG=warn "$LB_BIN" --nginx-conf "$WORK/lb-routed.conf" --set "admin_listen=\"127.0.0.1:$R_LB_ADMIN\"" \
  --set access_log.enabled=false 2>"$WORK/lb-routed.err" &
LB_ROUTED_PID=$!
PIDS+=("$LB_ROUTED_PID")
for p in "$P_NGINX" "$P_HAPROXY" "$P_LB" "$T_NGINX" "$T_HAPROXY" "$T_LB"; do wait_port "$p"; done
for p in "$R_NGINX" "$R_HAPROXY" "$R_LB"; do wait_port "$p"; done

if [[ -z ${TLS_ONLY:-} ]]; then
declare -A URL=(
  [direct]="http://127.0.0.1:$B1/"
  [nginx]="http://127.0.0.1:$P_NGINX/"
  [haproxy]="http://127.0.0.1:$P_HAPROXY/"
  [lb]="http://127.0.0.1:$P_LB/"
)
SETUPS=(direct nginx haproxy lb)

if oha --help 2>/dev/null | grep -q -- '--output-format'; then
  OHA_JSON=(--output-format json)
else
  OHA_JSON=(-j)
fi

run_oha() { # setup mode round extra-args...
  local setup=$1 mode=$2 round=$3
  shift 3
  oha --no-tui "${OHA_JSON[@]}" -z "$DURATION" "$@" "${URL[$setup]}" >"$WORK/$setup.$mode.$round.json"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before the runs: $LOAD_START (other work on these 2 cores skews every setup)"
log "saturation: $ROUNDS rounds of ${SETUPS[*]} at -c 64 and -c 256, $DURATION each"
for round in $(seq 1 "$ROUNDS"); do
  for setup in "${SETUPS[@]}"; do
    run_oha "$setup" c64 "$round" -c 64
    run_oha "$setup" c256 "$round" -c 256
  done
done

RATE=$(python3 - "$WORK" <<'EOF'
import json, sys, glob, statistics
work = sys.argv[1]
rps = [json.load(open(f))["summary"]["requestsPerSec"] for f in glob.glob(f"{work}/nginx.c*.json")]
print(int(max(rps) / 2))
EOF
)
log "fixed rate: $RATE req/s (half of nginx's maximum) with --latency-correction"
for round in $(seq 1 "$ROUNDS"); do
  for setup in "${SETUPS[@]}"; do
    run_oha "$setup" rate "$round" -c 64 -q "$RATE" --latency-correction
  done
done

log "lb RSS at 1000 concurrent keep-alive connections"
RSS_PEAK=0
CONNS=0
oha --no-tui "${OHA_JSON[@]}" -z 6s -c 1000 -q 2000 "${URL[lb]}" >"$WORK/lb.rss.json" &
OHA_PID=$!
while kill -0 "$OHA_PID" 2>/dev/null; do
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$LB_PID/status")
  ((rss > RSS_PEAK)) && RSS_PEAK=$rss
  c=$(curl -s "http://127.0.0.1:$P_LB_ADMIN/metrics" | awk '/^lb_active_connections / {print $2}')
  ((${c:-0} > CONNS)) && CONNS=$c
  sleep 0.2
done
wait "$OHA_PID" || true
log "lb peak RSS ${RSS_PEAK} KiB"

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$OUT"
python3 - "$WORK" "$OUT" "$RATE" "$RSS_PEAK" "$ROUNDS" "$LOAD_START" "$LOAD_END" <<'EOF'
import json, sys, glob, statistics
work, out, rate, rss_kib, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
load_start, load_end = sys.argv[6], sys.argv[7]
setups = ["direct", "nginx", "haproxy", "lb"]
modes = [("c64", "-c 64"), ("c256", "-c 256"), ("rate", f"{rate}/s")]
res = {}
for s in setups:
    for m, _ in modes:
        runs = [json.load(open(f)) for f in sorted(glob.glob(f"{work}/{s}.{m}.*.json"))]
        if not runs:
            continue
        med = lambda xs: statistics.median(xs)
        res[(s, m)] = {
            "rps": med([r["summary"]["requestsPerSec"] for r in runs]),
            "p50_ms": med([r["latencyPercentiles"]["p50"] * 1000 for r in runs]),
            "p99_ms": med([r["latencyPercentiles"]["p99"] * 1000 for r in runs]),
            "success": min(r["summary"]["successRate"] for r in runs),
            "runs": len(runs),
        }
lines = [f"lb benchmark (median of {rounds} rounds; two static nginx backends; everything on loopback, 2 cores)", "",
         "| setup | load | req/s | p50 ms | p99 ms | added p99 ms | req/s vs nginx | added p99 vs nginx | success |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for m, label in modes:
    d, n = res.get(("direct", m)), res.get(("nginx", m))
    for s in setups:
        r = res.get((s, m))
        if not r:
            continue
        added = r["p99_ms"] - d["p99_ms"] if d else float("nan")
        r["added_p99_ms"] = added
        n_added = n["p99_ms"] - d["p99_ms"] if (n and d) else float("nan")
        ratio = r["rps"] / n["rps"] if n else float("nan")
        # nginx adding nothing measurable (its p99 at or below direct's) leaves no ratio to take.
        added_ratio = f"{added / n_added:.2f}x" if n_added > 0 else "n/a"
        lines.append(f"| {s} | {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{added:.2f} | {ratio:.2f}x | {added_ratio} | {r['success']*100:.1f}% |")
lines += ["", f"lb peak RSS at 1000 concurrent keep-alive connections: {rss_kib/1024:.1f} MB (goal: at most 30 MB)",
          "Goals: lb >= 1.1x nginx req/s at saturation; lb's added p99 <= nginx's.",
          f"Load average (1, 5, 15 min) before: {load_start}; after: {load_end}."]
table = "\n".join(lines)
print(table)
open(f"{out}/lb.md", "w").write(table + "\n")
json.dump({"rate": rate, "rss_kib": rss_kib, "loadavg_before": load_start, "loadavg_after": load_end, "results": {f"{s}.{m}": v for (s, m), v in res.items()}},
          open(f"{out}/lb.json", "w"), indent=2)
EOF
log "peak client connections lb reported during the RSS run: $CONNS"
log "wrote $OUT/lb.md and $OUT/lb.json"
fi

# --- TLS: HTTPS keep-alive (HTTP/1.1) and HTTP/2, h2load, CPU per request ----------------------
cpu_ticks() { # utime + stime (clock ticks) summed over the given processes
  local t=0 p
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    t=$((t + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo "$t"
}
NGINX_MASTER=$(cat "$WORK/nginx.pid")
read -r -a NGINX_PIDS <<<"$NGINX_MASTER $(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')"
HAPROXY_PID=$(cat "$WORK/haproxy.pid")
declare -A TURL=([nginx]="https://127.0.0.1:$T_NGINX/" [haproxy]="https://127.0.0.1:$T_HAPROXY/" [lb]="https://127.0.0.1:$T_LB/")
pids_of() { case $1 in nginx) echo "${NGINX_PIDS[@]}" ;; haproxy) echo "$HAPROXY_PID" ;; lb) echo "$LB_TLS_PID" ;; esac; }
SECS=${DURATION%s}
TLS_ROUNDS=${TLS_ROUNDS:-1}
# lb's memory while 1,000 TLS connections make requests (HTTP/1.1 keep-alive, h2load; 2,000
# requests/s in all, as the plain RSS run above), first, while its heap holds nothing of the
# other TLS runs.
log "lb RSS at 1000 concurrent TLS connections"
TLS_RSS_PEAK=0
TLS_CONNS=0
h2load --h1 -D 6 -c 1000 -m 1 --rps 2 "${TURL[lb]}" >"$WORK/lb.tls-rss.txt" 2>&1 &
H2LOAD_PID=$!
while kill -0 "$H2LOAD_PID" 2>/dev/null; do
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$LB_TLS_PID/status")
  ((rss > TLS_RSS_PEAK)) && TLS_RSS_PEAK=$rss
  c=$(curl -s "http://127.0.0.1:$T_LB_ADMIN/metrics" | awk '/^lb_active_connections / {print $2}')
  ((${c:-0} > TLS_CONNS)) && TLS_CONNS=$c
  sleep 0.2
done
wait "$H2LOAD_PID" || true
log "lb peak RSS ${TLS_RSS_PEAK} KiB with at most $TLS_CONNS client connections at once"
echo "$TLS_RSS_PEAK $TLS_CONNS" >"$WORK/lb.tls-rss"
TLS_LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "TLS: $TLS_ROUNDS round(s) of nginx haproxy lb, HTTPS/1.1 -c 64 and HTTP/2 -c 16 -m 16, ${SECS}s each"
for round in $(seq 1 "$TLS_ROUNDS"); do
  for setup in nginx haproxy lb; do
    for mode in h1 h2; do
      if [[ $mode == h1 ]]; then args=(--h1 -c 64 -m 1); else args=(-c 16 -m 16); fi
      # shellcheck disable=SC2046
      before=$(cpu_ticks $(pids_of "$setup"))
      h2load -D "$SECS" "${args[@]}" "${TURL[$setup]}" >"$WORK/$setup.tls-$mode.$round.txt" 2>&1 || true
      # shellcheck disable=SC2046
      after=$(cpu_ticks $(pids_of "$setup"))
      echo "$((after - before))" >"$WORK/$setup.tls-$mode.$round.ticks"
    done
  done
done
# The routed config over plain HTTP/1.1: h2load cycles through the three locations' URIs.
NGINX_R_MASTER=$(cat "$WORK/nginx-routed.pid")
read -r -a NGINX_R_PIDS <<<"$NGINX_R_MASTER $(pgrep -P "$NGINX_R_MASTER" | tr '\n' ' ')"
HAPROXY_R_PID=$(cat "$WORK/haproxy-routed.pid")
declare -A RBASE=([nginx]="http://127.0.0.1:$R_NGINX" [haproxy]="http://127.0.0.1:$R_HAPROXY" [lb]="http://127.0.0.1:$R_LB")
rpids_of() { case $1 in nginx) echo "${NGINX_R_PIDS[@]}" ;; haproxy) echo "$HAPROXY_R_PID" ;; lb) echo "$LB_ROUTED_PID" ;; esac; }
log "routed config: $TLS_ROUNDS round(s) of nginx haproxy lb, HTTP/1.1 -c 64 over /, /api/ and a .css"
for round in $(seq 1 "$TLS_ROUNDS"); do
  for setup in nginx haproxy lb; do
    b=${RBASE[$setup]}
    # shellcheck disable=SC2046
    before=$(cpu_ticks $(rpids_of "$setup"))
    h2load --h1 -D "$SECS" -c 64 -m 1 "$b/" "$b/api/items" "$b/static/app.css" \
      >"$WORK/$setup.tls-routed.$round.txt" 2>&1 || true
    # shellcheck disable=SC2046
    after=$(cpu_ticks $(rpids_of "$setup"))
    echo "$((after - before))" >"$WORK/$setup.tls-routed.$round.ticks"
  done
done

# New TLS handshakes: h2load in rate mode opens HS_CONNS connections, 400 every 100 ms (more than
# any of them can take), each doing a full handshake and one request before it closes.
HS_CONNS=${HS_CONNS:-3000}
log "TLS handshakes: $TLS_ROUNDS round(s) of nginx haproxy lb, $HS_CONNS new connections each"
for round in $(seq 1 "$TLS_ROUNDS"); do
  for setup in nginx haproxy lb; do
    # shellcheck disable=SC2046
    before=$(cpu_ticks $(pids_of "$setup"))
    h2load --h1 -c "$HS_CONNS" -n "$HS_CONNS" -r 400 --rate-period=100ms "${TURL[$setup]}" \
      >"$WORK/$setup.hs.$round.txt" 2>&1 || true
    # shellcheck disable=SC2046
    after=$(cpu_ticks $(pids_of "$setup"))
    echo "$((after - before))" >"$WORK/$setup.hs.$round.ticks"
  done
done

TLS_LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$OUT"
python3 - "$WORK" "$OUT" "$TLS_ROUNDS" "$(getconf CLK_TCK)" "$TLS_LOAD_START" "$TLS_LOAD_END" "$SECS" <<'EOF'
import json, re, sys, glob, statistics
work, out, rounds, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
load_start, load_end, secs = sys.argv[5], sys.argv[6], float(sys.argv[7])
res = {}
for s in ["nginx", "haproxy", "lb"]:
    for m in ["h1", "h2", "routed"]:
        rows = []
        for f in sorted(glob.glob(f"{work}/{s}.tls-{m}.*.txt")):
            text = open(f).read()
            rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text)
            done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
            lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
            ticks = int(open(f[:-4] + ".ticks").read())
            if not (rps and done):
                print(f"{f}: no result:\n{text[-500:]}", file=sys.stderr)
                continue
            ok = int(done.group(2))
            rows.append({"rps": float(rps.group(1)), "succeeded": ok, "done": int(done.group(1)),
                         "mean": lat.group(3) if lat else "?",
                         "cpu_us_per_req": ticks * 1e6 / hz / ok if ok else float("nan")})
        if rows:
            med = lambda k: statistics.median(r[k] for r in rows)
            res[f"{s}.{m}"] = {"rps": med("rps"), "cpu_us_per_req": med("cpu_us_per_req"),
                               "mean_latency": rows[0]["mean"],
                               "success": min(r["succeeded"] / r["done"] if r["done"] else 0 for r in rows)}
lines = [f"TLS (h2load, median of {rounds} round(s); self-signed P-256 certificate; everything on loopback, 2 cores;"
         " CPU is the proxy's own user+system time per successful request)", "",
         "| setup | protocol | req/s | mean latency | req/s vs nginx | CPU µs/request | CPU vs nginx | success |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
for m, label in [("h1", "HTTPS/1.1 keep-alive, -c 64"), ("h2", "HTTP/2 over TLS, -c 16 -m 16"),
                 ("routed", "routed config, HTTP/1.1 -c 64")]:
    n = res.get(f"nginx.{m}")
    for s in ["nginx", "haproxy", "lb"]:
        r = res.get(f"{s}.{m}")
        if not r:
            continue
        ratio = f"{r['rps'] / n['rps']:.2f}x" if n else "n/a"
        cpu_ratio = f"{r['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}x" if n else "n/a"
        lines.append(f"| {s} | {label} | {r['rps']:.0f} | {r['mean_latency']} | {ratio} | "
                     f"{r['cpu_us_per_req']:.1f} | {cpu_ratio} | {r['success']*100:.1f}% |")
# New TLS handshakes per second: one request per connection, so h2load's req/s.
hs = {}
for s in ["nginx", "haproxy", "lb"]:
    rows = []
    for f in sorted(glob.glob(f"{work}/{s}.hs.*.txt")):
        text = open(f).read()
        rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
        proto = re.search(r"TLS Protocol: (\S+)", text)
        if not (rps and done) or int(done.group(2)) == 0:
            print(f"{f}: no result:\n{text[-500:]}", file=sys.stderr)
            continue
        ticks = int(open(f[:-4] + ".ticks").read())
        rows.append({"per_s": float(rps.group(1)), "cpu_us": ticks * 1e6 / hz / int(done.group(2)),
                     "proto": proto.group(1) if proto else "?"})
    if rows:
        hs[s] = {"per_s": statistics.median(x["per_s"] for x in rows),
                 "cpu_us_per_handshake": statistics.median(x["cpu_us"] for x in rows),
                 "protocol": rows[0]["proto"]}
if hs:
    lines += ["", "New TLS handshakes (h2load rate mode: a new connection, full handshake and one request each)", "",
              "| setup | protocol | handshakes/s | vs nginx | CPU µs/handshake | CPU vs nginx |", "|---|---|---:|---:|---:|---:|"]
    n = hs.get("nginx")
    for s in ["nginx", "haproxy", "lb"]:
        if s in hs:
            h = hs[s]
            lines.append(f"| {s} | {h['protocol']} | {h['per_s']:.0f} | {h['per_s'] / n['per_s']:.2f}x | "
                         f"{h['cpu_us_per_handshake']:.0f} | {h['cpu_us_per_handshake'] / n['cpu_us_per_handshake']:.2f}x |" if n else
                         f"| {s} | {h['protocol']} | {h['per_s']:.0f} | n/a | {h['cpu_us_per_handshake']:.0f} | n/a |")
    res["handshakes"] = hs
try:
    rss_kib, conns = (int(x) for x in open(f"{work}/lb.tls-rss").read().split())
    lines += ["", f"lb peak RSS with 1000 concurrent TLS connections making requests: {rss_kib/1024:.1f} MB "
              f"(at most {conns} client connections seen at once; goal: at most 40 MB)"]
    res["tls_rss_kib"] = rss_kib
except (OSError, ValueError):
    pass
lines += ["", f"Load average (1, 5, 15 min) before: {load_start}; after: {load_end}."]
table = "\n".join(lines)
print(table)
open(f"{out}/lb-tls.md", "w").write(table + "\n")
json.dump(res, open(f"{out}/lb-tls.json", "w"), indent=2)
EOF
log "wrote $OUT/lb-tls.md and $OUT/lb-tls.json"
