//! The "dbproxy restarted during failover" drill for `bench/failover.sh restart` (issue 16): a
//! real primary + 2 standbys (testkit), the `dbproxy` binary in front of them (a process of its
//! own, so it can be `kill -9`ed) with its default health and failover settings plus a state
//! directory and the built-in automatic rejoin (`rewind`), writers inserting through it. Two
//! failures per drill, each with dbproxy killed in the middle:
//!
//! 1. **during the promotion**: `kill -9` the primary, then `kill -9` dbproxy as soon as `/status`
//!    shows the failover under way (the primary fenced, or a promotion recorded), and start it
//!    again (same ports, same cluster record);
//! 2. **while the promoted node is unreachable**: once the node killed before is back as a
//!    standby, `kill -9` the primary; after the failover `kill -9` dbproxy, `kill -9` the promoted
//!    node, start the old primary again (a primary of the old timeline: what discovery alone
//!    would elect), and start dbproxy again.
//!
//! Measured per failure: the outage's start (the first kill of a primary) to the first write
//! acknowledged by the node elected at the end, acknowledgements via dbproxy from a node after it
//! was fenced (the old primary from the moment the failover fenced it; the killed promoted node
//! from its kill), and what the old primary's surviving backends acknowledged between the kill and
//! the fence. Per drill: acknowledged writes lost (missing from the last primary), standbys at the
//! start and at the end (after the automatic rejoins).
//!
//! ```text
//! cargo build --release -p dbproxy --bin dbproxy --example restart_drill
//! target/release/examples/restart_drill --drills 3 --modes async,sync --json out.json
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use dbproxy::config::{Config, HealthConfig};
use dbproxy::rejoin::RejoinMethod;
use serde_json::{json, Value};
use testkit::PgCluster;

#[path = "support/drill.rs"]
#[allow(dead_code)] // the in-process `Proxy`: this drill runs the binary
mod drill;
#[path = "support/writers.rs"]
#[allow(dead_code)] // `failovers` is the chain drill's
mod writers;
use drill::{fmt_pair, median_max, poll_until, status_at, Mode, PASSWORD};
use writers::{
    epoch_ms, error_summary, lock, ms, start_writers, streaming_from, Log, Writers, CONNECT_LIMIT,
    STATEMENT_LIMIT,
};

const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long after a kill a write must be acknowledged by the node elected in the end.
const WRITE_LIMIT: Duration = Duration::from_secs(60);
/// How long a killed node may take to be back as a standby.
const REJOIN_LIMIT: Duration = Duration::from_secs(120);
/// How often `/status` is asked while waiting for the failover to begin.
const FAST_POLL: Duration = Duration::from_millis(5);

/// Kill dbproxy in the middle of failovers, under write load, and start it again.
#[derive(Debug, Parser)]
struct Args {
    /// Drills (of two failures each) per mode.
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
    /// The dbproxy binary (default: `dbproxy` beside the directory of this example).
    #[arg(long)]
    dbproxy: Option<PathBuf>,
    /// Where to write the raw numbers as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A line to add to the report (repeatable).
    #[arg(long)]
    note: Vec<String>,
}

/// The dbproxy process, started again on the same ports and configuration.
struct Daemon {
    bin: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
}

impl Daemon {
    fn start(&mut self) -> Result<()> {
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        if !poll_until(Instant::now() + READY_LIMIT, || self.status().is_ok()) {
            bail!("dbproxy did not answer /status within {READY_LIMIT:?}");
        }
        Ok(())
    }

    /// `kill -9`, and the wait for the process to be gone.
    fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    fn status(&self) -> Result<Value> {
        status_at(self.admin)
    }

    /// The elected primary's index, if any.
    fn elected(&self) -> Option<usize> {
        self.status().ok()?["primary"].as_u64().map(|p| p as usize)
    }

