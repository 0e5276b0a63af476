//! The chain drill for `bench/failover.sh chain` (issue 16, seed 003): a real primary + 2 standbys
//! (testkit), dbproxy in-process with its default health and failover settings plus the built-in
//! automatic rejoin (`failover.rejoin.method = "rewind"`, `automatic = true`, each node's
//! `data_dir`), writers inserting through it; then the current primary is `kill -9`ed three times
//! in a row, each time after the previously killed node is back as a streaming, unfenced standby.
//!
//! Measured per failure: kill to the first write acknowledged by the promoted node, kill to the
//! killed node back as a standby, and writes that reached the killed (fenced) node from a writer
//! that connects to it directly from the kill until it is a standby again. Per drill: acknowledged
//! writes lost (missing from the last primary), standbys at the start and at the end.
//!
//! ```text
//! cargo run --release -p dbproxy --example chain_drill -- --drills 3 --modes async,sync \
//!     --json bench/results/failover-chain.json
//! ```

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dbproxy::config::{Config, HealthConfig};
use dbproxy::rejoin::RejoinMethod;
use serde_json::{json, Value};
use testkit::PgCluster;
use tokio_util::sync::CancellationToken;

#[path = "support/drill.rs"]
mod drill;
#[path = "support/writers.rs"]
mod writers;
use drill::{fmt_pair, median_max, poll_until, Mode, Proxy, PASSWORD};
use writers::{
    error_summary, failovers, lock, ms, start_writers, streaming_from, writer, Log, Writers, CONNECT_LIMIT,
    STATEMENT_LIMIT,
};

/// Failures per drill.
const FAILURES: usize = 3;
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long after a kill the failover must show up in `/status`.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// How long after a kill the promoted node must acknowledge a write.
const WRITE_LIMIT: Duration = Duration::from_secs(45);
/// How long after a kill the killed node may take to be back as a standby.
const REJOIN_LIMIT: Duration = Duration::from_secs(120);

/// Kill the primary three times in a row under write load through dbproxy, with automatic rejoin.
#[derive(Debug, Parser)]
struct Args {
    /// Drills (of three failures each) per mode.
    #[arg(long, default_value_t = 3)]
    drills: usize,
    /// Replication modes to drill, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "async,sync")]
    modes: Vec<Mode>,
    /// Concurrent writers through dbproxy.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Seconds of write load before the first kill.
    #[arg(long, default_value_t = 1.0)]
    load: f64,
    /// Where to write the raw numbers as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A line to add to the report (repeatable).
    #[arg(long)]
    note: Vec<String>,
}

/// One failure of the chain: what was measured.
struct Failure {
    record: Value,
    promoted: Option<usize>,
    failure: Option<String>,
}

