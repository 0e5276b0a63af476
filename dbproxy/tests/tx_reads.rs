//! Reads inside transactions through real PostgreSQL (a primary and three standbys from
//! testkit): a plain BEGIN opens its transaction on a standby, its reads run there until the
//! first statement that may write, which opens the transaction on the primary (BEGIN and
//! savepoints replayed) and ends it on the standby. `inet_server_port()` in the statements
//! proves which node ran each one; `pg_stat_activity` on the standbys proves nothing is left
//! open there.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dbproxy::config::WriteStickiness;
use support::{code, config_for, Proxy};
use testkit::{wait_for, PgCluster, DEADLINE};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Marks this test's sessions in `pg_stat_activity`.
const APP: &str = "tx_reads";

fn cluster() -> Result<PgCluster> {
    PgCluster::builder().standbys(3).password("pw").start()
}

/// The first column of the first row of a simple query.
async fn value(c: &Client, sql: &str) -> Result<String> {
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).context("null")?.to_string());
        }
    }
    bail!("no row from {sql}")
}

async fn port(c: &Client, sql: &str) -> Result<u16> {
    Ok(value(c, sql).await?.parse()?)
}

/// Connects through dbproxy as [`APP`].
async fn connect(proxy: &Proxy) -> Result<Client> {
    let dsn = format!("{} application_name={APP}", proxy.conn_string("postgres", "pw"));
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Sessions of this test idle in a transaction on each standby.
fn open_on_standbys(cluster: &PgCluster) -> Result<usize> {
    let mut n = 0;
    for s in cluster.standbys() {
        n += s
            .psql(&format!(
                "select count(*) from pg_stat_activity where application_name = '{APP}' \
                 and state like 'idle in transaction%'"
            ))?
            .parse::<usize>()?;
    }
    Ok(n)
}

/// Waits until no session of this test is left in a transaction on any standby.
fn nothing_open_on_standbys(cluster: &PgCluster) -> Result<()> {
    wait_for("no transaction left open on the standbys", DEADLINE, || {
        Ok((open_on_standbys(cluster)? == 0).then_some(()))
    })
}

/// A cluster with table `t`, replayed everywhere, and dbproxy in front once every standby
/// serves reads.
async fn setup(mode: Option<WriteStickiness>) -> Result<(PgCluster, Proxy)> {
    let cluster = tokio::task::spawn_blocking(cluster).await??;
    cluster
        .primary()
        .psql("create table t(id int primary key, v text)")?;
    tokio::task::block_in_place(|| cluster.wait_replicated())?;
    let mut config = config_for(&cluster, Some("pw"));
    if let Some(m) = mode {
        config.routing.disable_load_balance_on_write = m;
    }
    let proxy = Proxy::start(config)?;
    // Every standby passes its health checks before the test counts where reads go.
    let ports: BTreeSet<u16> = cluster.standbys().map(|s| s.port()).collect();
    let mut seen = BTreeSet::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while seen != ports {
        if std::time::Instant::now() > deadline {
            bail!("reads reached only {seen:?} of the standbys {ports:?}");
        }
        let c = connect(&proxy).await?;
        seen.insert(port(&c, "select inet_server_port()").await?);
    }
    Ok((cluster, proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_transactions_reach_every_standby_until_a_write() -> Result<()> {
    support::bounded(reads_in_transactions_body()).await
}

async fn reads_in_transactions_body() -> Result<()> {
    let (cluster, proxy) = setup(None).await?;
    let pp = cluster.primary().port();
    let standbys: BTreeSet<u16> = cluster.standbys().map(|s| s.port()).collect();

    // Plain transactions that only read: simple protocol and tokio-postgres' extended one.
    let mut seen = BTreeSet::new();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut c = connect(&proxy).await?;
        c.batch_execute("begin").await?;
        let p = port(&c, "select inet_server_port()").await?;
        assert_ne!(p, pp, "a read in a plain transaction runs on a standby");
        assert_eq!(port(&c, "select inet_server_port()").await?, p, "on the same one");
        c.batch_execute("commit").await?;
        let tx = c.transaction().await?;
        let row = tx.query_one("select inet_server_port()", &[]).await?;
        assert_eq!(row.get::<_, i32>(0) as u16, p, "extended protocol");
        tx.commit().await?;
        seen.insert(p);
        clients.push(c);
    }
    assert_eq!(
        seen, standbys,
        "the transactions' reads reached all three standbys"
    );
    nothing_open_on_standbys(&cluster)?;

    // Read, write, read, commit: the write and everything after it run on the primary and the
    // read sees the write; the standby's half ends when the transaction moves.
    let c = &clients[0];
    c.batch_execute("begin").await?;
    let sp = port(c, "select inet_server_port()").await?;
    assert!(standbys.contains(&sp));
    assert_eq!(
        open_on_standbys(&cluster)?,
        1,
        "the transaction is open on the standby"
    );
    assert_eq!(
        port(c, "insert into t values (1, 'a') returning inet_server_port()").await?,
        pp,
        "the write"
    );
    assert_eq!(
        value(c, "select v || ':' || inet_server_port() from t where id = 1").await?,
        format!("a:{pp}"),
        "a read after the write sees it"
    );
    nothing_open_on_standbys(&cluster)?;
    c.batch_execute("commit").await?;
    assert_eq!(cluster.primary().psql("select v from t where id = 1")?, "a");

    // The same with tokio-postgres' extended protocol and a rollback.
    let mut c2 = connect(&proxy).await?;
    let tx = c2.transaction().await?;
    let p = tx
        .query_one("select inet_server_port()", &[])
        .await?
        .get::<_, i32>(0) as u16;
    assert!(standbys.contains(&p), "extended read on a standby");
    tx.execute("insert into t values ($1, $2)", &[&2i32, &"b"])
        .await?;
    let row = tx
        .query_one("select v, inet_server_port() from t where id = $1", &[&2i32])
        .await?;
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1) as u16),
        ("b".into(), pp)
    );
    tx.rollback().await?;
    assert_eq!(
        cluster.primary().psql("select count(*) from t where id = 2")?,
        "0"
    );
    nothing_open_on_standbys(&cluster)?;

    // FOR UPDATE and REPEATABLE READ / SERIALIZABLE run on the primary from their first statement.
    c.batch_execute("begin").await?;
    assert_eq!(port(c, "select inet_server_port() from t for update").await?, pp);
    c.batch_execute("commit").await?;
    for begin in [
        "begin isolation level repeatable read",
        "start transaction isolation level serializable",
    ] {
        c.batch_execute(begin).await?;
        assert_eq!(port(c, "select inet_server_port()").await?, pp, "{begin}");
        c.batch_execute("commit").await?;
    }
    // A session whose default isolation level was changed keeps its plain BEGINs on the primary.
    let d = connect(&proxy).await?;
    d.batch_execute("set default_transaction_isolation = 'repeatable read'")
        .await?;
    d.batch_execute("begin").await?;
    assert_eq!(
        value(
            &d,
            "select current_setting('transaction_isolation') || ':' || inet_server_port()"
        )
        .await?,
        format!("repeatable read:{pp}")
    );
    d.batch_execute("commit").await?;
    nothing_open_on_standbys(&cluster)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_savepoints_and_isolation_in_split_transactions() -> Result<()> {
    support::bounded(errors_savepoints_body()).await
}

async fn errors_savepoints_body() -> Result<()> {
    let (cluster, proxy) = setup(None).await?;
    let pp = cluster.primary().port();
    let direct = {
        let (c, conn) =
            tokio_postgres::connect(&cluster.primary().conn_string(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c
    };
    let c = connect(&proxy).await?;
    let err = |r: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) => code(&e),
    };

    // An error in the standby's half aborts the transaction as PostgreSQL would: every later
    // statement, a write too, gets 25P02 until ROLLBACK; nothing reaches the primary.
    c.batch_execute("begin").await?;
    assert_eq!(err(c.simple_query("select 1/0").await), "22012");
    assert_eq!(
        err(c.simple_query("insert into t values (10, 'x')").await),
        "25P02"
    );
    assert_eq!(err(c.simple_query("select 1").await), "25P02");
    assert_eq!(
        err(c.simple_query("commit").await),
        "ok",
        "COMMIT of a failed transaction rolls back"
    );
    assert_eq!(
        cluster.primary().psql("select count(*) from t where id = 10")?,
        "0"
    );
    nothing_open_on_standbys(&cluster)?;

    // An error in the primary's half: the same, and nothing of the transaction is committed.
    c.batch_execute("insert into t values (11, 'x')").await?;
    c.batch_execute("begin").await?;
    value(&c, "select inet_server_port()").await?;
    c.batch_execute("insert into t values (12, 'y')").await?;
    assert_eq!(
        err(c.simple_query("insert into t values (11, 'dup')").await),
        "23505"
    );
    assert_eq!(err(c.simple_query("select 1").await), "25P02");
    c.batch_execute("rollback").await?;
    assert_eq!(
        cluster.primary().psql("select count(*) from t where id = 12")?,
        "0"
    );
    nothing_open_on_standbys(&cluster)?;

    // Savepoints made in the standby's half are replayed on the primary when the transaction
    // moves, so ROLLBACK TO works there.
    c.batch_execute("begin").await?;
    c.batch_execute("savepoint a").await?;
    value(&c, "select inet_server_port()").await?;
    c.batch_execute("savepoint \"B b\"").await?;
    c.batch_execute("release savepoint \"B b\"").await?;
    c.batch_execute("savepoint c").await?;
    assert_eq!(
        port(&c, "insert into t values (13, 'z') returning inet_server_port()").await?,
        pp
    );
    c.batch_execute("rollback to savepoint c").await?;
    c.batch_execute("insert into t values (14, 'w')").await?;
    assert_eq!(
        err(c.simple_query("release \"B b\"").await),
        "3B001",
        "released before the move"
    );
    c.batch_execute("rollback to a").await?;
    c.batch_execute("insert into t values (15, 'v')").await?;
    c.batch_execute("commit").await?;
    assert_eq!(
        cluster
            .primary()
            .psql("select string_agg(id::text, ',' order by id) from t where id between 13 and 15")?,
        "15"
    );
    // An error on the standby, ROLLBACK TO a savepoint there, and the transaction goes on.
    c.batch_execute("begin").await?;
    c.batch_execute("savepoint s").await?;
    assert_eq!(err(c.simple_query("select 1/0").await), "22012");
    c.batch_execute("rollback to s").await?;
    c.batch_execute("insert into t values (16, 'u')").await?;
    c.batch_execute("commit").await?;
    assert_eq!(
        cluster.primary().psql("select count(*) from t where id = 16")?,
        "1"
    );
    nothing_open_on_standbys(&cluster)?;

    // SET TRANSACTION ISOLATION LEVEL right after BEGIN moves the transaction to the primary
    // before it runs; after a read, PostgreSQL's own answer (25001), as directly.
    c.batch_execute("begin").await?;
    c.batch_execute("set transaction isolation level repeatable read")
        .await?;
    assert_eq!(
        value(
            &c,
            "select current_setting('transaction_isolation') || ':' || inet_server_port()"
        )
        .await?,
        format!("repeatable read:{pp}")
    );
    c.batch_execute("commit").await?;
    for client in [&direct, &c] {
        client.batch_execute("begin").await?;
        value(client, "select 1").await?;
        assert_eq!(
            err(client
                .simple_query("set transaction isolation level serializable")
                .await),
            "25001"
        );
        client.batch_execute("rollback").await?;
        client.batch_execute("begin").await?;
        value(client, "select 1").await?;
        assert_eq!(
            err(client
                .simple_query("set transaction isolation level read committed")
                .await),
            "ok",
            "the same level is no change"
        );
        client.batch_execute("commit").await?;
    }
    nothing_open_on_standbys(&cluster)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_modes_keep_their_pgpool_meaning() -> Result<()> {
    support::bounded(write_modes_body()).await
}

async fn write_modes_body() -> Result<()> {
    // always: after a write, everything goes to the primary, transactions included.
    let (cluster, proxy) = setup(Some(WriteStickiness::Always)).await?;
    let pp = cluster.primary().port();
    let c = connect(&proxy).await?;
    c.batch_execute("begin").await?;
    assert_ne!(
        port(&c, "select inet_server_port()").await?,
        pp,
        "before any write"
    );
    c.batch_execute("commit").await?;
    c.batch_execute("insert into t values (1, 'a')").await?;
    c.batch_execute("begin").await?;
    assert_eq!(port(&c, "select inet_server_port()").await?, pp, "after a write");
    c.batch_execute("commit").await?;
    drop(proxy);

    // trans_transaction: once a transaction wrote, later transactions run on the primary; reads
    // outside transactions stay balanced.
    let mut config = config_for(&cluster, Some("pw"));
    config.routing.disable_load_balance_on_write = WriteStickiness::TransTransaction;
    let proxy = Proxy::start(config)?;
    let c = wait_for_standby_reads(&proxy, pp).await?;
    c.batch_execute("insert into t values (2, 'b')").await?;
    c.batch_execute("begin").await?;
    assert_ne!(
        port(&c, "select inet_server_port()").await?,
        pp,
        "an autocommit write does not count"
    );
    c.batch_execute("insert into t values (3, 'c')").await?;
    c.batch_execute("commit").await?;
    c.batch_execute("begin").await?;
    assert_eq!(
        port(&c, "select inet_server_port()").await?,
        pp,
        "after a transaction wrote"
    );
    c.batch_execute("commit").await?;
    assert_ne!(
        port(&c, "select inet_server_port()").await?,
        pp,
        "outside a transaction"
    );
    Ok(())
}

/// A session whose plain reads reach a standby (once the new proxy's health checks pass).
async fn wait_for_standby_reads(proxy: &Proxy, pp: u16) -> Result<Client> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let c = connect(proxy).await?;
        if port(&c, "select inet_server_port()").await? != pp {
            return Ok(c);
        }
        if std::time::Instant::now() > deadline {
            bail!("no read reached a standby");
        }
    }
}

