//! Session state that must look the same on every backend connection of a session: which SET
//! statements survive transactions (checked against a direct connection to PostgreSQL running
//! the same statements), and the 25006 replay of extended-protocol batches ended by Flush.

mod support;

use anyhow::{Context, Result};
use support::{config_for, Proxy};
use testkit::PgCluster;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The first column of the first row `sql` returns, with its second column (`pg_is_in_recovery`).
async fn row2(c: &Client, sql: &str) -> Result<(String, String)> {
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            let a = r.get(0).unwrap_or("NULL").to_string();
            let b = r.get(1).unwrap_or("NULL").to_string();
            return Ok((a, b));
        }
    }
    anyhow::bail!("no row from {sql}")
}

/// Runs `sql` and returns its SQLSTATE when it fails.
async fn run(c: &Client, sql: &str) -> Option<String> {
    c.simple_query(sql).await.err().map(|e| support::code(&e))
}

const ON_STANDBY: &str = "select current_setting('work_mem'), pg_is_in_recovery()";
const ON_PRIMARY: &str = "begin; select current_setting('work_mem'), pg_is_in_recovery(); commit";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_survive_only_what_commits() -> Result<()> {
    support::bounded(sets_survive_only_what_commits_body()).await
}

async fn sets_survive_only_what_commits_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    let proxy = Proxy::start(config_for(&cluster, Some("pw")))?;
    let (direct, conn) =
        tokio_postgres::connect(&cluster.primary().conn_string(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    direct.batch_execute("create table t(x int)").await?;
    let c = proxy.connect("postgres", "pw").await?;

    // The same statements on a direct connection and through dbproxy; after each case the
    // setting read on the session's standby connection and on its primary connection must be
    // what PostgreSQL itself has.
    let cases: &[&[&str]] = &[
        &["set work_mem = '1MB'"],
        &["begin; set work_mem = '2MB'; rollback"],
        &["begin; set work_mem = '3MB'; abort"],
        &["begin; set work_mem = '4MB'; select 1/0", "rollback"],
        &["set work_mem = '5MB'; select 1/0"],
        &["begin; set local work_mem = '6MB'; commit"],
        &["begin", "set local work_mem = '7MB'", "select 1", "commit"],
        &["set work_mem = '8MB'; rollback"],
        &["begin; set work_mem = '9MB'; commit"],
        &["begin; set work_mem = '10MB'; rollback; set work_mem = '11MB'"],
        &["begin; set work_mem = '12MB'; savepoint a; set work_mem = '13MB'; rollback to a; commit"],
        &["begin; set work_mem = '14MB'", "select 1/0", "commit"],
        &["set work_mem = '15MB'; insert into t values (1)"],
        &["begin; set work_mem = '16MB'", "commit"],
        &["set work_mem = '17MB'; begin; select 1/0", "rollback"],
        &["begin; set work_mem = '18MB'; commit and chain; set work_mem = '19MB'; rollback"],
        &[
            "begin",
            "savepoint a",
            "set work_mem = '20MB'",
            "release a",
            "commit",
        ],
        &["begin; savepoint a; set work_mem = '21MB'; rollback to savepoint a; commit"],
        &["set local work_mem = '22MB'; set work_mem = '23MB'"],
    ];
    for case in cases {
        for sql in *case {
            let want = run(&direct, sql).await;
            let got = run(&c, sql).await;
            assert_eq!(got, want, "error of {sql:?} in {case:?}");
        }
        let (want, _) = row2(&direct, ON_STANDBY).await?;
        let standby = row2(&c, ON_STANDBY)
            .await
            .with_context(|| format!("after {case:?}"))?;
        assert_eq!(
            standby,
            (want.clone(), "t".into()),
            "standby connection after {case:?}"
        );
        let primary = row2(&c, ON_PRIMARY).await?;
        assert_eq!(primary, (want, "f".into()), "primary connection after {case:?}");
    }
    assert_eq!(
        cluster.primary().psql("select count(*) from t")?,
        "2",
        "one insert directly, one through dbproxy: only the SET of a string is replayed, never \
         its other statements"
    );

    // The extended protocol (tokio-postgres prepares, binds and executes): a SET executed in a
    // transaction that rolls back is forgotten, one executed outside a transaction holds.
    for c in [&direct, &c] {
        c.batch_execute("begin").await?;
        c.execute("set work_mem = '24MB'", &[]).await?;
        c.batch_execute("rollback").await?;
    }
    let (want, _) = row2(&direct, ON_STANDBY).await?;
    assert_eq!(want, "23MB");
    assert_eq!(
        row2(&c, ON_STANDBY).await?,
        (want, "t".into()),
        "extended, rolled back"
    );
    for c in [&direct, &c] {
        c.execute("set work_mem = '25MB'", &[]).await?;
    }
    assert_eq!(
        row2(&c, ON_STANDBY).await?,
        ("25MB".into(), "t".into()),
        "extended, autocommit"
    );
    Ok(())
}