/// Kills the current primary `victim`, waits for the failover, the first write on the promoted
/// node and the victim back as a standby, with a writer going to the victim directly meanwhile.
fn one_failure(
    rt: &tokio::runtime::Runtime,
    c: &PgCluster,
    proxy: &Proxy,
    log: &Arc<Mutex<Log>>,
    victim: usize,
    round: usize,
) -> Result<Failure> {
    let old = c.node(victim);
    let old_port = old.port() as i32;
    let kill_at = Instant::now();
    let kill_wall = SystemTime::now();
    old.kill9().context("kill -9 of the primary")?;
    let dead_at = Instant::now();
    // A client that goes to the old primary directly, bypassing dbproxy.
    let direct_log = Arc::new(Mutex::new(Log::default()));
    let direct_stop = CancellationToken::new();
    let direct = rt.spawn(writer(
        100 + round as i32,
        format!("{} connect_timeout=2", old.conn_string()),
        direct_log.clone(),
        direct_stop.clone(),
    ));
    let mut rec = json!({"round": round, "killed": old.name(), "kill9_call_ms": ms(kill_at, dead_at)});
    let mut promoted = None;
    let mut failure = None;
    let mut event = Value::Null;
    poll_until(kill_at + FAILOVER_LIMIT, || {
        if let Ok(s) = proxy.status() {
            if let Some(e) = failovers(&s).get(round - 1) {
                event = e.clone();
            }
        }
        !event.is_null()
    });
    let name = event["promoted"].as_str().unwrap_or_default().to_string();
    if let Some(p) = c.nodes().iter().position(|n| n.name() == name) {
        promoted = Some(p);
        let port = c.node(p).port() as i32;
        let mut first = None;
        poll_until(kill_at + WRITE_LIMIT, || {
            first = lock(log)
                .acks
                .iter()
                .filter(|a| a.port == port && a.sent >= kill_at)
                .map(|a| a.acked)
                .min();
            first.is_some()
        });
        rec["promoted"] = json!(name);
        rec["kill_to_first_write_ms"] = json!(first.map(|t| ms(kill_at, t)));
        if first.is_none() {
            failure = Some(format!("no write acknowledged by {name} within {WRITE_LIMIT:?}"));
        }
        let back = poll_until(kill_at + REJOIN_LIMIT, || {
            let unfenced = proxy
                .status()
                .is_ok_and(|s| s["nodes"][victim]["fenced"] == false);
            unfenced && streaming_from(c, p).iter().any(|n| n == old.name())
        });
        rec["kill_to_back_as_standby_ms"] = json!(back.then(|| ms(kill_at, Instant::now())));
        if !back && failure.is_none() {
            failure = Some(format!(
                "{} not back as a standby within {REJOIN_LIMIT:?}",
                old.name()
            ));
        }
    } else {
        failure = Some(format!(
            "no failover within {FAILOVER_LIMIT:?} of killing {}",
            old.name()
        ));
    }
    direct_stop.cancel();
    let limit = STATEMENT_LIMIT + CONNECT_LIMIT;
    let _ = rt.block_on(async { tokio::time::timeout(limit, direct).await });
    let d = lock(&direct_log);
    let fenced_direct = d.acks.iter().filter(|a| a.acked >= dead_at).count();
    // Through dbproxy, the killed node is fenced from the moment the failover fenced it in the
    // routing (`fenced` in the event; from the kill when the event lacks it). Until then it is
    // still the elected primary, and its backends can outlive the postmaster's SIGKILL: what they
    // acknowledge between the kill and the fence is counted apart (lost in async mode).
    let fenced_ms = event["fenced"]["ms"].as_u64();
    let (before_fence, via_proxy) = lock(log)
        .acks
        .iter()
        .filter(|a| a.port == old_port && a.acked >= dead_at)
        .fold((0, 0), |(b, v), a| match fenced_ms {
            Some(f) if a.acked_ms < f => (b + 1, v),
            _ => (b, v + 1),
        });
    rec["direct_writes_on_fenced_node"] = json!(fenced_direct);
    rec["proxy_writes_on_fenced_node"] = json!(via_proxy);
    rec["old_primary_writes_between_kill_and_fence"] = json!(before_fence);
    rec["kill_to_fence_ms"] = json!(fenced_ms.map(|f| f as f64 - writers::epoch_ms(kill_wall) as f64));
    rec["direct_errors"] = json!(d.errors);
    rec["failure"] = json!(failure);
    Ok(Failure {
        record: rec,
        promoted,
        failure,
    })
}

/// One drill of three failures; returns its raw numbers.
fn drill(rt: &tokio::runtime::Runtime, args: &Args, mode: Mode, n: usize) -> Result<Value> {
    let c = PgCluster::builder()
        .standbys(2)
        .synchronous(mode == Mode::Sync)
        .password(PASSWORD)
        .start()
        .context("starting the cluster")?;
    c.primary()
        .psql("create table drill(id bigint primary key, writer int)")?;
    c.wait_replicated()?;
    let mut cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some(PASSWORD));
    cfg.health = HealthConfig {
        password: PASSWORD.into(),
        ..Default::default()
    };
    for (i, node) in cfg.nodes.iter_mut().enumerate() {
        node.data_dir = c.node(i).data_dir().display().to_string();
    }
    cfg.failover.rejoin.method = RejoinMethod::Rewind;
    cfg.failover.rejoin.automatic = true;
    let mut proxy = Proxy::start(cfg)?;
    let ready = poll_until(Instant::now() + READY_LIMIT, || {
        proxy.status().is_ok_and(|s| s["primary"] == 0) && streaming_from(&c, 0).len() == 2
    });
    if !ready {
        bail!("dbproxy did not elect node0 with 2 streaming standbys within {READY_LIMIT:?}");
    }
    let standbys_start = streaming_from(&c, 0).len();

    let Writers { log, stop, handles } = start_writers(
        rt,
        args.writers,
        &proxy.conn_string("chain-drill"),
        READY_LIMIT,
        args.load,
    )
    .map_err(|e| anyhow::anyhow!(e))?;

    let mut primary = 0;
    let mut rounds = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=FAILURES {
        let f = one_failure(rt, &c, &proxy, &log, primary, round)?;
        eprintln!(
            "[chain] {} drill {n} failure {round}: killed node{primary}, promoted {}, kill → first write {} ms, \
             kill → back as a standby {} ms, writes on the fenced node {} direct / {} via dbproxy \
             ({} acknowledged by the old primary between the kill and its fence, {} ms after the kill)",
            mode.as_str(),
            f.record["promoted"],
            f.record["kill_to_first_write_ms"],
            f.record["kill_to_back_as_standby_ms"],
            f.record["direct_writes_on_fenced_node"],
            f.record["proxy_writes_on_fenced_node"],
            f.record["old_primary_writes_between_kill_and_fence"],
            f.record["kill_to_fence_ms"],
        );
        rounds.push(f.record);
        if let Some(e) = f.failure {
            failures.push(format!("failure {round}: {e}"));
        }
        match f.promoted {
            Some(p) if failures.is_empty() => primary = p,
            _ => break,
        }
    }
    // A write after the last failure, then stop.
    let t_end = Instant::now();
    poll_until(t_end + WRITE_LIMIT, || {
        lock(&log).acks.iter().any(|a| a.sent >= t_end)
    });
    stop.cancel();
    let _ = rt.block_on(async {
        tokio::time::timeout(
            STATEMENT_LIMIT + CONNECT_LIMIT,
            futures_util::future::join_all(handles),
        )
        .await
    });
    let mut standbys_end = 0;
    poll_until(Instant::now() + Duration::from_secs(30), || {
        standbys_end = streaming_from(&c, primary).len();
        standbys_end >= standbys_start
    });
    let stored: Option<HashSet<i64>> = c
        .node(primary)
        .psql_timeout("select id from drill", Duration::from_secs(30))
        .ok()
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect());
    if stored.is_none() {
        failures.push(format!("could not read node{primary}"));
    }
    let proxy_stopped = proxy.stop();
    if !proxy_stopped {
        failures.push("dbproxy did not stop in time".into());
    }
    drop(proxy);
    let l = lock(&log);
    let lost = stored
        .as_ref()
        .map(|s| l.acks.iter().filter(|a| !s.contains(&a.id)).count());
    Ok(json!({
        "mode": mode.as_str(),
        "drill": n,
        "ok": failures.is_empty(),
        "failure": failures,
        "failures": rounds,
        "last_primary": c.node(primary).name(),
        "standbys_start": standbys_start,
        "standbys_end": standbys_end,
        "acked_total": l.acks.len(),
        "lost": lost,
        "errors": l.errors,
    }))
}