/// psycopg2 (autocommit off: an implicit BEGIN before each transaction's first statement) and
/// asyncpg (`conn.transaction()`, extended protocol): their transactions' reads reach all three
/// standbys; a read after a write in the same transaction sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers_transactions_read_on_the_standbys() -> Result<()> {
    support::bounded(psycopg2_body()).await
}

async fn psycopg2_body() -> Result<()> {
    let (cluster, proxy) = setup(None).await?;
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres application_name={APP}",
        proxy.port()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tx_reads.py");
    let out = tokio::task::block_in_place(|| {
        testkit::run_limited(
            Command::new("python3").args([script, &dsn]),
            Duration::from_secs(60),
        )
    })
    .context("python3 with psycopg2")?;
    let answer: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    let ports: BTreeSet<u64> = answer["read_ports"]
        .as_array()
        .context("read_ports")?
        .iter()
        .filter_map(|p| p.as_u64())
        .collect();
    let standbys: BTreeSet<u64> = cluster.standbys().map(|s| u64::from(s.port())).collect();
    assert_eq!(
        ports, standbys,
        "psycopg2's transactions read on all three standbys: {out}"
    );
    let pp = u64::from(cluster.primary().port());
    assert_eq!(answer["write_port"].as_u64(), Some(pp), "{out}");
    assert_eq!(answer["read_after_write"], serde_json::json!(["x", pp]), "{out}");
    assert_eq!(cluster.primary().psql("select v from t where id = 100")?, "x");
    let ports: BTreeSet<u64> = answer["asyncpg_read_ports"]
        .as_array()
        .context("asyncpg_read_ports")?
        .iter()
        .filter_map(|p| p.as_u64())
        .collect();
    assert_eq!(
        ports, standbys,
        "asyncpg's transactions read on all three standbys: {out}"
    );
    assert_eq!(answer["asyncpg_write_port"].as_u64(), Some(pp), "{out}");
    assert_eq!(
        answer["asyncpg_read_after_write"],
        serde_json::json!(["y", pp]),
        "{out}"
    );
    assert_eq!(cluster.primary().psql("select v from t where id = 101")?, "y");
    nothing_open_on_standbys(&cluster)?;
    Ok(())
}

