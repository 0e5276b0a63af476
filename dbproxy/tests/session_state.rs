//! Session state that must look the same on every backend connection of a session: which SET
//! statements survive transactions (checked against a direct connection to PostgreSQL running
//! the same statements), and the 25006 replay of extended-protocol batches ended by Flush.

mod support;

use anyhow::{Context, Result};
use dbproxy::config::{AuthMethod, HbaRule};
use dbproxy::protocol::error;
use support::{config_for, msg, Proxy, Raw};
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

/// The next `n` messages from dbproxy, as `tag` (`D:value` for a one-column row, `E:sqlstate`,
/// `Z:status`).
async fn answers(r: &mut Raw, n: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let f = r.frame().await?.context("connection closed")?;
        let body = f.body();
        out.push(match f.tag() {
            b'D' => format!("D:{}", String::from_utf8_lossy(body.get(6..).unwrap_or(b""))),
            b'E' => format!("E:{}", error::sqlstate(body).unwrap_or("")),
            b'Z' => format!("Z:{}", body.first().map_or('?', |&b| b as char)),
            t => (t as char).to_string(),
        });
    }
    Ok(out)
}

fn parse(sql: &str) -> Vec<u8> {
    msg(b'P', format!("\0{sql}\0\0\0").as_bytes())
}
/// Bind of the unnamed statement to `portal`, no parameters.
fn bind(portal: &str) -> Vec<u8> {
    msg(b'B', format!("{portal}\0\0\0\0\0\0\0\0").as_bytes())
}
fn execute(portal: &str) -> Vec<u8> {
    msg(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
}
fn describe(kind: u8, name: &str) -> Vec<u8> {
    msg(b'D', format!("{}{name}\0", kind as char).as_bytes())
}
fn flush() -> Vec<u8> {
    msg(b'H', b"")
}
fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

/// A primary and a standby, and a dbproxy config for them that trusts every client (so raw
/// protocol clients can log in).
async fn trusting_cluster() -> Result<(PgCluster, dbproxy::config::Config)> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    let mut config = config_for(&cluster, Some("pw"));
    config.hba = vec![HbaRule {
        method: AuthMethod::Trust,
        ..HbaRule::default()
    }];
    Ok((cluster, config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_batches_refused_by_a_standby_are_replayed() -> Result<()> {
    support::bounded(flush_batches_refused_by_a_standby_are_replayed_body()).await
}

async fn flush_batches_refused_by_a_standby_are_replayed_body() -> Result<()> {
    let (cluster, mut config) = trusting_cluster().await?;
    // A function that writes, allow-listed as read-only: its calls go to the standby, which
    // refuses them with 25006.
    config.routing.read_only_functions = vec!["bump".into()];
    let proxy = Proxy::start(config)?;
    cluster.primary().psql(
        "create table hits(n int); create function bump() returns int language sql \
         as 'insert into hits values (1) returning 1'",
    )?;
    tokio::task::block_in_place(|| {
        cluster
            .standby(0)
            .wait_replayed(&cluster.primary().current_lsn()?)
    })?;
    let hits = || cluster.primary().psql("select count(*) from hits");
    let bump = parse("select bump()");

    // One batch ended by Flush: the standby's answers are held until the Execute's; its 25006
    // sends the batch to the primary, and the client sees only the primary's answers.
    let mut r = Raw::login(&proxy).await?;
    r.send(&[bump.clone(), bind(""), describe(b'P', ""), execute(""), flush()].concat())
        .await?;
    assert_eq!(answers(&mut r, 5).await?, ["1", "2", "T", "D:1", "C"]);
    r.send(&sync()).await?;
    assert_eq!(answers(&mut r, 1).await?, ["Z:I"]);
    assert_eq!(hits()?, "1");

    // Parse and Describe, Flush (the client waits for those answers), then Bind, Execute, Sync:
    // the first answers reach the client at once, the second batch is replayed on its own.
    r.send(&[bump.clone(), describe(b'S', ""), flush()].concat())
        .await?;
    assert_eq!(answers(&mut r, 3).await?, ["1", "t", "T"]);
    r.send(&[bind(""), execute(""), sync()].concat()).await?;
    assert_eq!(answers(&mut r, 4).await?, ["2", "D:1", "C", "Z:I"]);
    assert_eq!(hits()?, "2");

    // The same two batches sent together.
    r.send(
        &[
            bump.clone(),
            describe(b'S', ""),
            flush(),
            bind(""),
            execute(""),
            sync(),
        ]
        .concat(),
    )
    .await?;
    assert_eq!(answers(&mut r, 7).await?, ["1", "t", "T", "2", "D:1", "C", "Z:I"]);
    assert_eq!(hits()?, "3");

    // Part of the response already reached the client (a read's rows): the genuine error is
    // passed on, and the session goes on.
    r.send(
        &[
            parse("select 7"),
            bind(""),
            execute(""),
            bump.clone(),
            bind(""),
            execute(""),
            flush(),
        ]
        .concat(),
    )
    .await?;
    assert_eq!(answers(&mut r, 6).await?, ["1", "2", "D:7", "C", "1", "2"]);
    assert_eq!(answers(&mut r, 1).await?, ["E:25006"]);
    r.send(&sync()).await?;
    assert_eq!(answers(&mut r, 1).await?, ["Z:I"]);

    // A portal bound in an earlier batch whose answers were passed on exists only on the
    // standby: its refusal is passed on too.
    r.send(&[bump.clone(), bind("p1"), describe(b'P', "p1"), flush()].concat())
        .await?;
    assert_eq!(answers(&mut r, 3).await?, ["1", "2", "T"]);
    r.send(&[execute("p1"), sync()].concat()).await?;
    assert_eq!(answers(&mut r, 2).await?, ["E:25006", "Z:I"]);
    r.send(&msg(b'Q', b"select 8\0")).await?;
    assert_eq!(answers(&mut r, 4).await?, ["T", "D:8", "C", "Z:I"]);
    assert_eq!(hits()?, "3");

    let metrics = proxy.admin_get("/metrics")?;
    assert!(
        metrics.contains("dbproxy_routing_decisions_total{decision=\"replay_25006\"} 3"),
        "{metrics}"
    );
    Ok(())
}

/// Bind of the unnamed statement to the unnamed portal with one parameter in `format` (0 text,
/// 1 binary).
fn bind_one(format: i16, value: &[u8]) -> Vec<u8> {
    let mut body = b"\0\0\0\x01".to_vec();
    body.extend_from_slice(&format.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&(value.len() as i32).to_be_bytes());
    body.extend_from_slice(value);
    body.extend_from_slice(&0i16.to_be_bytes());
    msg(b'B', &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_with_parameters_holds_on_every_connection() -> Result<()> {
    support::bounded(set_config_with_parameters_body()).await
}

/// `set_config(..., $1, false)` through the extended protocol: the value bound to it is what the
/// session's other connection replays, whether the client sends it as text (as JDBC and
/// psycopg do) or in binary (as tokio-postgres does, once a Describe told it the type). A value
/// whose binary form cannot be read keeps the session on the primary, which has it.
async fn set_config_with_parameters_body() -> Result<()> {
    let (_cluster, config) = trusting_cluster().await?;
    let proxy = Proxy::start(config)?;
    const SET: &str = "select set_config('app.tenant', $1, false)";
    const TENANT: &str = "select current_setting('app.tenant'), pg_is_in_recovery()";
    const TENANT_ON_PRIMARY: &str =
        "begin; select current_setting('app.tenant'), pg_is_in_recovery(); commit";

    // tokio-postgres: prepared and described, then bound in binary.
    let c = proxy.connect("postgres", "pw").await?;
    let value = "it's a \\ test; 'quoted' $1";
    let row = c.query_one(SET, &[&value]).await?;
    assert_eq!(row.get::<_, String>(0), value);
    assert_eq!(
        row2(&c, TENANT).await?,
        (value.into(), "t".into()),
        "standby connection"
    );
    assert_eq!(
        row2(&c, TENANT_ON_PRIMARY).await?,
        (value.into(), "f".into()),
        "primary connection"
    );
    // A NULL value resets it to the empty string, on both connections.
    c.query_one(SET, &[&None::<&str>]).await?;
    assert_eq!(row2(&c, TENANT).await?, ("".into(), "t".into()));

    // A client that binds the value as text, without describing the statement.
    let one = |sql: &str| msg(b'Q', format!("{sql}\0").as_bytes());
    let tenant = "select current_setting('app.tenant') || ':' || pg_is_in_recovery()";
    let mut r = Raw::login(&proxy).await?;
    r.send(&[parse(SET), bind_one(0, b"O'Brien\\"), execute(""), sync()].concat())
        .await?;
    assert_eq!(answers(&mut r, 5).await?, ["1", "2", "D:O'Brien\\", "C", "Z:I"]);
    r.send(&one(tenant)).await?;
    assert_eq!(answers(&mut r, 4).await?, ["T", "D:O'Brien\\:true", "C", "Z:I"]);

    // Bound in binary with no type declared or described: dbproxy cannot read the value, so the
    // session stays on the primary.
    let mut r = Raw::login(&proxy).await?;
    r.send(&[parse(SET), bind_one(1, b"bin"), execute(""), sync()].concat())
        .await?;
    assert_eq!(answers(&mut r, 5).await?, ["1", "2", "D:bin", "C", "Z:I"]);
    r.send(&one(tenant)).await?;
    assert_eq!(answers(&mut r, 4).await?, ["T", "D:bin:false", "C", "Z:I"]);
    Ok(())
}