fn sum(ds: &[&Value], k: &str) -> u64 {
    ds.iter().filter_map(|d| d[k].as_u64()).sum()
}

/// Sum of a per-failure count over drills.
fn sum_rounds(ds: &[&Value], k: &str) -> u64 {
    ds.iter()
        .flat_map(|d| d["failures"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r[k].as_u64())
        .sum()
}

fn rounds_col(ds: &[&Value], k: &str) -> Vec<f64> {
    ds.iter()
        .flat_map(|d| d["failures"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r[k].as_f64())
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.writers == 0 || args.drills == 0 || args.modes.is_empty() {
        bail!("--writers, --drills and --modes must not be empty or zero");
    }
    common::telemetry::init(common::telemetry::LogFormat::Text, "dbproxy=warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = SystemTime::now();
    let mut results = Vec::new();
    for &mode in &args.modes {
        for n in 1..=args.drills {
            let t = Instant::now();
            let rec = drill(&rt, &args, mode, n).unwrap_or_else(
                |e| json!({"mode": mode.as_str(), "drill": n, "ok": false, "failure": [format!("{e:#}")]}),
            );
            eprintln!(
                "[chain] {} drill {n}: ok {}, acked {}, lost {}, standbys {} → {}, errors {} ({:.1} s){}",
                mode.as_str(),
                rec["ok"],
                rec["acked_total"],
                rec["lost"],
                rec["standbys_start"],
                rec["standbys_end"],
                rec["errors"],
                t.elapsed().as_secs_f64(),
                rec["failure"]
                    .as_array()
                    .filter(|f| !f.is_empty())
                    .map(|f| format!("; failure: {f:?}"))
                    .unwrap_or_default(),
            );
            results.push(rec);
        }
    }
    let health = HealthConfig::default();
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("# Chain drill: the primary `kill -9`ed three times in a row, automatic rejoin (rewind) on".into());
    line(String::new());
    line(format!(
        "- {}; {} cores; primary + 2 standbys (testkit, loopback); {} writers through dbproxy; \
         dbproxy defaults (health period {} s, timeout {} s, max_retries {}, fall {}) plus \
         `failover.rejoin.method = \"rewind\"`, `automatic = true`",
        common::time::Civil::from(started).iso_seconds(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        args.writers,
        health.period,
        health.timeout,
        health.max_retries,
        health.fall,
    ));
    for note in &args.note {
        line(format!("- note: {note}"));
    }
    line(
        "- each kill is of the current primary, once the node killed before is back as a streaming, \
          unfenced standby; kill → first write = first acknowledgement by the promoted node of a write \
          sent after the kill; fenced writes = acknowledgements from the killed node to a writer \
          connecting to it directly, from the return of `kill -9` until it is a standby again, and via \
          dbproxy from the moment the failover fenced it in the routing (the event's `fenced` time); \
          before the fence = acknowledgements via dbproxy by the killed postmaster's surviving \
          backends between the kill and the fence, while the node was still the elected primary (the \
          postmaster's SIGKILL does not end its backends at once; in async mode they are lost, in \
          sync mode they wait for a standby); lost = acknowledged ids missing from the last primary; \
          times in ms"
            .into(),
    );
    line(String::new());
    line("| mode | drills ok | failures | kill → first write p50 / max | kill → back as standby p50 / max | acked | lost | writes on a fenced node (direct / via dbproxy) | before the fence | standbys start → end | client errors |".into());
    line("|---|---|---|---|---|---|---|---|---|---|---|".into());
    let mut met = true;
    let mut verdict = Vec::new();
    for &mode in &args.modes {
        let ds: Vec<&Value> = results.iter().filter(|r| r["mode"] == mode.as_str()).collect();
        let ok = ds.iter().filter(|d| d["ok"] == true).count();
        let first = median_max(rounds_col(&ds, "kill_to_first_write_ms"));
        let back = median_max(rounds_col(&ds, "kill_to_back_as_standby_ms"));
        let (direct, via) = (
            sum_rounds(&ds, "direct_writes_on_fenced_node"),
            sum_rounds(&ds, "proxy_writes_on_fenced_node"),
        );
        let (s0, s1) = (sum(&ds, "standbys_start"), sum(&ds, "standbys_end"));
        let lost = sum(&ds, "lost");
        let errors = error_summary(ds.iter().copied());
        line(format!(
            "| {} | {ok}/{} | {} | {} | {} | {} | {lost} | {direct} / {via} | {} | {s0} → {s1} | {} |",
            mode.as_str(),
            ds.len(),
            rounds_col(&ds, "kill9_call_ms").len(),
            fmt_pair(first),
            fmt_pair(back),
            sum(&ds, "acked_total"),
            sum_rounds(&ds, "old_primary_writes_between_kill_and_fence"),
            if errors.is_empty() { "none" } else { &errors },
        ));
        let p50_ok = first.is_some_and(|(p, _)| p <= 1000.0);
        let lost_ok = mode == Mode::Async || lost == 0;
        met &= p50_ok && direct + via == 0 && s0 == s1 && ok == ds.len() && lost_ok;
        verdict.push(format!(
            "{}: p50 {} 1000 ms, {} writes on a fenced node, standbys {s0} → {s1}, {ok}/{} drills ok{}",
            mode.as_str(),
            if p50_ok { "≤" } else { "NOT ≤" },
            direct + via,
            ds.len(),
            if mode == Mode::Sync {
                format!(", {lost} lost")
            } else {
                String::new()
            }
        ));
    }
    line(String::new());
    line("Per failure:".into());
    line(String::new());
    line("| mode | drill | # | killed | promoted | kill → first write | kill → back as standby | fenced writes direct / via dbproxy | before the fence (kill → fence ms) | failure |".into());
    line("|---|---|---|---|---|---|---|---|---|---|".into());
    let show = |v: &Value| match v {
        Value::Null => "–".to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(|f| format!("{f:.0}")).unwrap_or_default(),
        v => v.to_string(),
    };
    for d in &results {
        for r in d["failures"].as_array().into_iter().flatten() {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} ({}) | {} |",
                show(&d["mode"]),
                show(&d["drill"]),
                show(&r["round"]),
                show(&r["killed"]),
                show(&r["promoted"]),
                show(&r["kill_to_first_write_ms"]),
                show(&r["kill_to_back_as_standby_ms"]),
                show(&r["direct_writes_on_fenced_node"]),
                show(&r["proxy_writes_on_fenced_node"]),
                show(&r["old_primary_writes_between_kill_and_fence"]),
                show(&r["kill_to_fence_ms"]),
                show(&r["failure"]).replace('|', "/"),
            ));
        }
    }
    line(String::new());
    line(format!(
        "**Verdict: goals {}** (kill → first write p50 ≤ 1 s, 0 writes on a fenced node, as many standbys at the end as at the start, 0 acknowledged writes lost in sync mode). {}.",
        if met { "met" } else { "NOT met" },
        verdict.join("; ")
    ));
    print!("{md}");
    if let Some(path) = &args.json {
        let doc = json!({
            "benchmark": "failover-chain",
            "started": common::time::Civil::from(started).iso_seconds(),
            "commit": std::env::var("BENCH_COMMIT").ok(),
            "notes": args.note,
            "settings": {"drills": args.drills, "writers": args.writers, "load_before_first_kill_s": args.load},
            "goals_met": met,
            "drills": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