/// A standby killed while it holds a transaction's reads: the session ends with an error (its
/// transaction cannot go on anywhere else), never a hang; nothing was written, and new sessions
/// go on with the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lost_inside_a_transaction_ends_the_session() -> Result<()> {
    support::bounded(standby_lost_body()).await
}

async fn standby_lost_body() -> Result<()> {
    let (cluster, proxy) = setup(None).await?;
    let pp = cluster.primary().port();
    let c = connect(&proxy).await?;
    c.batch_execute("begin").await?;
    let sp = port(&c, "select inet_server_port()").await?;
    let standby = cluster
        .standbys()
        .find(|s| s.port() == sp)
        .context("the read ran on a standby")?;
    tokio::task::block_in_place(|| standby.kill9())?;
    // dbproxy sees the standby's connection end and ends the session (FATAL 08006).
    let deadline = std::time::Instant::now() + DEADLINE;
    while !c.is_closed() {
        if std::time::Instant::now() > deadline {
            bail!("the session outlived its transaction's standby");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let next = c.simple_query("insert into t values (1, 'a')").await;
    assert!(next.is_err(), "the transaction's standby is gone: {next:?}");
    assert_eq!(cluster.primary().psql("select count(*) from t")?, "0");
    let d = connect(&proxy).await?;
    d.batch_execute("begin").await?;
    let p = port(&d, "select inet_server_port()").await?;
    assert!(p != sp, "a new session does not read on the dead standby");
    assert_eq!(
        port(&d, "insert into t values (2, 'b') returning inet_server_port()").await?,
        pp
    );
    d.batch_execute("commit").await?;
    assert_eq!(cluster.primary().psql("select count(*) from t")?, "1");
    Ok(())
}

/// A standby lost in the middle of a read of a transaction whose reads run there, before any
/// of the read's answer reached the client (its backend terminated during a `pg_sleep`): the
/// transaction moves to the primary as at a first write (BEGIN and savepoints replayed there),
/// the read is answered there, and the transaction goes on and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lost_mid_read_moves_the_transaction_to_the_primary() -> Result<()> {
    support::bounded(lost_mid_read_body()).await
}

async fn lost_mid_read_body() -> Result<()> {
    let (cluster, proxy) = setup(None).await?;
    let pp = cluster.primary().port();
    let c = connect(&proxy).await?;
    c.batch_execute("begin").await?;
    let sp = port(&c, "select inet_server_port()").await?;
    assert_ne!(sp, pp, "the reads start on a standby");
    c.batch_execute("savepoint a").await?;
    let standby = cluster
        .standbys()
        .find(|s| s.port() == sp)
        .context("the read ran on a standby")?;
    let sleeping = format!(
        "select pid from pg_stat_activity where application_name = '{APP}' \
         and query like 'select pg_sleep%' and state = 'active'"
    );
    let read = c.simple_query("select pg_sleep(2), inet_server_port()");
    let kill = async {
        let pid = tokio::task::block_in_place(|| {
            wait_for("the read running on the standby", DEADLINE, || {
                let pid = standby.psql(&sleeping)?;
                Ok((!pid.is_empty()).then_some(pid))
            })
        })?;
        tokio::task::block_in_place(|| standby.psql(&format!("select pg_terminate_backend({pid})")))?;
        anyhow::Ok(())
    };
    let (answer, killed) = tokio::join!(read, kill);
    killed?;
    let row = answer?
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(1).map(str::to_string),
            _ => None,
        })
        .context("no row")?;
    assert_eq!(row.parse::<u16>()?, pp, "answered by the primary");
    assert_eq!(
        port(&c, "select inet_server_port()").await?,
        pp,
        "the transaction moved"
    );
    c.batch_execute("insert into t values (7, 'x'); rollback to savepoint a; insert into t values (8, 'y')")
        .await?;
    c.batch_execute("commit").await?;
    assert_eq!(cluster.primary().psql("select string_agg(v, ',') from t")?, "y");
    nothing_open_on_standbys(&cluster)?;
    Ok(())
}