    fn conn_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres \
             application_name=restart-drill connect_timeout=5",
            self.addr.port()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// A loopback port free now (dbproxy must come back on the same one).
fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The first acknowledgement by node port `port` of a write sent at or after `t`.
fn first_ack(log: &Mutex<Log>, port: i32, t: Instant) -> Option<Instant> {
    lock(log)
        .acks
        .iter()
        .filter(|a| a.port == port && a.sent >= t)
        .map(|a| a.acked)
        .min()
}

/// Acknowledgements by node port `port` at or after `from_ms` (since the epoch).
fn acks_from(log: &Mutex<Log>, port: i32, from_ms: u64) -> usize {
    lock(log)
        .acks
        .iter()
        .filter(|a| a.port == port && a.acked_ms >= from_ms)
        .count()
}

/// Waits until node `i` is an unfenced standby streaming from node `p`.
fn rejoined(c: &PgCluster, d: &Daemon, i: usize, p: usize, deadline: Instant) -> bool {
    poll_until(deadline, || {
        d.status().is_ok_and(|s| s["nodes"][i]["fenced"] == false)
            && streaming_from(c, p).iter().any(|n| n == c.node(i).name())
    })
}

/// One drill of the two failures; returns its raw numbers.
fn drill(rt: &tokio::runtime::Runtime, args: &Args, bin: &Path, mode: Mode, n: usize) -> Result<Value> {
    let c = PgCluster::builder()
        .standbys(2)
        .synchronous(mode == Mode::Sync)
        .password(PASSWORD)
        .start()
        .context("starting the cluster")?;
    c.primary()
        .psql("create table drill(id bigint primary key, writer int)")?;
    c.wait_replicated()?;
    let dir = tempfile::tempdir()?;
    let (addr, admin) = (free_addr()?, free_addr()?);
    let mut cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some(PASSWORD));
    cfg.listen = addr.to_string();
    cfg.admin_listen = admin.to_string();
    cfg.state_dir = dir.path().join("state").display().to_string();
    cfg.health = HealthConfig {
        password: PASSWORD.into(),
        ..Default::default()
    };
    for (i, node) in cfg.nodes.iter_mut().enumerate() {
        node.data_dir = c.node(i).data_dir().display().to_string();
    }
    cfg.failover.rejoin.method = RejoinMethod::Rewind;
    cfg.failover.rejoin.automatic = true;
    let config = dir.path().join("dbproxy.toml");
    std::fs::write(&config, toml::to_string(&cfg)?)?;
    let mut d = Daemon {
        bin: bin.to_path_buf(),
        config,
        addr,
        admin,
        child: None,
    };
    d.start()?;
    let ready = poll_until(Instant::now() + READY_LIMIT, || {
        d.elected() == Some(0) && streaming_from(&c, 0).len() == 2
    });
    if !ready {
        bail!("dbproxy did not elect node0 with 2 streaming standbys within {READY_LIMIT:?}");
    }
    let standbys_start = streaming_from(&c, 0).len();

    let Writers { log, stop, handles } =
        start_writers(rt, args.writers, &d.conn_string(), READY_LIMIT, args.load).map_err(|e| anyhow!(e))?;
    let port = |i: usize| c.node(i).port() as i32;
    let mut failures = Vec::new();
    let mut rounds = Vec::new();

    // 1. dbproxy killed while it promotes.
    let kill_at = Instant::now();
    let kill_wall = epoch_ms(SystemTime::now());
    c.node(0).kill9().context("kill -9 of node0")?;
    let mut seen = Value::Null;
    let began = poll_fast(kill_at + Duration::from_secs(30), || {
        let Ok(s) = d.status() else { return false };
        let under_way = s["nodes"][0]["fenced"] == true || !s["record"]["operation"].is_null();
        if under_way {
            seen = s;
        }
        under_way
    });
    let fenced_seen = epoch_ms(SystemTime::now());
    d.kill9()?;
    let stage = if !began {
        "no failover seen within 30 s".to_string()
    } else if seen["primary"].as_u64().is_some_and(|p| p != 0) {
        "after the switch".to_string()
    } else if !seen["record"]["operation"].is_null() {
        format!("promotion recorded ({})", seen["record"]["operation"])
    } else {
        "primary fenced, promotion not yet recorded".to_string()
    };
    d.start()?;
    let mut p1 = None;
    poll_until(kill_at + WRITE_LIMIT, || {
        p1 = d.elected().filter(|&p| p != 0);
        p1.is_some_and(|p| first_ack(&log, port(p), kill_at).is_some())
    });
    let mut r1 = json!({"failure": 1, "what": "dbproxy killed during the promotion", "stage": stage,
        "ms_kill_to_dbproxy_kill": fenced_seen.saturating_sub(kill_wall)});
    let p1 = match p1.and_then(|p| first_ack(&log, port(p), kill_at).map(|t| (p, t))) {
        Some((p, t)) => {
            r1["promoted"] = json!(c.node(p).name());
            r1["kill_to_first_write_ms"] = json!(ms(kill_at, t));
            Some(p)
        }
        None => {
            failures.push(format!(
                "failure 1: no write acknowledged by a new primary within {WRITE_LIMIT:?}"
            ));
            None
        }
    };
    // The old primary is fenced no later than when /status showed the failover under way.
    let fence1 = seen["nodes"][0]["fenced"]
        .as_bool()
        .filter(|f| *f)
        .map(|_| fenced_seen)
        .unwrap_or(kill_wall);
    r1["writes_on_fenced_nodes"] = json!(acks_from(&log, port(0), fence1));
    r1["old_primary_writes_between_kill_and_fence"] = json!(lock(&log)
        .acks
        .iter()
        .filter(|a| a.port == port(0) && a.acked >= kill_at && a.acked_ms < fence1)
        .count());
    rounds.push(r1);

