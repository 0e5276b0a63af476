//! Failover drills for `bench/failover.sh`: a real primary + standbys (testkit), dbproxy in-process
//! with its default health settings, N writers inserting through it, then `kill -9` of the primary;
//! measures detection, promotion, kill-to-first-write and acknowledged writes lost, prints markdown
//! tables and writes every drill's raw numbers as JSON.
//!
//! ```text
//! cargo run --release -p dbproxy --example failover_drill -- --drills 10 --modes async,sync \
//!     --standbys 1 --writers 4 --json bench/results/failover.json
//! ```
//!
//! Each writer has its own connection through dbproxy and loops over a prepared
//! `insert into drill values ($1, $2) returning inet_server_port()`, so every acknowledgement also
//! says which server committed it. Ids are never reused (an attempt whose outcome is unknown may
//! have committed). A write counts as acknowledged when its result row arrived; "lost" means
//! acknowledged but missing from the promoted node afterwards.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dbproxy::config::{Config, HealthConfig};
use serde_json::{json, Value};
use testkit::PgCluster;
use tokio_util::sync::CancellationToken;

#[path = "support/drill.rs"]
mod drill;
use drill::{fmt_pair, median_max, poll_until, Mode, Proxy, PASSWORD, POLL};

/// How long the cluster and dbproxy may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long after the kill a completed failover must show up in `/status`.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// How long after the kill the writers may go on at most.
const WRITE_LIMIT: Duration = Duration::from_secs(45);
/// One statement's time limit; a write that hangs (e.g. on a vanished synchronous standby) fails by it.
const STATEMENT_LIMIT: Duration = Duration::from_secs(5);
/// One connection attempt's time limit.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Pause between failed connection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// Kill the PostgreSQL primary under write load through dbproxy, several times, and report.
#[derive(Debug, Parser)]
struct Args {
    /// Drills per mode.
    #[arg(long, default_value_t = 10)]
    drills: usize,
    /// Replication modes to drill, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "async,sync")]
    modes: Vec<Mode>,
    /// Standbys besides the primary.
    #[arg(long, default_value_t = 1)]
    standbys: usize,
    /// Concurrent writers, each with its own connection through dbproxy.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Seconds of write load before the kill.
    #[arg(long, default_value_t = 1.5)]
    load: f64,
    /// Seconds the writers go on after the first write acknowledged by the new primary.
    #[arg(long, default_value_t = 2.0)]
    after: f64,
    /// Where to write the raw numbers as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A line to add to the report (repeatable), e.g. what else ran on the machine.
    #[arg(long)]
    note: Vec<String>,
}

/// One acknowledged write.
struct Ack {
    id: i64,
    /// `inet_server_port()` of the server that committed it.
    port: i32,
    sent: Instant,
    acked: Instant,
}

/// One error a writer saw.
struct ClientError {
    at: Instant,
    kind: String,
    message: String,
}

/// Everything the writers saw, shared with the driver.
#[derive(Default)]
struct Log {
    acks: Vec<Ack>,
    errors: Vec<ClientError>,
    /// Successful connections (the first of each writer included).
    connects: usize,
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// A short, stable name for an error: its SQLSTATE, else what happened.
fn error_kind(e: &tokio_postgres::Error, connecting: bool) -> String {
    let base = match e.code() {
        Some(c) => c.code().to_string(),
        None if e.is_closed() => "closed".to_string(),
        None if connecting => "failed".to_string(),
        None => "io".to_string(),
    };
    if connecting {
        format!("connect {base}")
    } else {
        base
    }
}

fn error_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

const INSERT: &str = "insert into drill values ($1, $2) returning inet_server_port()";

async fn connect(
    conn: &str,
) -> Result<(tokio_postgres::Client, tokio_postgres::Statement), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let stmt = client.prepare(INSERT).await?;
    Ok((client, stmt))
}

