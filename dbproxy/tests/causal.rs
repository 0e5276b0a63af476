//! Read-your-writes by WAL position through real PostgreSQL (a primary and a standby from
//! testkit): a read sent right after a write, before dbproxy has learnt the write's WAL
//! position, must not reach a standby that may not have replayed it.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use support::{config_for, Proxy};
use testkit::PgCluster;

/// The one value a simple query returns.
async fn value(c: &tokio_postgres::Client, sql: &str) -> Result<String> {
    for m in c.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).context("null")?.to_string());
        }
    }
    anyhow::bail!("no row from {sql}")
}

/// Inserts `id` and reads it back at once on `c`; true when the read saw the row.
async fn write_then_read(c: &tokio_postgres::Client, id: u32) -> Result<bool> {
    c.simple_query(&format!("insert into t values ({id})")).await?;
    Ok(value(c, &format!("select count(*) from t where id = {id}")).await? == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_right_after_a_write_sees_it() -> Result<()> {
    support::bounded(a_read_right_after_a_write_sees_it_body()).await
}

/// A primary and a standby, dbproxy with causal reads in front, table `t` replayed on the
/// standby, and a session whose reads reach the standby. Returns the standby's port too.
async fn start() -> Result<(PgCluster, String, Proxy, tokio_postgres::Client)> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    let sp = cluster.standby(0).port().to_string();
    let mut config = config_for(&cluster, Some("pw"));
    config.routing.read_your_writes_by_lsn = true;
    let proxy = Proxy::start(config)?;
    let c = proxy.connect("postgres", "pw").await?;
    c.batch_execute("create table t(id int primary key)").await?;
    tokio::task::block_in_place(|| {
        cluster
            .standby(0)
            .wait_replayed(&cluster.primary().current_lsn()?)
    })?;
    // Once the health checks see the standby past the table's creation, reads go there.
    reads_reach(&c, &sp).await?;
    Ok((cluster, sp, proxy, c))
}

async fn a_read_right_after_a_write_sees_it_body() -> Result<()> {
    let (cluster, sp, proxy, _setup) = start().await?;

    // With replay paused on the standby, any read that reaches it misses the row just written.
    // A new session's first write is the one whose position dbproxy learns last: the read
    // right behind it is where the race was (before the fix, about a third of these reads were
    // stale, and about 1 in 6000 of the loop below).
    replay(&cluster, false)?;
    let mut stale = 0;
    const SESSIONS: u32 = 300;
    for id in 0..SESSIONS {
        let c = proxy.connect("postgres", "pw").await?;
        if !write_then_read(&c, id).await? {
            stale += 1;
        }
    }
    replay(&cluster, true)?;
    let first_stale = stale;

    // One session in a tight loop with replay running: every read sees the write before it.
    let c = proxy.connect("postgres", "pw").await?;
    let (mut stale, mut n) = (0, 0);
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if !write_then_read(&c, SESSIONS + n).await? {
            stale += 1;
        }
        n += 1;
    }
    assert_eq!(
        (first_stale, stale),
        (0, 0),
        "stale reads: {first_stale} of {SESSIONS} right after a new session's first write, \
         {stale} of {n} in one session's loop"
    );

    // Reads still reach the standby once it has replayed the session's writes.
    reads_reach(&c, &sp).await
}

/// Pauses (`false`) or resumes (`true`) WAL replay on the standby: while it is paused, a read
/// that reaches the standby misses every write since.
fn replay(cluster: &PgCluster, on: bool) -> Result<()> {
    let sql = if on {
        "select pg_wal_replay_resume()"
    } else {
        "select pg_wal_replay_pause()"
    };
    tokio::task::block_in_place(|| cluster.standby(0).psql(sql))?;
    Ok(())
}