    // 2. dbproxy killed, and the node it promoted killed while it is down.
    if let Some(p1) = p1 {
        if !rejoined(&c, &d, 0, p1, Instant::now() + REJOIN_LIMIT) {
            failures.push(format!(
                "node0 not back as a standby of node{p1} within {REJOIN_LIMIT:?}"
            ));
        } else {
            d.kill9()?;
            let outage = Instant::now();
            let outage_wall = epoch_ms(SystemTime::now());
            c.node(p1).kill9().context("kill -9 of the promoted node")?;
            d.start()?;
            let mut r2 = json!({"failure": 2, "what": "dbproxy killed, then the primary it promoted; dbproxy started again"});
            let s = d.status()?;
            r2["primary_at_start"] = s["primary"].clone();
            let mut p2 = None;
            poll_until(outage + WRITE_LIMIT, || {
                p2 = d.elected().filter(|&p| p != p1);
                p2.is_some_and(|p| first_ack(&log, port(p), outage).is_some())
            });
            match p2.and_then(|p| first_ack(&log, port(p), outage).map(|t| (p, t))) {
                Some((p, t)) => {
                    r2["promoted"] = json!(c.node(p).name());
                    r2["kill_to_first_write_ms"] = json!(ms(outage, t));
                    if !rejoined(&c, &d, p1, p, Instant::now() + REJOIN_LIMIT) {
                        failures.push(format!(
                            "node{p1} not back as a standby of node{p} within {REJOIN_LIMIT:?}"
                        ));
                    }
                }
                None => failures.push(format!(
                    "failure 2: no write acknowledged by a new primary within {WRITE_LIMIT:?}"
                )),
            }
            // The killed node is lost from its kill; the old primary of failure 1 stays fenced
            // until it rejoined (counted from its fence above).
            r2["writes_on_fenced_nodes"] = json!(acks_from(&log, port(p1), outage_wall));
            r2["old_primary_writes_between_kill_and_fence"] = json!(0);
            rounds.push(r2);
        }
    }

    let last = d.elected().unwrap_or(0);
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
        standbys_end = streaming_from(&c, last).len();
        standbys_end >= standbys_start
    });
    let stored: Option<HashSet<i64>> = c
        .node(last)
        .psql_timeout("select id from drill", Duration::from_secs(30))
        .ok()
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect());
    if stored.is_none() {
        failures.push(format!("could not read node{last}"));
    }
    d.kill9()?;
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
        "last_primary": c.node(last).name(),
        "standbys_start": standbys_start,
        "standbys_end": standbys_end,
        "acked_total": l.acks.len(),
        "lost": lost,
        "errors": l.errors,
    }))
}

/// [`poll_until`] with a short period: the failover's first steps take milliseconds.
fn poll_fast(deadline: Instant, mut f: impl FnMut() -> bool) -> bool {
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(FAST_POLL);
    }
}

