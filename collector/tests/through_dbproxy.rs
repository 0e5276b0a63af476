//! The collector writing through dbproxy (run in-process on loopback) to a real PostgreSQL:
//! migrations and samples go through the proxy, the database stopping behind the proxy is an
//! outage the spool rides out (one node only, so that no failover policy of dbproxy's can turn the
//! outage into something else), and a primary killed behind the proxy is a failover dbproxy does
//! by itself, after which every sample the collector took is on the new primary exactly once.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use dbproxy::config::Config;
use support::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Proxy = tokio::task::JoinHandle<Result<(), dbproxy::RunError>>;

/// dbproxy in front of `c` (user postgres, password pw) on `addr`, with its admin HTTP listener on
/// `admin` if given, in this runtime.
async fn start_dbproxy(
    c: &testkit::PgCluster,
    addr: SocketAddr,
    admin: Option<TcpListener>,
) -> Result<(SocketAddr, Proxy)> {
    let mut cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some("pw"));
    cfg.listen = addr.to_string();
    let cfg = common::Validate::validate(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = TcpListener::bind(addr).await.context("binding dbproxy")?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(dbproxy::run_with_admin(
        listener,
        admin,
        cfg,
        CancellationToken::new(),
    ));
    Ok((bound, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_go_through_dbproxy_across_a_database_outage() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| testkit::PgCluster::builder().password("pw").start()).await??;
    let cluster = std::sync::Arc::new(cluster);
    let (proxy_addr, proxy) = start_dbproxy(&cluster, "127.0.0.1:0".parse()?, None).await?;

    let dir = tempfile::tempdir()?;
    let host = "proxied-host";
    let mut cfg = config(cluster.primary(), &dir.path().join("spool.jsonl"), host);
    cfg.database_url = format!(
        "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
        proxy_addr.port()
    );
    let c = spawn(cfg);
    let cl = cluster.clone();
    wait_for("samples through dbproxy", move || {
        Ok((count(cl.primary(), host)? >= 2).then_some(()))
    })
    .await?;
    // The schema was applied through the proxy.
    assert_eq!(
        cluster.primary().psql("select count(*) from schema_migrations")?,
        schema::MIGRATIONS.len().to_string()
    );

    // The database goes away behind the proxy for at least three intervals.
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().stop()).await??;
    let (before, stats) = (c.stats.produced(), c.stats.clone());
    wait_for("samples spooled while the database is gone", move || {
        Ok((stats.produced() >= before + 3 && stats.pending() >= 3).then_some(()))
    })
    .await?;

    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().start()).await??;
    let (cl, stats) = (cluster.clone(), c.stats.clone());
    wait_for("the spool to drain through the proxy", move || {
        let produced = stats.produced();
        Ok((stats.pending() == 0 && count(cl.primary(), host)? == produced).then_some(()))
    })
    .await?;
    let stats = c.stop().await?;
    let rows = rows(cluster.primary(), host)?;
    assert_eq!(rows.len() as u64, stats.produced());
    assert_in_order_once(&rows);
    proxy.abort();
    Ok(())
}

/// dbproxy's `/status` document, read from its admin listener.
async fn dbproxy_status(admin: SocketAddr) -> Result<serde_json::Value> {
    let answer = http_get(admin, "/status").await?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no end of headers")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{answer}");
    serde_json::from_str(body).with_context(|| format!("not json: {body}"))
}