/// Polls until a read on `c` runs on the server listening on `port`.
async fn reads_reach(c: &tokio_postgres::Client, port: &str) -> Result<()> {
    let deadline = Instant::now() + testkit::DEADLINE;
    while value(c, "select inet_server_port()").await? != port {
        anyhow::ensure!(Instant::now() < deadline, "reads never reached port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_asynchronous_commit_sees_it() -> Result<()> {
    support::bounded(asynchronous_commit_body()).await
}

/// With `synchronous_commit = off` a commit is visible on the primary before its WAL is written,
/// so the position to wait for is where WAL is inserted, not where it is written: a standby that
/// replayed everything written may still miss the commit.
async fn asynchronous_commit_body() -> Result<()> {
    let (cluster, _sp, _proxy, c) = start().await?;
    // The WAL writer then leaves an asynchronous commit in the WAL buffers for seconds.
    tokio::task::block_in_place(|| {
        cluster
            .primary()
            .psql("alter system set wal_writer_delay = '10s'")?;
        cluster.primary().psql("select pg_reload_conf()")
    })?;
    c.batch_execute("set synchronous_commit = off").await?;
    const WRITES: u32 = 50;
    let mut stale = 0;
    for id in 0..WRITES {
        if !write_then_read(&c, id).await? {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "{stale} of {WRITES} reads missed the asynchronous commit before them"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_copy_from_stdin_sees_it() -> Result<()> {
    support::bounded(copy_body()).await
}

/// No WAL position can be asked for behind a COPY FROM STDIN (a query sent while the server
/// waits for the data fails the COPY), so the read after one runs on the primary until a
/// position is learnt. With replay paused on the standby, a read that reached it would miss
/// the copied rows. The extended protocol (tokio-postgres) and the simple one (psql) both.
async fn copy_body() -> Result<()> {
    use futures_util::SinkExt;
    let (cluster, sp, proxy, c) = start().await?;
    replay(&cluster, false)?;

    for round in 0..20u32 {
        let sink = c.copy_in("copy t from stdin").await?;
        futures_util::pin_mut!(sink);
        let first = 10_000 + 2 * round;
        sink.send(bytes::Bytes::from(format!("{first}\n{}\n", first + 1)))
            .await?;
        assert_eq!(sink.finish().await?, 2);
        let seen = value(
            &c,
            &format!("select count(*) from t where id in ({first}, {})", first + 1),
        )
        .await?;
        assert_eq!(seen, "2", "round {round}: the read after COPY missed its rows");
    }

    // psql sends COPY FROM STDIN as a simple query, and the next -c in the same session.
    let out = tokio::task::block_in_place(|| -> Result<String> {
        use std::io::Write;
        let mut child = support::pg_program("psql")?
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
            .arg(proxy.port().to_string())
            .args(["-U", "postgres", "-d", "postgres"])
            .args([
                "-c",
                "copy t from stdin",
                "-c",
                "select count(*) from t where id >= 20000",
            ])
            .env("PGPASSWORD", "pw")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(b"20000\n20001\n20002\n\\.\n")?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })?;
    assert_eq!(out.lines().last(), Some("3"), "psql printed {out:?}");

    replay(&cluster, true)?;
    // Once the standby has replayed the session's position, its reads go back there.
    reads_reach(&c, &sp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_transaction_sees_its_writes() -> Result<()> {
    support::bounded(transaction_body()).await
}

/// Inside a transaction block the WAL position is learnt only behind what may end it (its
/// statements run on the primary until then): writes sent one statement at a time, then
/// COMMIT, END, or COMMIT sent together with a write, in the simple protocol and in the
/// extended one, and the read after each must see them.
/// With replay paused on the standby, a read that reached it would miss them.
async fn transaction_body() -> Result<()> {
    let (cluster, sp, _proxy, c) = start().await?;
    replay(&cluster, false)?;
    let mut id = 30_000;
    for end in ["commit", "end", "commit and chain; commit"] {
        for _ in 0..10 {
            c.simple_query("begin").await?;
            c.simple_query(&format!("insert into t values ({id})")).await?;
            c.simple_query(&format!("update t set id = id + 1 where id = {id}"))
                .await?;
            c.simple_query(end).await?;
            let seen = value(&c, &format!("select count(*) from t where id = {}", id + 1)).await?;
            assert_eq!(seen, "1", "the read after `{end}` missed the transaction's write");
            id += 2;
        }
    }
    // The extended protocol: each statement its own batch, COMMIT one too.
    for _ in 0..10 {
        c.execute("begin", &[]).await?;
        let row: i32 = id;
        c.execute("insert into t values ($1)", &[&row]).await?;
        c.execute("update t set id = id + 1 where id = $1", &[&row])
            .await?;
        c.execute("commit", &[]).await?;
        let seen = value(&c, &format!("select count(*) from t where id = {}", id + 1)).await?;
        assert_eq!(
            seen, "1",
            "the read after an extended-protocol COMMIT missed its write"
        );
        id += 2;
    }
    for _ in 0..10 {
        c.simple_query("begin").await?;
        c.simple_query(&format!("insert into t values ({id}); commit"))
            .await?;
        let seen = value(&c, &format!("select count(*) from t where id = {id}")).await?;
        assert_eq!(seen, "1", "the read after a write sent with its COMMIT missed it");
        id += 1;
    }
    replay(&cluster, true)?;
    reads_reach(&c, &sp).await
}