fn col(ds: &[&Value], round: u64, k: &str) -> Vec<f64> {
    ds.iter()
        .flat_map(|d| d["failures"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["failure"] == round)
        .filter_map(|r| r[k].as_f64())
        .collect()
}

fn total(ds: &[&Value], k: &str) -> u64 {
    ds.iter()
        .flat_map(|d| d["failures"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r[k].as_u64())
        .sum()
}

fn sum(ds: &[&Value], k: &str) -> u64 {
    ds.iter().filter_map(|d| d[k].as_u64()).sum()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.writers == 0 || args.drills == 0 || args.modes.is_empty() {
        bail!("--writers, --drills and --modes must not be empty or zero");
    }
    let bin = match &args.dbproxy {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("dbproxy"))
            .ok_or_else(|| anyhow!("cannot tell where the dbproxy binary is: pass --dbproxy"))?,
    };
    if !bin.exists() {
        bail!(
            "{} does not exist: build it (cargo build --release -p dbproxy) or pass --dbproxy",
            bin.display()
        );
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
            let rec = drill(&rt, &args, &bin, mode, n).unwrap_or_else(
                |e| json!({"mode": mode.as_str(), "drill": n, "ok": false, "failure": [format!("{e:#}")]}),
            );
            eprintln!(
                "[restart] {} drill {n}: ok {}, failures {}, acked {}, lost {}, standbys {} → {}, errors {} ({:.1} s){}",
                mode.as_str(),
                rec["ok"],
                rec["failures"],
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
    line("# dbproxy restarted during failover: `kill -9` of dbproxy in the middle of two failovers".into());
    line(String::new());
    line(format!(
        "- {}; {} cores; primary + 2 standbys (testkit, loopback); {} writers through the dbproxy \
         binary; dbproxy defaults (health period {} s, timeout {} s, max_retries {}) plus a \
         `state_dir` and `failover.rejoin.method = \"rewind\"`, `automatic = true`",
        common::time::Civil::from(started).iso_seconds(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        args.writers,
        health.period,
        health.timeout,
        health.max_retries,
    ));
    for note in &args.note {
        line(format!("- note: {note}"));
    }
    line(
        "- failure 1: `kill -9` of the primary, `kill -9` of dbproxy as soon as `/status` shows the \
          failover under way, dbproxy started again; failure 2 (once the first killed node is back \
          as a standby): `kill -9` of dbproxy, then of the primary it promoted, dbproxy started \
          again. kill → first write = from the kill that began the outage to the first \
          acknowledgement by the node elected in the end; writes on a fenced node = \
          acknowledgements via dbproxy from the old primary after it was fenced and from the \
          killed promoted node after its kill; \
          before the fence = what the killed postmaster's surviving backends acknowledged between \
          the kill and the fence (the node was still the elected primary); times in ms"
            .into(),
    );
    line(String::new());
    line("| mode | drills ok | kill → first write, killed while promoting p50 / max | kill → first write, promoted node down p50 / max | acked | lost | writes on a fenced node | before the fence | standbys start → end | client errors |".into());
    line("|---|---|---|---|---|---|---|---|---|---|".into());
    let mut met = true;
    let mut verdict = Vec::new();
    for &mode in &args.modes {
        let ds: Vec<&Value> = results.iter().filter(|r| r["mode"] == mode.as_str()).collect();
        let ok = ds.iter().filter(|d| d["ok"] == true).count();
        let f1 = median_max(col(&ds, 1, "kill_to_first_write_ms"));
        let f2 = median_max(col(&ds, 2, "kill_to_first_write_ms"));
        let fenced = total(&ds, "writes_on_fenced_nodes");
        let (s0, s1) = (sum(&ds, "standbys_start"), sum(&ds, "standbys_end"));
        let lost = sum(&ds, "lost");
        let errors = error_summary(ds.iter().copied());
        line(format!(
            "| {} | {ok}/{} | {} | {} | {} | {lost} | {fenced} | {} | {s0} → {s1} | {} |",
            mode.as_str(),
            ds.len(),
            fmt_pair(f1),
            fmt_pair(f2),
            sum(&ds, "acked_total"),
            total(&ds, "old_primary_writes_between_kill_and_fence"),
            if errors.is_empty() { "none" } else { &errors },
        ));
        let lost_ok = mode == Mode::Async || lost == 0;
        met &= fenced == 0 && s0 == s1 && ok == ds.len() && lost_ok;
        verdict.push(format!(
            "{}: {fenced} writes on a fenced node, standbys {s0} → {s1}, {ok}/{} drills ok{}",
            mode.as_str(),
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
    line("| mode | drill | # | dbproxy killed at | promoted | kill → first write | writes on a fenced node | before the fence |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    let show = |v: &Value| match v {
        Value::Null => "–".to_string(),
        Value::String(s) => s.replace('|', "/"),
        Value::Number(n) => n.as_f64().map(|f| format!("{f:.0}")).unwrap_or_default(),
        v => v.to_string(),
    };
    for d in &results {
        for r in d["failures"].as_array().into_iter().flatten() {
            let at = if r["failure"] == 1 {
                format!(
                    "{} ({} ms after the kill)",
                    show(&r["stage"]),
                    show(&r["ms_kill_to_dbproxy_kill"])
                )
            } else {
                "before the primary's kill".to_string()
            };
            line(format!(
                "| {} | {} | {} | {at} | {} | {} | {} | {} |",
                show(&d["mode"]),
                show(&d["drill"]),
                show(&r["failure"]),
                show(&r["promoted"]),
                show(&r["kill_to_first_write_ms"]),
                show(&r["writes_on_fenced_nodes"]),
                show(&r["old_primary_writes_between_kill_and_fence"]),
            ));
        }
        for f in d["failure"].as_array().into_iter().flatten() {
            line(format!(
                "| {} | {} | – | failed: {} | | | | |",
                show(&d["mode"]),
                show(&d["drill"]),
                show(f)
            ));
        }
    }
    line(String::new());
    line(format!(
        "**Verdict: goals {}** (0 writes on a fenced node, as many standbys at the end as at the start, every drill ok, 0 acknowledged writes lost in sync mode). {}.",
        if met { "met" } else { "NOT met" },
        verdict.join("; ")
    ));
    print!("{md}");
    if let Some(path) = &args.json {
        let doc = json!({
            "benchmark": "failover-restart",
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
