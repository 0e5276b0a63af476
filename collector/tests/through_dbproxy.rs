//! The collector writing through dbproxy (run in-process on loopback) to a real PostgreSQL:
//! migrations and samples go through the proxy, and the database stopping behind the proxy is an
//! outage the spool rides out. (One node only, so that no failover policy of dbproxy's can turn the
//! outage into something else; failover itself is covered in outage.rs and in dbproxy's tests.)

mod support;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use dbproxy::config::Config;
use support::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Proxy = tokio::task::JoinHandle<Result<(), dbproxy::RunError>>;

/// dbproxy in front of `c` (user postgres, password pw) on `addr`, in this runtime.
async fn start_dbproxy(c: &testkit::PgCluster, addr: SocketAddr) -> Result<(SocketAddr, Proxy)> {
    let mut cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some("pw"));
    cfg.listen = addr.to_string();
    let cfg = common::Validate::validate(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = TcpListener::bind(addr).await.context("binding dbproxy")?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(dbproxy::run_with_admin(
        listener,
        None,
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
    let (proxy_addr, proxy) = start_dbproxy(&cluster, "127.0.0.1:0".parse()?).await?;

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