/// Reads dbproxy's `/status` every 50 ms until `f` picks something out of it, within
/// `testkit::DEADLINE`.
async fn wait_status<T>(
    what: &str,
    admin: SocketAddr,
    mut f: impl FnMut(&serde_json::Value) -> Option<T>,
) -> Result<T> {
    let started = Instant::now();
    loop {
        let last = match dbproxy_status(admin).await {
            Ok(s) => match f(&s) {
                Some(v) => return Ok(v),
                None => s.to_string(),
            },
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > testkit::DEADLINE {
            bail!("{what}: not within {:?}; last /status: {last}", testkit::DEADLINE);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn epoch_micros(t: SystemTime) -> Result<i64> {
    Ok(i64::try_from(t.duration_since(UNIX_EPOCH)?.as_micros())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_is_stored_once_across_a_dbproxy_failover() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(240), failover_body())
        .await
        .context("the test did not finish within 240 s")?
}

async fn failover_body() -> Result<()> {
    // Synchronous replication: every sample the old primary acknowledged is on the standby, so the
    // new primary can be asked for all of them. (With asynchronous replication the last
    // acknowledged ones may be lost with the primary; dbproxy reports that, it cannot prevent it.)
    let cluster = tokio::task::spawn_blocking(|| {
        testkit::PgCluster::builder()
            .standbys(1)
            .synchronous(true)
            .password("pw")
            .start()
    })
    .await??;
    let cluster = Arc::new(cluster);
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?;
    let (proxy_addr, proxy) = start_dbproxy(&cluster, "127.0.0.1:0".parse()?, Some(admin)).await?;
    wait_status("node1 reported as a synchronous standby", admin_addr, |s| {
        (s["primary"] == 0 && s["nodes"][1]["replication_sync_state"] == "sync").then_some(())
    })
    .await?;

    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let host = "failover-through-proxy";
    let mut cfg = config(cluster.primary(), &spool, host);
    cfg.database_url = format!(
        "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
        proxy_addr.port()
    );
    let c = spawn(cfg);
    let cl = cluster.clone();
    wait_for("samples on the first primary through dbproxy", move || {
        Ok((count(cl.node(0), host)? >= 3).then_some(()))
    })
    .await?;

    let killed_at = SystemTime::now();
    let taken_before_kill = c.stats.produced();
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.node(0).kill9()).await??;

    // dbproxy fails over by itself: node1 promoted, the synchronous requirement it inherited
    // cleared so that writes cannot hang.
    let (status, ev) = wait_status("a failover event in dbproxy's /status", admin_addr, |s| {
        let ev = s["history"]
            .as_array()?
            .iter()
            .find(|e| e["kind"] == "failover")?
            .clone();
        Some((s.clone(), ev))
    })
    .await?;
    eprintln!("failover: {ev}");
    ensure!(
        ev["failed"] == "node0" && ev["promoted"] == "node1" && ev["error"].is_null(),
        "{ev}"
    );
    ensure!(ev["cleared_synchronous_standby_names"] == true, "{ev}");
    ensure!(status["primary"] == 1, "{status}");

    // Samples taken after the kill reach the new primary, and nothing is left waiting.
    let (cl, stats) = (cluster.clone(), c.stats.clone());
    wait_for(
        "every sample, including later ones, on the new primary",
        move || {
            let produced = stats.produced();
            Ok((produced >= taken_before_kill + 3
                && stats.pending() == 0
                && count(cl.node(1), host)? == produced)
                .then_some(()))
        },
    )
    .await?;
    let stats = c.stop().await?;

    let rows = rows(cluster.node(1), host)?;
    assert_eq!(
        rows.len() as u64,
        stats.produced(),
        "every sample taken is on the new primary"
    );
    assert_in_order_once(&rows);
    let after_kill = epoch_micros(killed_at)?;
    let later = rows.iter().filter(|(_, t)| *t > after_kill).count();
    assert!(later >= 3, "only {later} samples taken after the kill are stored");
    // Each sample was stored by exactly one write: a retried write whose first attempt had in fact
    // committed (outcome unknown, 08007) finds it already there instead of adding it again.
    assert_eq!(
        stats.written() + stats.already_stored(),
        stats.produced(),
        "written {} + already stored {} != produced {}",
        stats.written(),
        stats.already_stored(),
        stats.produced()
    );
    assert_eq!(stats.rejected(), 0);
    assert_eq!(stats.dropped(), 0);
    assert_eq!(std::fs::metadata(&spool)?.len(), 0, "nothing is left to re-send");
    eprintln!(
        "{} samples ({later} after the kill), {} write errors, {} already stored",
        stats.produced(),
        stats.write_errors(),
        stats.already_stored()
    );
    proxy.abort();
    Ok(())
}
