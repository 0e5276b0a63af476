//! The two-instance drill for `bench/failover.sh --proxies 2` (issue 17): a real primary + standby
//! (testkit), a real one-member etcd, two `dbproxy` binaries (`a` leads, `b` follows) coordinated
//! through it with their default health settings, and writers whose connection strings list both
//! instances (libpq multi-host, `a` first). Three kinds of drill, each on a fresh cluster, in
//! asynchronous and synchronous replication:
//!
//! - **primary**: `kill -9` the primary; the leader promotes the standby;
//! - **leader**: `kill -9` the leader dbproxy; the writers move to `b`, which takes the lease;
//! - **both**: `kill -9` the primary, then at once the leader dbproxy; `b` takes the lease and
//!   promotes.
//!
//! Measured per drill: kill → first write (sent after the kill) acknowledged by the node that
//! should be primary, kill →
//! `b` holding the lease (leader and both), acknowledged writes missing from the primary at the
//! end, promotions (counted by the promotion command itself: 1 expected where the primary is
//! killed, 0 otherwise), and acknowledgements from the old primary after the first one from the
//! new (a write on a fenced node).
//!
//! ```text
//! cargo build --release -p dbproxy --bin dbproxy --example pair_drill
//! target/release/examples/pair_drill --drills 3 --modes async,sync --json out.json
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use dbproxy::config::{Config, HealthConfig};
use dbproxy::failover::{PromoteConfig, PromoteMethod};
use serde_json::{json, Value};
use testkit::etcd::EtcdCluster;
use testkit::PgCluster;

#[path = "support/drill.rs"]
#[allow(dead_code)] // the in-process `Proxy`: this drill runs the binary
mod drill;
#[path = "support/writers.rs"]
#[allow(dead_code)]
mod writers;
use drill::{fmt_pair, median_max, poll_until, status_at, Mode, PASSWORD};
use writers::{error_summary, lock, ms, start_writers, Log, Writers};

const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long after a kill a write must be acknowledged by the expected primary.
const WRITE_LIMIT: Duration = Duration::from_secs(60);

/// Kill the primary, the leader dbproxy, or both, under write load through a dbproxy pair.
#[derive(Debug, Parser)]
struct Args {
    /// Drills per kind.
    #[arg(long, default_value_t = 3)]
    drills: usize,
    /// Kinds of drill, comma separated: primary, leader, both.
    #[arg(long, value_delimiter = ',', default_value = "primary,leader,both")]
    kinds: Vec<String>,
    /// Replication modes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "async,sync")]
    modes: Vec<Mode>,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Seconds of write load before the kill.
    #[arg(long, default_value_t = 1.0)]
    load: f64,
    /// The leader lease's TTL in seconds (`coordination.lease_ttl`; dbproxy's default is 10).
    #[arg(long, default_value_t = 10)]
    ttl: u64,
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

/// One dbproxy process of the pair.
struct Daemon {
    addr: SocketAddr,
    admin: SocketAddr,
    child: Child,
}

impl Daemon {
    fn start(bin: &Path, cfg: &Config, dir: &Path, name: &str) -> Result<Daemon> {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(cfg)?)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let d = Daemon {
            addr: cfg.listen.parse()?,
            admin: cfg.admin_listen.parse()?,
            child,
        };
        if !poll_until(Instant::now() + READY_LIMIT, || status_at(d.admin).is_ok()) {
            bail!("dbproxy {name} did not answer /status within {READY_LIMIT:?}");
        }
        Ok(d)
    }

    fn leads(&self) -> bool {
        status_at(self.admin).is_ok_and(|s| s["record"]["coordination"]["is_leader"] == true)
    }

    fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Instance `name`'s configuration: etcd, the lease TTL, and a promotion command that appends
/// the node's name to `promotions` before it promotes.
fn pair_config(c: &PgCluster, etcd: &[String], ttl: u64, name: &str, promotions: &Path) -> Result<Config> {
    let mut cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some(PASSWORD));
    cfg.listen = free_addr()?.to_string();
    cfg.admin_listen = free_addr()?.to_string();
    cfg.health = HealthConfig {
        password: PASSWORD.into(),
        ..Default::default()
    };
    cfg.coordination.etcd = etcd.to_vec();
    cfg.coordination.prefix = "/pair-drill".into();
    cfg.coordination.lease_ttl = ttl;
    cfg.coordination.name = name.into();
    let psql = testkit::pg_bindir()?.join("psql");
    let promote = PromoteConfig {
        method: PromoteMethod::Exec,
        command: format!(
            "echo {{node}} >> {} && PGPASSWORD={PASSWORD} {} -X -q -h {{host}} -p {{port}} -U postgres -d postgres -c 'select pg_promote()'",
            promotions.display(),
            psql.display()
        ),
        ..Default::default()
    };
    for n in c.nodes() {
        cfg.failover.nodes.insert(n.name().into(), promote.clone());
    }
    Ok(cfg)
}

