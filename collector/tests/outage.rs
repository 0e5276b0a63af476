//! The collector against a real PostgreSQL that goes away for several intervals.

mod support;

use anyhow::Result;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_arrives_once_and_in_order_across_an_outage() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let host = "outage-host";
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?;
    let c = spawn_with_admin(Some(admin), config(cluster.primary(), &spool, host));

    let cl = cluster.clone();
    wait_for("two samples in the database", move || {
        Ok((count(cl.primary(), host)? >= 2).then_some(()))
    })
    .await?;

    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().stop()).await??;
    // Three intervals' worth of samples are taken while the database is down, and they wait.
    let before = c.stats.produced();
    let stats = c.stats.clone();
    wait_for("three samples taken during the outage", move || {
        Ok((stats.produced() >= before + 3 && stats.pending() >= 3).then_some(()))
    })
    .await?;
    assert!(
        c.stats.write_errors() > 0,
        "writes must have failed during the outage"
    );
    let spooled = std::fs::read_to_string(&spool)?.lines().count();
    assert!(
        spooled >= 3,
        "the spool file holds the waiting samples ({spooled} lines)"
    );

    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().start()).await??;
    let (cl, stats) = (cluster.clone(), c.stats.clone());
    wait_for("the spool to drain into the database", move || {
        let produced = stats.produced();
        Ok((stats.pending() == 0 && count(cl.primary(), host)? == produced).then_some(()))
    })
    .await?;

    // The outage is visible on /metrics.
    let page = http_get(admin_addr, "/metrics").await?;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        metric(&page, "collector_samples_total").is_some_and(|n| n >= 5),
        "{page}"
    );
    assert!(
        metric(&page, "collector_write_errors_total").is_some_and(|n| n >= 1),
        "{page}"
    );
    assert!(
        metric(&page, "collector_samples_written_total").is_some_and(|n| n >= 5),
        "{page}"
    );
    assert!(http_get(admin_addr, "/healthz")
        .await?
        .starts_with("HTTP/1.1 200"));

    let stats = c.stop().await?;
    let rows = rows(cluster.primary(), host)?;
    assert_eq!(
        rows.len() as u64,
        stats.produced(),
        "every sample taken is stored"
    );
    // The admin listener closes with the collector.
    assert!(tokio::net::TcpStream::connect(admin_addr).await.is_err());
    assert_in_order_once(&rows);
    assert_eq!(stats.written(), stats.produced());
    assert_eq!(stats.already_stored(), 0);
    assert_eq!(std::fs::metadata(&spool)?.len(), 0, "nothing is left to re-send");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_survive_a_primary_crash_and_promotion() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| {
        testkit::PgCluster::builder()
            .standbys(1)
            .synchronous(true)
            .start()
    })
    .await??;
    let cluster = std::sync::Arc::new(cluster);
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let host = "failover-host";
    // Without dbproxy, libpq-style multi-host failover stands in: whichever node accepts writes.
    let mut cfg = config(cluster.primary(), &spool, host);
    cfg.database_url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
         target_session_attrs=read-write",
        cluster.node(0).port(),
        cluster.node(1).port()
    );
    let c = spawn(cfg);

    let cl = cluster.clone();
    wait_for("samples on the first primary", move || {
        Ok((count(cl.node(0), host)? >= 2).then_some(()))
    })
    .await?;
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.node(0).kill9()).await??;
    let before = c.stats.produced();
    let stats = c.stats.clone();
    wait_for("samples taken with no primary", move || {
        Ok((stats.produced() >= before + 3).then_some(()))
    })
    .await?;

    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        cl.promote(1)?;
        // The promoted node inherited `synchronous_standby_names` and has no standby of its own.
        cl.node(1)
            .psql("alter system set synchronous_standby_names = ''")?;
        cl.node(1).psql("select pg_reload_conf()")?;
        Ok(())
    })
    .await??;
    let (cl, stats) = (cluster.clone(), c.stats.clone());
    wait_for("every sample on the new primary", move || {
        let produced = stats.produced();
        Ok((stats.pending() == 0 && count(cl.node(1), host)? == produced).then_some(()))
    })
    .await?;
    let stats = c.stop().await?;
    let rows = rows(cluster.node(1), host)?;
    assert_eq!(rows.len() as u64, stats.produced());
    assert_in_order_once(&rows);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_insert_is_cancelled_not_stranded() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let host = "lock-host";
    let mut cfg = config(cluster.primary(), &dir.path().join("spool.jsonl"), host);
    cfg.query_timeout = std::time::Duration::from_millis(300);
    let c = spawn(cfg);
    let cl = cluster.clone();
    wait_for("the first samples", move || {
        Ok((count(cl.primary(), host)? >= 2).then_some(()))
    })
    .await?;

    // Another session locks the table: every insert (and prepare) now waits, and times out.
    let (locker, conn) =
        tokio_postgres::connect(&cluster.primary().conn_string(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE samples IN ACCESS EXCLUSIVE MODE")
        .await?;
    let (before, stats) = (c.stats.write_errors(), c.stats.clone());
    wait_for("several timed-out writes", move || {
        Ok((stats.write_errors() >= before + 6).then_some(()))
    })
    .await?;
    // Each timed-out session was cancelled: at most the attempt in flight (and one on its way
    // out) waits on the lock, not one per attempt.
    let cl = cluster.clone();
    wait_for("no stranded collector sessions", move || {
        let n: u32 = cl
            .primary()
            .psql(
                "select count(*) from pg_stat_activity \
                 where application_name = 'ha-stack-collector' and wait_event_type = 'Lock'",
            )?
            .parse()?;
        Ok((n <= 1).then_some(()))
    })
    .await?;
    assert!(c.stats.pending() >= 2, "samples wait while the table is locked");

    locker.batch_execute("COMMIT").await?;
    let (cl, stats) = (cluster.clone(), c.stats.clone());
    wait_for("the spool to drain after the lock", move || {
        let produced = stats.produced();
        Ok((stats.pending() == 0 && count(cl.primary(), host)? == produced).then_some(()))
    })
    .await?;
    let stats = c.stop().await?;
    let rows = rows(cluster.primary(), host)?;
    assert_eq!(rows.len() as u64, stats.produced());
    assert_in_order_once(&rows);
    Ok(())
}