/// One writer: insert, record, reconnect when the connection is gone; until `stop` or `deadline`.
async fn writer(
    w: i32,
    conn: String,
    log: Arc<Mutex<Log>>,
    stop: CancellationToken,
    deadline: tokio::time::Instant,
) {
    let mut counter: i64 = 0;
    let mut session: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    while !stop.is_cancelled() && tokio::time::Instant::now() < deadline {
        let Some((client, stmt)) = &session else {
            let err = match tokio::time::timeout(CONNECT_LIMIT, connect(&conn)).await {
                Ok(Ok(s)) => {
                    session = Some(s);
                    lock(&log).connects += 1;
                    continue;
                }
                Ok(Err(e)) => (error_kind(&e, true), error_message(&e)),
                Err(_) => ("connect timeout".to_string(), format!("{CONNECT_LIMIT:?}")),
            };
            lock(&log).errors.push(ClientError {
                at: Instant::now(),
                kind: err.0,
                message: err.1,
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            }
            continue;
        };
        let id = i64::from(w) * 1_000_000_000 + counter;
        counter += 1;
        let sent = Instant::now();
        let r = tokio::time::timeout(STATEMENT_LIMIT, client.query_one(stmt, &[&id, &w])).await;
        let acked = Instant::now();
        match r {
            Ok(Ok(row)) => {
                let port: i32 = row.try_get(0).unwrap_or(-1);
                lock(&log).acks.push(Ack {
                    id,
                    port,
                    sent,
                    acked,
                });
            }
            Ok(Err(e)) => {
                let closed = client.is_closed();
                lock(&log).errors.push(ClientError {
                    at: acked,
                    kind: error_kind(&e, false),
                    message: error_message(&e),
                });
                if closed {
                    session = None;
                }
            }
            Err(_) => {
                lock(&log).errors.push(ClientError {
                    at: acked,
                    kind: "statement timeout".into(),
                    message: format!("no answer within {STATEMENT_LIMIT:?}"),
                });
                session = None;
            }
        }
    }
}

fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds from `a` to `b` (negative when `b` is earlier).
fn ms_between(a: Instant, b: Instant) -> f64 {
    if b >= a {
        ms(b - a)
    } else {
        -ms(a - b)
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| f.join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

/// The first failover event in a `/status` document that completed, or the last failed one.
fn failover_event(status: &Value) -> Option<(Value, usize)> {
    let history = status.get("history")?.as_array()?;
    let failovers: Vec<&Value> = history
        .iter()
        .filter(|e| e.get("kind").and_then(Value::as_str) == Some("failover"))
        .collect();
    let ok = failovers.iter().find(|e| {
        e.get("error").is_none_or(Value::is_null) && e.get("promoted").is_some_and(|p| !p.is_null())
    });
    ok.map(|e| ((*e).clone(), failovers.len()))
}

fn failed_failovers(status: &Value) -> Vec<Value> {
    status
        .get("history")
        .and_then(Value::as_array)
        .map(|h| {
            h.iter()
                .filter(|e| {
                    e.get("kind").and_then(Value::as_str) == Some("failover")
                        && !e.get("error").is_none_or(Value::is_null)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until dbproxy has elected node 0 and sees every standby streaming (and, in sync mode,
/// one of them synchronous), so a candidate exists when the primary dies.
fn wait_ready(proxy: &Proxy, standbys: usize, mode: Mode) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    let mut last = Value::Null;
    loop {
        if let Ok(s) = proxy.status() {
            let nodes = s
                .get("nodes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let field = |n: &Value, k: &str| n.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let all_up = nodes.len() == standbys + 1 && nodes.iter().all(|n| field(n, "status") == "up");
            let streaming = nodes
                .iter()
                .skip(1)
                .all(|n| field(n, "replication_state") == "streaming");
            let sync_ok = mode == Mode::Async
                || nodes
                    .iter()
                    .skip(1)
                    .any(|n| field(n, "replication_sync_state") == "sync");
            if s.get("primary").and_then(Value::as_u64) == Some(0) && all_up && streaming && sync_ok {
                return Ok(());
            }
            last = s;
        }
        if Instant::now() > deadline {
            bail!("dbproxy not ready within {READY_LIMIT:?}; last /status: {last}");
        }
        std::thread::sleep(POLL);
    }
}

/// One drill; returns its raw numbers (with `"ok": false` and `"failure"` when it went wrong).
fn drill(rt: &tokio::runtime::Runtime, args: &Args, mode: Mode, n: usize) -> Result<Value> {
    let cluster = PgCluster::builder()
        .standbys(args.standbys)
        .synchronous(mode == Mode::Sync)
        .password(PASSWORD)
        .start()
        .context("starting the cluster")?;
    cluster
        .primary()
        .psql("create table drill(id bigint primary key, writer int)")?;
    cluster.wait_replicated()?;
    let nodes = cluster.nodes();
    let mut cfg = Config::loopback(nodes.iter().map(|n| (n.name(), n.port())), Some(PASSWORD));
    // The defaults are what is measured: only the checker's password differs.
    cfg.health = HealthConfig {
        password: PASSWORD.into(),
        ..Default::default()
    };
    let mut proxy = Proxy::start(cfg)?;
    wait_ready(&proxy, args.standbys, mode)?;

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let write_deadline = tokio::time::Instant::from_std(started + READY_LIMIT + WRITE_LIMIT);
    let handles: Vec<_> = (0..args.writers)
        .map(|w| {
            rt.spawn(writer(
                w as i32,
                proxy.conn_string("failover-drill"),
                log.clone(),
                stop.clone(),
                write_deadline,
            ))
        })
        .collect();
    let stop_writers = |stop: &CancellationToken| {
        stop.cancel();
        rt.block_on(async {
            tokio::time::timeout(
                STATEMENT_LIMIT + CONNECT_LIMIT,
                futures_util::future::join_all(handles),
            )
            .await
        })
        .is_ok()
    };
    // Every writer connected and wrote once, then the load runs for `args.load` seconds.
    let writing = poll_until(Instant::now() + READY_LIMIT, || {
        let l = lock(&log);
        let mut seen = HashSet::new();
        for a in &l.acks {
            seen.insert(a.id / 1_000_000_000);
        }
        seen.len() == args.writers
    });
    if !writing {
        stop_writers(&stop);
        let l = lock(&log);
        let errs: Vec<String> = l
            .errors
            .iter()
            .take(5)
            .map(|e| format!("{}: {}", e.kind, e.message))
            .collect();
        bail!("the writers did not all get a write through before the kill; errors: {errs:?}");
    }
    let load_from = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.load));
    let load_secs = load_from.elapsed().as_secs_f64();

    // SIGKILL is sent somewhere inside kill9(), which first lists the postmaster's children from
    // /proc and then reaps it (together 5-55 ms on this busy machine). Times are measured from
    // the call's start, so they are upper bounds; "after the kill" for the old primary's
    // acknowledgements means after the call returned, when the postmaster was surely gone.
    let old = cluster.node(0);
    let old_port = old.port() as i32;
    let kill_wall = SystemTime::now();
    let kill_at = Instant::now();
    old.kill9().context("killing the primary")?;
    let dead_at = Instant::now();
    let acks_before = lock(&log).acks.iter().filter(|a| a.acked < kill_at).count();
    eprintln!(
        "[failover] {} drill {n}: killed {} ({} writes acknowledged before)",
        mode.as_str(),
        old.name(),
        acks_before
    );

    // Wait for the failover to show up in /status.
    let mut event: Option<(Value, usize)> = None;
    let mut last_status = Value::Null;
    let seen = poll_until(kill_at + FAILOVER_LIMIT, || {
        if let Ok(s) = proxy.status() {
            event = failover_event(&s);
            last_status = s;
        }
        event.is_some()
    });
    let failed_events = failed_failovers(&last_status);
    let promoted_name = event
        .as_ref()
        .and_then(|(e, _)| e.get("promoted").and_then(Value::as_str).map(str::to_string));
    let promoted = promoted_name
        .as_deref()
        .and_then(|name| nodes.iter().find(|n| n.name() == name));

    // Keep writing until `args.after` seconds after the new primary's first acknowledgement.
    let first_new_ack = |l: &Log, port: i32| {
        l.acks
            .iter()
            .filter(|a| a.port == port && a.sent >= kill_at)
            .map(|a| a.acked)
            .min()
    };
    let mut resumed_at = None;
    if let Some(p) = promoted {
        let port = p.port() as i32;
        poll_until(kill_at + WRITE_LIMIT, || {
            resumed_at = first_new_ack(&lock(&log), port);
            resumed_at.is_some()
        });
        if let Some(t) = resumed_at {
            let until = t + Duration::from_secs_f64(args.after);
            poll_until(until.min(kill_at + WRITE_LIMIT), || Instant::now() >= until);
        }
    }
    let writers_stopped = stop_writers(&stop);
    let end_at = Instant::now();

    // What the promoted node holds.
    let stored: Option<HashSet<i64>> = match promoted {
        Some(p) => {
            let conn = p.conn_string();
            let rows = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), async {
                    let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
                    let task = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    let rows = c.query("select id from drill", &[]).await;
                    drop(c);
                    let _ = task.await;
                    rows
                })
                .await
            });
            match rows {
                Ok(Ok(rows)) => Some(rows.iter().map(|r| r.get::<_, i64>(0)).collect()),
                Ok(Err(e)) => {
                    eprintln!("[failover] reading the promoted node: {e}");
                    None
                }
                Err(_) => {
                    eprintln!("[failover] reading the promoted node timed out");
                    None
                }
            }
        }
        None => None,
    };
    let proxy_stopped = proxy.stop();
    drop(proxy);

    let l = lock(&log);
    let acked: HashSet<i64> = l.acks.iter().map(|a| a.id).collect();
    let lost: Option<Vec<i64>> = stored.as_ref().map(|s| {
        let mut v: Vec<i64> = acked.difference(s).copied().collect();
        v.sort_unstable();
        v
    });
    let unacked_stored = stored.as_ref().map(|s| s.difference(&acked).count());
    let late_old_acks = l
        .acks
        .iter()
        .filter(|a| a.port == old_port && a.acked >= dead_at)
        .count();
    let old_sent_after = l
        .acks
        .iter()
        .filter(|a| a.port == old_port && a.sent >= dead_at)
        .count();
    let old_last_ack = l
        .acks
        .iter()
        .filter(|a| a.port == old_port && a.acked >= dead_at)
        .map(|a| ms_between(dead_at, a.acked))
        .reduce(f64::max);
    let lost_late = lost.as_ref().map(|lost| {
        let lost: HashSet<i64> = lost.iter().copied().collect();
        l.acks
            .iter()
            .filter(|a| lost.contains(&a.id) && a.acked >= dead_at)
            .count()
    });
    // When the lost writes were acknowledged, relative to the start of the kill.
    let lost_window = lost.as_ref().and_then(|lost| {
        let lost: HashSet<i64> = lost.iter().copied().collect();
        let at: Vec<f64> = l
            .acks
            .iter()
            .filter(|a| lost.contains(&a.id))
            .map(|a| ms_between(kill_at, a.acked))
            .collect();
        let first = at.iter().copied().reduce(f64::min)?;
        let last = at.iter().copied().reduce(f64::max)?;
        Some(json!({"first_ms": first, "last_ms": last}))
    });
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples: BTreeMap<String, String> = BTreeMap::new();
    for e in &l.errors {
        *errors.entry(e.kind.clone()).or_default() += 1;
        samples.entry(e.kind.clone()).or_insert_with(|| e.message.clone());
    }
    let errors_before_kill = l.errors.iter().filter(|e| e.at < kill_at).count();
    let error_window = {
        let after: Vec<f64> = l
            .errors
            .iter()
            .filter(|e| e.at >= kill_at)
            .map(|e| ms_between(kill_at, e.at))
            .collect();
        if after.is_empty() {
            Value::Null
        } else {
            json!({
                "first_ms": after.iter().copied().fold(f64::INFINITY, f64::min),
                "last_ms": after.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            })
        }
    };
    // Per writer: its first write after the kill that the new primary acknowledged.
    let per_writer: Vec<Option<f64>> = (0..args.writers as i64)
        .map(|w| {
            let port = promoted.map(|p| p.port() as i32)?;
            l.acks
                .iter()
                .filter(|a| a.id / 1_000_000_000 == w && a.port == port && a.sent >= kill_at)
                .map(|a| ms_between(kill_at, a.acked))
                .reduce(f64::min)
        })
        .collect();
    let all_writers = if per_writer.iter().all(Option::is_some) {
        per_writer.iter().flatten().copied().reduce(f64::max)
    } else {
        None
    };
    let ev = event.as_ref().map(|(e, _)| e.clone()).unwrap_or(Value::Null);
    let at_ms = |k: &str| ev.get(k).and_then(|v| v.get("ms")).and_then(Value::as_f64);
    let kill_ms = epoch_ms(kill_wall);
    let detection = at_ms("detected").map(|d| d - kill_ms);
    let promotion = match (at_ms("detected"), at_ms("promoted_at")) {
        (Some(d), Some(p)) => Some(p - d),
        _ => None,
    };
    let resumption = match (at_ms("detected"), at_ms("resumed")) {
        (Some(d), Some(r)) => Some(r - d),
        _ => None,
    };
    let kill_to_first_write = resumed_at.map(|t| ms_between(kill_at, t));
    let mut failure = Vec::new();
    if !seen {
        failure.push(format!(
            "no completed failover in /status within {FAILOVER_LIMIT:?}"
        ));
    }
    if event.is_some() && resumed_at.is_none() {
        failure.push(format!(
            "no write acknowledged by the new primary within {WRITE_LIMIT:?}"
        ));
    }
    if event.is_some() && stored.is_none() {
        failure.push("could not read the promoted node".into());
    }
    if !writers_stopped {
        failure.push("writers did not stop in time".into());
    }
    if !proxy_stopped {
        failure.push("dbproxy did not stop in time".into());
    }
    let rec = json!({
        "mode": mode.as_str(),
        "drill": n,
        "ok": failure.is_empty(),
        "failure": failure,
        "killed": old.name(),
        "kill_epoch_ms": kill_ms,
        "kill9_call_ms": ms_between(kill_at, dead_at),
        "kill_to_first_write_from_kill9_return_ms": resumed_at.map(|t| ms_between(dead_at, t)),
        "lost_acked_window_ms": lost_window,
        "old_primary_acks_sent_after_kill9_return": old_sent_after,
        "old_primary_last_ack_after_kill9_return_ms": old_last_ack,
        "promoted": promoted_name,
        "detection_ms": detection,
        "promotion_ms": promotion,
        "detection_to_resumption_ms": resumption,
        "kill_to_first_write_ms": kill_to_first_write,
        "kill_to_all_writers_ms": all_writers,
        "per_writer_first_write_ms": per_writer,
        "load_before_kill_s": load_secs,
        "acked_before_kill": acks_before,
        "writes_per_s_before_kill": acks_before as f64 / load_secs.max(1e-9),
        "acked_total": l.acks.len(),
        "acked_by_old_primary_after_kill9_return": late_old_acks,
        "lost": lost.as_ref().map(Vec::len),
        "lost_acked_after_kill9_return": lost_late,
        "lost_ids_sample": lost.as_ref().map(|v| v.iter().take(20).copied().collect::<Vec<_>>()),
        "stored_but_unacknowledged": unacked_stored,
        "connects": l.connects,
        "reconnects": l.connects.saturating_sub(args.writers),
        "errors": errors,
        "error_samples": samples,
        "errors_before_kill": errors_before_kill,
        "error_window_after_kill": error_window,
        "failover_events": event.as_ref().map(|(_, n)| *n).unwrap_or(0),
        "failed_failover_events": failed_events,
        "event": ev,
        "duration_after_kill_s": (end_at - kill_at).as_secs_f64(),
    });
    drop(l);
    drop(cluster);
    Ok(rec)
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

fn fmt_errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    let mut v: Vec<(&String, &u64)> = errors.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k}×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn drill_errors(d: &Value) -> BTreeMap<String, u64> {
    d.get("errors")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The summary of one mode's drills.
struct Summary {
    drills: usize,
    failed_over: usize,
    detection: Option<(f64, f64)>,
    promotion: Option<(f64, f64)>,
    first_write: Option<(f64, f64)>,
    acked: u64,
    lost: u64,
    lost_unknown: usize,
    errors: BTreeMap<String, u64>,
}

fn summarize(drills: &[&Value]) -> Summary {
    let col = |k: &str| -> Vec<f64> { drills.iter().filter_map(|d| f(d, k)).collect() };
    let mut errors = BTreeMap::new();
    for d in drills {
        for (k, n) in drill_errors(d) {
            *errors.entry(k).or_default() += n;
        }
    }
    Summary {
        drills: drills.len(),
        failed_over: drills
            .iter()
            .filter(|d| d.get("promoted").is_some_and(|p| !p.is_null()))
            .count(),
        detection: median_max(col("detection_ms")),
        promotion: median_max(col("promotion_ms")),
        first_write: median_max(col("kill_to_first_write_ms")),
        acked: drills
            .iter()
            .filter_map(|d| d.get("acked_total").and_then(Value::as_u64))
            .sum(),
        lost: drills
            .iter()
            .filter_map(|d| d.get("lost").and_then(Value::as_u64))
            .sum(),
        lost_unknown: drills
            .iter()
            .filter(|d| d.get("lost").is_none_or(Value::is_null))
            .count(),
        errors,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.standbys == 0 {
        bail!("--standbys must be at least 1: a failover needs a standby");
    }
    if args.writers == 0 || args.drills == 0 || args.modes.is_empty() {
        bail!("--writers, --drills and --modes must not be empty or zero");
    }
    common::telemetry::init(common::telemetry::LogFormat::Text, "dbproxy=warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let health = HealthConfig::default();
    let failover = dbproxy::failover::FailoverConfig::default();
    let load_start = loadavg();
    let started = SystemTime::now();
    let pg_version = {
        let c = PgCluster::builder().start()?;
        c.primary().psql("show server_version")?
    };

    let mut results: Vec<Value> = Vec::new();
    for &mode in &args.modes {
        for n in 1..=args.drills {
            let t = Instant::now();
            let rec = match drill(&rt, &args, mode, n) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("[failover] {} drill {n} failed: {e:#}", mode.as_str());
                    json!({"mode": mode.as_str(), "drill": n, "ok": false, "failure": [format!("{e:#}")]})
                }
            };
            eprintln!(
                "[failover] {} drill {n}: detection {} ms, promotion {} ms, kill→first write {} ms, \
                 acked {}, lost {}, errors {} ({:.1} s)",
                mode.as_str(),
                fmt_ms(f(&rec, "detection_ms")),
                fmt_ms(f(&rec, "promotion_ms")),
                fmt_ms(f(&rec, "kill_to_first_write_ms")),
                rec.get("acked_total").unwrap_or(&Value::Null),
                rec.get("lost").unwrap_or(&Value::Null),
                fmt_errors(&drill_errors(&rec)),
                t.elapsed().as_secs_f64()
            );
            results.push(rec);
        }
    }
    let load_end = loadavg();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);

    // ---- report ----
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("# Failover drills: `kill -9` of the PostgreSQL primary under write load through dbproxy".into());
    line(String::new());
    line(format!(
        "- machine: {cores} cores (nproc), load average {load_start} at start, {load_end} at the end; \
         PostgreSQL {pg_version} (testkit: loopback, fsync off); {}",
        common::time::Civil::from(started).iso_seconds()
    ));
    for note in &args.note {
        line(format!("- note: {note}"));
    }
    line(format!(
        "- dbproxy health (defaults): period {} s, timeout {} s, max_retries {}, retry_delay {} s, rise {}, fall {}; \
         failover: enabled {}, promotion `{}`, session_wait {} s, follow {}",
        health.period,
        health.timeout,
        health.max_retries,
        health.retry_delay,
        health.rise,
        health.fall,
        failover.enabled,
        serde_json::to_value(failover.default.method)?.as_str().unwrap_or("?"),
        failover.session_wait,
        failover.follow,
    ));
    line(format!(
        "- cluster: primary + {} standby(s); load: {} writers, one connection each through dbproxy, \
         prepared `{INSERT}` in a loop, reconnecting every {} ms when a connection is gone; \
         kill after {} s of load; writing goes on {} s past the new primary's first acknowledgement",
        args.standbys,
        args.writers,
        RECONNECT_PAUSE.as_millis(),
        args.load,
        args.after
    ));
    let kill9 = median_max(results.iter().filter_map(|r| f(r, "kill9_call_ms")).collect());
    line(format!(
        "- kill = the start of testkit's `kill9()`, which lists the postmaster's children, sends SIGKILL \
         and reaps it (p50 / max {} ms here), so every time from the kill is an upper bound by up to that much; \
         detection = dbproxy's `detected` − kill; promotion = `promoted_at` − `detected`; \
         kill → first write = first acknowledgement by the promoted node; \
         old primary acks after kill = acknowledgements from the old primary after `kill9()` returned; \
         lost = acknowledged ids missing from the promoted node afterwards; times in ms, p50 = median",
        fmt_pair(kill9)
    ));
    line(String::new());
    line("| mode | drills (failed over) | detection p50 / max | promotion p50 / max | kill → first write p50 / max | acked writes | lost | client errors |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    let mut summaries = Vec::new();
    for &mode in &args.modes {
        let ds: Vec<&Value> = results
            .iter()
            .filter(|r| r.get("mode").and_then(Value::as_str) == Some(mode.as_str()))
            .collect();
        let s = summarize(&ds);
        line(format!(
            "| {} | {} ({}) | {} | {} | {} | {} | {}{} | {} |",
            mode.as_str(),
            s.drills,
            s.failed_over,
            fmt_pair(s.detection),
            fmt_pair(s.promotion),
            fmt_pair(s.first_write),
            s.acked,
            s.lost,
            if s.lost_unknown > 0 {
                format!(" ({} drills unchecked)", s.lost_unknown)
            } else {
                String::new()
            },
            fmt_errors(&s.errors)
        ));
        summaries.push((mode, s));
    }
    line(String::new());
    line("Per drill:".into());
    line(String::new());
    line("| mode | # | promoted | detection | promotion | detection → resumed | kill → first write | kill → all writers | acked | old primary acks after kill | lost | reconnects | client errors | failure |".into());
    line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into());
    for r in &results {
        let s = |k: &str| match r.get(k) {
            Some(Value::Null) | None => "–".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        let failure = r
            .get("failure")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_str)
                    .map(|s| s.replace('|', "/").replace('\n', " "))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        line(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s("mode"),
            s("drill"),
            s("promoted"),
            fmt_ms(f(r, "detection_ms")),
            fmt_ms(f(r, "promotion_ms")),
            fmt_ms(f(r, "detection_to_resumption_ms")),
            fmt_ms(f(r, "kill_to_first_write_ms")),
            fmt_ms(f(r, "kill_to_all_writers_ms")),
            s("acked_total"),
            s("acked_by_old_primary_after_kill9_return"),
            s("lost"),
            s("reconnects"),
            fmt_errors(&drill_errors(r)),
            failure
        ));
    }
    line(String::new());
    // Verdict against issue 4's goals.
    let mut verdict = Vec::new();
    let mut met = true;
    for (mode, s) in &summaries {
        let p50_ok = s.first_write.is_some_and(|(p50, _)| p50 <= 2000.0);
        let max_ok = s.first_write.is_some_and(|(_, max)| max <= 3000.0);
        let all_ok = s.failed_over == s.drills;
        let mut parts = vec![
            format!(
                "kill → first write p50 {} 2000 ms",
                if p50_ok { "≤" } else { "NOT ≤" }
            ),
            format!("max {} 3000 ms", if max_ok { "≤" } else { "NOT ≤" }),
            format!("{}/{} drills failed over", s.failed_over, s.drills),
        ];
        met &= p50_ok && max_ok && all_ok;
        if *mode == Mode::Sync {
            let lost_ok = s.lost == 0 && s.lost_unknown == 0;
            parts.push(format!(
                "{} acknowledged writes lost{}",
                s.lost,
                if s.lost_unknown > 0 {
                    " (some drills unchecked)"
                } else {
                    ""
                }
            ));
            met &= lost_ok;
        } else {
            parts.push(format!("{} acknowledged writes lost (measured, no goal)", s.lost));
        }
        verdict.push(format!("{}: {}", mode.as_str(), parts.join(", ")));
    }
    line(format!(
        "**Verdict: goals {}** (kill → first write p50 ≤ 2 s, max ≤ 3 s, 0 acknowledged writes lost in sync mode). {}.",
        if met { "met" } else { "NOT met" },
        verdict.join("; ")
    ));
    print!("{md}");

    if let Some(path) = &args.json {
        let doc = json!({
            "benchmark": "failover",
            "started": common::time::Civil::from(started).iso_seconds(),
            "machine": {"cores": cores, "loadavg_start": load_start, "loadavg_end": load_end},
            "notes": args.note,
            "postgresql": pg_version,
            "commit": std::env::var("BENCH_COMMIT").ok(),
            "settings": {
                "drills": args.drills,
                "modes": args.modes.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "standbys": args.standbys,
                "writers": args.writers,
                "load_before_kill_s": args.load,
                "after_first_write_s": args.after,
                "statement_limit_s": STATEMENT_LIMIT.as_secs_f64(),
                "reconnect_pause_ms": RECONNECT_PAUSE.as_millis() as u64,
                "health": serde_json::to_value(&health)?,
                "failover": serde_json::to_value(&failover)?,
            },
            "goals_met": met,
            "drills": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