fn drill(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    bin: &Path,
    mode: Mode,
    kind: &str,
    n: usize,
) -> Result<Value> {
    if !["primary", "leader", "both"].contains(&kind) {
        bail!("unknown kind of drill {kind}: primary, leader or both");
    }
    let c = PgCluster::builder()
        .standbys(1)
        .synchronous(mode == Mode::Sync)
        .password(PASSWORD)
        .start()
        .context("starting the cluster")?;
    c.primary()
        .psql("create table drill(id bigint primary key, writer int)")?;
    c.wait_replicated()?;
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let promotions = dir.path().join("promotions");
    let cfg_a = pair_config(&c, &etcd.endpoints(), args.ttl, "a", &promotions)?;
    let mut a = Daemon::start(bin, &cfg_a, dir.path(), "a")?;
    if !poll_until(Instant::now() + READY_LIMIT, || a.leads()) {
        bail!("a did not take the lease within {READY_LIMIT:?}");
    }
    let cfg_b = pair_config(&c, &etcd.endpoints(), args.ttl, "b", &promotions)?;
    let b = Daemon::start(bin, &cfg_b, dir.path(), "b")?;
    let conn = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres password={PASSWORD} dbname=postgres application_name=pair_drill",
        a.addr.port(),
        b.addr.port()
    );

    let Writers { log, stop, handles } =
        start_writers(rt, args.writers, &conn, READY_LIMIT, args.load).map_err(|e| anyhow!(e))?;

    let (old, new) = (c.node(0).port() as i32, c.node(1).port() as i32);
    let expected = if kind == "leader" { old } else { new };
    let killed = Instant::now();
    match kind {
        "primary" => c.node(0).kill9()?,
        "leader" => a.kill9()?,
        "both" => {
            c.node(0).kill9()?;
            a.kill9()?;
        }
        other => bail!("unknown kind of drill {other}: primary, leader or both"),
    }
    // Sent after the kill: an acknowledgement in flight at the kill is no proof of recovery.
    let first = |log: &Log| {
        log.acks
            .iter()
            .filter(|k| k.port == expected && k.sent >= killed)
            .map(|k| k.acked)
            .min()
    };
    let wrote = poll_until(killed + WRITE_LIMIT, || first(&lock(&log)).is_some());
    let lease = if kind == "primary" {
        None
    } else if poll_until(killed + Duration::from_secs(args.ttl) + READY_LIMIT, || b.leads()) {
        Some(ms(killed, Instant::now()))
    } else {
        bail!("b did not take the lease");
    };
    // A little more load on the outcome, then stop and count.
    std::thread::sleep(Duration::from_millis(500));
    stop.cancel();
    for h in handles {
        let _ = rt.block_on(h);
    }
    let log = lock(&log);
    let first_write = first(&log).map(|t| ms(killed, t));
    if !wrote {
        bail!(
            "no write acknowledged by the expected primary within {WRITE_LIMIT:?}: {:?}",
            log.errors
        );
    }
    let first_new = log.acks.iter().filter(|k| k.port == new).map(|k| k.acked).min();
    let on_fenced = match (kind, first_new) {
        ("leader", _) | (_, None) => 0,
        (_, Some(t)) => log.acks.iter().filter(|k| k.port == old && k.acked > t).count(),
    };
    let primary = if kind == "leader" { c.node(0) } else { c.node(1) };
    let stored: HashSet<i64> = primary
        .psql_timeout("select id from drill", Duration::from_secs(30))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost = log.acks.iter().filter(|k| !stored.contains(&k.id)).count();
    let promoted = std::fs::read_to_string(&promotions)
        .unwrap_or_default()
        .lines()
        .count();
    let want = usize::from(kind != "leader");
    let rec = json!({
        "mode": mode.as_str(),
        "kind": kind,
        "drill": n,
        "ok": promoted == want && on_fenced == 0 && (mode == Mode::Async || lost == 0),
        "kill_to_first_write_ms": first_write,
        "kill_to_lease_ms": lease,
        "acked": log.acks.len(),
        "lost": lost,
        "promotions": promoted,
        "promotions_expected": want,
        "writes_on_fenced": on_fenced,
        "errors": log.errors,
    });
    drop(b);
    drop(a);
    drop(etcd);
    Ok(rec)
}

