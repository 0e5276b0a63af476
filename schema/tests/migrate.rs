//! The migration runner and the sample queries against a real PostgreSQL 15 (testkit).

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use schema::migrate::migrate_list;
use schema::samples::{self, truncate_to_micros};
use schema::{Disk, Migration, NetIface, Sample, SchemaError, MIGRATIONS};
use tokio_postgres::{Client, NoTls};

async fn start_db() -> Result<testkit::PgCluster> {
    tokio::task::spawn_blocking(|| testkit::PgCluster::builder().start())
        .await?
        .context("starting postgres")
}

async fn connect(node: &testkit::PgNode) -> Result<Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&node.conn_string(), NoTls),
    )
    .await
    .context("connect timed out")??;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_concurrent_starters_apply_migrations_exactly_once() -> Result<()> {
    let cluster = start_db().await?;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(cluster.primary()).await?);
    }
    // All four start together: none may observe a half-applied schema or fail on a race.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut tasks = Vec::new();
    for client in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            tokio::time::timeout(Duration::from_secs(60), schema::migrate(&client)).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?.context("migrate timed out")?.context("migrate failed")?);
    }
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    let appliers: Vec<_> = results.iter().filter(|a| !a.applied.is_empty()).collect();
    assert_eq!(appliers.len(), 1, "exactly one instance applies: {results:?}");
    assert_eq!(appliers[0].applied, all);
    assert_eq!(appliers[0].already, 0);
    let waiters: Vec<_> = results.iter().filter(|a| a.applied.is_empty()).collect();
    assert_eq!(waiters.len(), 3);
    for w in waiters {
        assert_eq!(w.already, MIGRATIONS.len(), "{w:?}");
        assert!(w.unknown.is_empty());
    }

    let primary = cluster.primary();
    let rows = primary
        .psql("select version || ':' || name || ':' || checksum from schema_migrations order by version")?;
    let want: Vec<String> = MIGRATIONS
        .iter()
        .map(|m| format!("{}:{}:{}", m.version, m.name, m.checksum()))
        .collect();
    assert_eq!(rows.lines().collect::<Vec<_>>(), want);
    assert_eq!(primary.psql("select count(*) from samples")?, "0");
    // The lock is released: nothing is left holding it.
    assert_eq!(
        primary.psql("select count(*) from pg_locks where locktype = 'advisory'")?,
        "0"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_migration_is_refused_and_a_failing_one_rolls_back() -> Result<()> {
    let cluster = start_db().await?;
    let client = connect(cluster.primary()).await?;
    let first = [Migration {
        version: 1,
        name: "t",
        sql: "CREATE TABLE t (a int);",
    }];
    let applied = migrate_list(&client, &first).await?;
    assert_eq!(applied.applied, vec![1]);

    let edited = [Migration {
        version: 1,
        name: "t",
        sql: "CREATE TABLE t (a bigint);",
    }];
    let err = migrate_list(&client, &edited).await.unwrap_err();
    assert!(
        matches!(err, SchemaError::ChecksumMismatch { version: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("changed after it was applied"), "{err}");

    // A broken second migration: its table must not survive, its row must not be recorded.
    let broken = [
        first[0],
        Migration {
            version: 2,
            name: "broken",
            sql: "CREATE TABLE u (a int); SELECT no_such_column FROM t;",
        },
    ];
    let err = migrate_list(&client, &broken).await.unwrap_err();
    assert!(matches!(err, SchemaError::Apply { version: 2, .. }), "{err}");
    assert!(err.to_string().contains("no_such_column"), "{err}");
    let p = cluster.primary();
    assert_eq!(p.psql("select to_regclass('u') is null")?, "t");
    assert_eq!(p.psql("select count(*) from schema_migrations")?, "1");
    assert_eq!(
        p.psql("select count(*) from pg_locks where locktype = 'advisory'")?,
        "0"
    );

    // An older build meeting a newer database reports what it does not know, and still runs.
    let older: [Migration; 0] = [];
    let applied = migrate_list(&client, &older).await?;
    assert_eq!(applied.unknown, vec![1]);

    // The session is still usable after the failed migration (no transaction left open).
    client.batch_execute("SELECT 1").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_insert_idempotently_and_read_back() -> Result<()> {
    let cluster = start_db().await?;
    let client = connect(cluster.primary()).await?;
    schema::migrate(&client).await?;
    let stmt = samples::prepare_insert(&client).await?;
    let t0 = truncate_to_micros(SystemTime::now());
    let make = |host: &str, secs: u64| Sample {
        host: host.into(),
        sampled_at: t0 + Duration::from_secs(secs),
        cpu_percent: if secs == 0 { None } else { Some(secs as f64) },
        load1: 1.0,
        load5: 0.5,
        load15: 0.25,
        mem_total_bytes: 1 << 33,
        mem_used_bytes: 1 << 32,
        swap_total_bytes: 0,
        swap_used_bytes: 0,
        disks: vec![Disk {
            mount: "/data dir".into(),
            fs_type: "ext4".into(),
            total_bytes: u64::MAX,
            used_bytes: 1,
        }],
        net: vec![NetIface {
            iface: "eth0".into(),
            rx_bytes: 10,
            tx_bytes: 20,
        }],
        uptime_seconds: 12.5,
        process_count: 7,
    };
    for secs in 0..5 {
        assert!(samples::insert(&client, &stmt, &make("a", secs)).await?);
    }
    assert!(samples::insert(&client, &stmt, &make("b", 1)).await?);
    // Re-sending a stored sample is a no-op, not an error.
    assert!(!samples::insert(&client, &stmt, &make("a", 3)).await?);

    let latest = samples::latest_per_host(&client).await?;
    assert_eq!(latest, vec![make("a", 4), make("b", 1)]);
    let hist = samples::history(&client, "a", 3).await?;
    assert_eq!(hist, vec![make("a", 4), make("a", 3), make("a", 2)]);
    assert!(samples::history(&client, "nobody", 3).await?.is_empty());
    assert_eq!(cluster.primary().psql("select count(*) from samples")?, "6");

    // The table refuses nonsense rather than storing it.
    let mut bad = make("a", 9);
    bad.cpu_percent = Some(250.0);
    assert!(samples::insert(&client, &stmt, &bad).await.is_err());
    bad.cpu_percent = None;
    bad.host = String::new();
    assert!(samples::insert(&client, &stmt, &bad).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_checked_not_migrated() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(1).start())
        .await?
        .context("starting postgres")?;
    // Before the primary migrated, a standby can only refuse, with the server's reason.
    let standby = connect(cluster.standby(0)).await?;
    let err = schema::migrate(&standby).await.unwrap_err().to_string();
    assert!(
        err.contains("read-only transaction") && err.contains("25006"),
        "{err}"
    );

    let primary = connect(cluster.primary()).await?;
    assert_eq!(schema::migrate(&primary).await?.applied.len(), MIGRATIONS.len());
    let cluster = std::sync::Arc::new(cluster);
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.wait_replicated()).await??;
    // Once replicated, the standby has everything and the check passes without any DDL.
    let applied = schema::migrate(&standby).await?;
    assert!(applied.applied.is_empty());
    assert_eq!(applied.already, MIGRATIONS.len());
    assert_eq!(cluster.standby(0).psql("select pg_is_in_recovery()")?, "t");
    Ok(())
}
