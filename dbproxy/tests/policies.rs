//! Routing policies on a primary and two standbys: weight 0, write stickiness, read-your-writes
//! (by time window and by WAL position), the replication-lag limit, LISTEN/NOTIFY, the idle
//! timeout and the connection limit.

mod support;

use anyhow::Result;
use dbproxy::config::WriteStickiness;
use support::{code, config_for, psql, Proxy};
use testkit::{wait_for, PgCluster, DEADLINE};

async fn port(c: &tokio_postgres::Client) -> Result<u16> {
    let row = c.query_one("select inet_server_port()", &[]).await?;
    Ok(row.get::<_, i32>(0) as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_stickiness_lag_notify_and_limits() -> Result<()> {
    support::bounded(weights_stickiness_lag_notify_and_limits_body()).await
}

async fn weights_stickiness_lag_notify_and_limits_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(2).password("pw").start()).await??;
    let (pp, s1) = (cluster.primary().port(), cluster.standby(0).port());

    // Weight 0: node2 never gets reads, however many sessions open.
    let mut config = config_for(&cluster, Some("pw"));
    config.nodes[2].weight = 0;
    config.routing.disable_load_balance_on_write = WriteStickiness::Always;
    let proxy = Proxy::start(config)?;
    for _ in 0..6 {
        let c = proxy.connect("postgres", "pw").await?;
        assert_eq!(port(&c).await?, s1);
    }
    // `always`: after the session's first write, its reads stay on the primary.
    let c = proxy.connect("postgres", "pw").await?;
    assert_eq!(port(&c).await?, s1);
    c.batch_execute("create table w(x int)").await?;
    assert_eq!(port(&c).await?, pp, "sticky after a write");

    // LISTEN pins the session to the primary, and notifications reach the client.
    let (listener, mut conn) =
        tokio_postgres::connect(&proxy.conn_string("postgres", "pw"), tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = futures_util::StreamExt::next(&mut stream).await {
            let _ = tx.send(m);
        }
    });
    listener.batch_execute("listen ch").await?;
    assert_eq!(port(&listener).await?, pp, "pinned by LISTEN");
    let notifier = proxy.connect("postgres", "pw").await?;
    notifier.batch_execute("notify ch, 'hello'").await?;
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            match rx.recv().await {
                Some(tokio_postgres::AsyncMessage::Notification(n)) => return Some(n.payload().to_string()),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await?;
    assert_eq!(got.as_deref(), Some("hello"));

    // Read-your-writes: after a write, reads go to the primary for the window.
    let mut config = config_for(&cluster, Some("pw"));
    config.nodes[2].weight = 0;
    config.routing.read_your_writes = 600_000;
    let ryw = Proxy::start(config)?;
    let c = ryw.connect("postgres", "pw").await?;
    assert_eq!(port(&c).await?, s1);
    c.batch_execute("insert into w values (1)").await?;
    assert_eq!(port(&c).await?, pp, "read after write goes to the primary");
    let fresh = ryw.connect("postgres", "pw").await?;
    assert_eq!(
        port(&fresh).await?,
        s1,
        "other sessions still read from the standby"
    );

    // The lag limit: with replay paused on node1, writes make it fall behind and it is skipped.
    let mut config = config_for(&cluster, Some("pw"));
    config.nodes[2].weight = 0;
    config.routing.max_replica_lag_bytes = 1;
    let lag = Proxy::start(config)?;
    tokio::task::block_in_place(|| -> Result<()> {
        assert_eq!(
            psql(&lag, "postgres", "pw", "select inet_server_port()")?,
            s1.to_string()
        );
        cluster.standby(0).psql("select pg_wal_replay_pause()")?;
        cluster
            .primary()
            .psql("insert into w select generate_series(1, 1000)")?;
        wait_for("node1 to be skipped for lag", DEADLINE, || {
            Ok((psql(&lag, "postgres", "pw", "select inet_server_port()")? == pp.to_string()).then_some(()))
        })?;
        cluster.standby(0).psql("select pg_wal_replay_resume()")?;
        wait_for("node1 to catch up and take reads again", DEADLINE, || {
            Ok((psql(&lag, "postgres", "pw", "select inet_server_port()")? == s1.to_string()).then_some(()))
        })?;
        Ok(())
    })?;

    // Read-your-writes by WAL position: while node1 does not replay, a session that wrote reads
    // from the primary (others still read from node1); once node1 has replayed the write, the
    // session's reads return to it.
    let mut config = config_for(&cluster, Some("pw"));
    config.nodes[2].weight = 0;
    config.routing.read_your_writes_by_lsn = true;
    let by_lsn = Proxy::start(config)?;
    let c = by_lsn.connect("postgres", "pw").await?;
    assert_eq!(port(&c).await?, s1);
    tokio::task::block_in_place(|| cluster.standby(0).psql("select pg_wal_replay_pause()"))?;
    c.batch_execute("insert into w values (2)").await?;
    let other = by_lsn.connect("postgres", "pw").await?;
    for _ in 0..5 {
        assert_eq!(port(&c).await?, pp, "the write is not replayed on node1 yet");
        assert_eq!(
            port(&other).await?,
            s1,
            "a session that did not write reads from node1"
        );
        // Health checks run every 0.2 s meanwhile: node1's position stays behind the write.
        tokio::task::block_in_place(|| cluster.standby(0).psql("select pg_sleep(0.1)"))?;
    }
    tokio::task::block_in_place(|| cluster.standby(0).psql("select pg_wal_replay_resume()"))?;
    let deadline = std::time::Instant::now() + DEADLINE;
    while port(&c).await? != s1 {
        assert!(
            std::time::Instant::now() < deadline,
            "reads never returned to node1"
        );
        tokio::task::block_in_place(|| cluster.standby(0).psql("select pg_sleep(0.05)"))?;
    }

    // The idle-session timeout closes a silent client with 57P05.
    let mut config = config_for(&cluster, Some("pw"));
    config.limits.client_idle_timeout = 0.3;
    config.limits.max_connections = 1;
    let limited = Proxy::start(config)?;
    let (idle, conn) =
        tokio_postgres::connect(&limited.conn_string("postgres", "pw"), tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    idle.simple_query("select 1").await?;
    let ended = tokio::time::timeout(DEADLINE, conn).await??;
    assert_eq!(ended.map_err(|e| code(&e)), Err("57P05".to_string()));

    // The connection limit: the second concurrent client gets 53300.
    let first = limited.connect("postgres", "pw").await?;
    let second = tokio_postgres::connect(&limited.conn_string("postgres", "pw"), tokio_postgres::NoTls).await;
    assert_eq!(second.err().map(|e| code(&e)), Some("53300".to_string()));
    first.simple_query("select 1").await?;
    Ok(())
}