/// The load average, as `/proc/loadavg` gives it (its first three fields).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.writers == 0 || args.drills == 0 || args.kinds.is_empty() || args.modes.is_empty() {
        bail!("--writers, --drills, --kinds and --modes must not be empty or zero");
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
        bail!("{} does not exist: build it or pass --dbproxy", bin.display());
    }
    common::telemetry::init(common::telemetry::LogFormat::Text, "dbproxy=warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = SystemTime::now();
    let load_start = loadavg();
    let mut results = Vec::new();
    for &mode in &args.modes {
        for kind in &args.kinds {
            for n in 1..=args.drills {
                let t = Instant::now();
                let rec = drill(&rt, &args, &bin, mode, kind, n).unwrap_or_else(|e| {
                    json!({"mode": mode.as_str(), "kind": kind, "drill": n, "ok": false, "failure": format!("{e:#}")})
                });
                eprintln!(
                    "[pair] {} {kind} drill {n} ({:.1} s): {rec}",
                    mode.as_str(),
                    t.elapsed().as_secs_f64()
                );
                results.push(rec);
            }
        }
    }
    let limit_ms = (args.ttl * 1000 + 1000) as f64;
    let mut md = format!(
        "# Two dbproxy instances on etcd: `kill -9` of the primary, of the leader instance, or both\n\n\
         - {}; {} cores; load average {load_start} at start, {} at the end; primary + 1 standby \
         (testkit, loopback); one etcd member; two `dbproxy` binaries, `a` (the leader) and `b`, \
         lease TTL {} s, default health settings, promotion by an `exec` command that logs each \
         call; {} writers with both instances in their connection string (`a` first), {} s of \
         load before the kill\n",
        common::time::Civil::from(started).iso_seconds(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        loadavg(),
        args.ttl,
        args.writers,
        args.load,
    );
    for note in &args.note {
        md.push_str(&format!("- note: {note}\n"));
    }
    md.push_str(
        "- primary = `kill -9` of the primary (the leader promotes); leader = `kill -9` of the \
         leader instance (`b` takes the lease, the primary stays); both = the primary, then at once \
         the leader instance (`b` takes the lease and promotes). kill → first write = to the first \
         write sent after the kill and acknowledged by the node that should be primary; kill → \
         other leads = until `b`'s `/status` says it holds the lease (polled every 25 ms); lost = \
         acknowledged ids missing from the primary at the end; promotions = calls of the \
         promotion command; writes on a fenced node = acknowledgements from the old primary after \
         the new one's first; times in ms\n\n\
         | mode | drill | ok | kill → first write p50 / max | kill → other leads p50 / max | acked | lost | promotions per drill | writes on a fenced node | client errors |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut met = true;
    let mut verdict = Vec::new();
    for &mode in &args.modes {
        for kind in &args.kinds {
            let rs: Vec<&Value> = results
                .iter()
                .filter(|r| r["mode"] == mode.as_str() && r["kind"] == kind.as_str())
                .collect();
            let f = |k: &str| rs.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>();
            let sum = |k: &str| rs.iter().filter_map(|r| r[k].as_u64()).sum::<u64>();
            let ok = rs.iter().filter(|r| r["ok"] == true).count();
            let want = u64::from(kind != "leader");
            let promotions: Vec<String> = rs.iter().map(|r| r["promotions"].to_string()).collect();
            let first = median_max(f("kill_to_first_write_ms"));
            let errors = error_summary(rs.iter().copied());
            md.push_str(&format!(
                "| {} | {kind} | {ok}/{} | {} | {} | {} | {} | {} (want {want}) | {} | {} |\n",
                mode.as_str(),
                rs.len(),
                fmt_pair(first),
                fmt_pair(median_max(f("kill_to_lease_ms"))),
                sum("acked"),
                sum("lost"),
                promotions.join(", "),
                sum("writes_on_fenced"),
                if errors.is_empty() { "none" } else { &errors },
            ));
            for r in rs.iter().filter(|r| !r["failure"].is_null()) {
                verdict.push(format!(
                    "{} {kind} drill {} failed: {}",
                    mode.as_str(),
                    r["drill"],
                    r["failure"].as_str().unwrap_or("").replace('|', "/")
                ));
            }
            if ok < rs.len() {
                met = false;
            }
            if kind == "leader" && first.is_none_or(|(_, max)| max > limit_ms) {
                met = false;
                verdict.push(format!(
                    "{}: a write through `b` took more than the TTL + 1 s after the leader's kill",
                    mode.as_str()
                ));
            }
        }
    }
    md.push_str(&format!(
        "\n**Verdict: goals {}** (every drill ok: exactly the promotions wanted, 0 writes on a \
         fenced node, 0 acknowledged writes lost in sync mode; the leader's kill to a write through \
         the other at most the TTL + 1 s = {limit_ms:.0} ms){}\n",
        if met { "met" } else { "NOT met" },
        if verdict.is_empty() {
            ".".to_string()
        } else {
            format!(": {}.", verdict.join("; "))
        }
    ));
    print!("{md}");
    if let Some(path) = &args.json {
        let doc = json!({
            "benchmark": "failover-pair",
            "started": common::time::Civil::from(started).iso_seconds(),
            "commit": std::env::var("BENCH_COMMIT").ok(),
            "notes": args.note,
            "settings": {"drills": args.drills, "writers": args.writers, "load_before_kill_s": args.load, "lease_ttl_s": args.ttl},
            "goals_met": met,
            "drills": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
