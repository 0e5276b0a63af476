//! Bad input from clients and misbehaving backends, over real sockets: each gets the SQLSTATE
//! PostgreSQL would give, and nothing hangs or affects other sessions.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use dbproxy::config::{AuthMethod, HbaRule};
use dbproxy::protocol::startup;
use support::{config_for, msg, Proxy, Raw};
use testkit::{wait_for, PgCluster, DEADLINE};
use tokio::io::AsyncReadExt;

/// A proxy configuration that trusts every client.
fn trusting(cluster: &PgCluster) -> dbproxy::Config {
    let mut config = config_for(cluster, None);
    config.users.clear();
    config.hba = vec![HbaRule {
        method: AuthMethod::Trust,
        ..HbaRule::default()
    }];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_postgres_errors() -> Result<()> {
    support::bounded(bad_input_gets_postgres_errors_body()).await
}

async fn bad_input_gets_postgres_errors_body() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::builder().standbys(0).start()).await??;
    let mut config = trusting(&cluster);
    config.limits.max_message_size = 4096;
    let proxy = Proxy::start(config)?;

    // SSLRequest and GSSENCRequest are refused with N, then startup goes on in clear text.
    let mut r = Raw::connect(&proxy).await?;
    let mut out = BytesMut::new();
    startup::encode_ssl_request(&mut out);
    r.send(&out).await?;
    let mut one = [0u8; 1];
    r.s.read_exact(&mut one).await?;
    assert_eq!(&one, b"N");
    r.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await?;
    r.s.read_exact(&mut one).await?;
    assert_eq!(&one, b"N");

    // A startup packet with an impossible length.
    let mut r = Raw::connect(&proxy).await?;
    r.send(&[0, 0, 0, 4]).await?;
    assert_eq!(r.fatal_code().await?, "08P01");
    // An unsupported protocol version.
    let mut r = Raw::connect(&proxy).await?;
    r.send(&[0, 0, 0, 8, 0, 2, 0, 0]).await?;
    assert_eq!(r.fatal_code().await?, "0A000");
    // No user name.
    let mut r = Raw::connect(&proxy).await?;
    let mut out = BytesMut::new();
    startup::encode_startup([("database", "postgres")], &mut out);
    r.send(&out).await?;
    assert_eq!(r.fatal_code().await?, "28000");

    // An oversized password message during authentication is refused before it is buffered
    // (64 KiB there, whatever max_message_size says).
    let mut config = config_for(&cluster, None);
    config.users = vec![dbproxy::config::UserConfig {
        name: "postgres".into(),
        password: Some("pw".into()),
        ..Default::default()
    }];
    let scram_proxy = Proxy::start(config)?;
    let mut r = Raw::connect(&scram_proxy).await?;
    let mut out = BytesMut::new();
    startup::encode_startup([("user", "postgres")], &mut out);
    r.send(&out).await?;
    let f = r.frame().await?.context("no authentication request")?;
    assert_eq!(f.tag(), b'R', "SCRAM is requested");
    r.send(&[b'p', 0x00, 0x10, 0x00, 0x00]).await?;
    assert_eq!(r.fatal_code().await?, "08P01");
    drop(scram_proxy);

    // A client that stays silent during startup is dropped at startup_timeout (1 s here).
    let started = Instant::now();
    let mut r = Raw::connect(&proxy).await?;
    assert_eq!(r.fatal_code().await?, "57014");
    assert!(started.elapsed() < Duration::from_secs(8), "timed out promptly");

    // Oversized, unknown, malformed, and out-of-order messages after login.
    let mut r = Raw::login(&proxy).await?;
    r.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await?;
    assert_eq!(r.fatal_code().await?, "08P01", "oversized");
    let mut r = Raw::login(&proxy).await?;
    r.send(&[b'Q', 0, 0, 0, 2]).await?;
    assert_eq!(r.fatal_code().await?, "08P01", "length below 4");
    let mut r = Raw::login(&proxy).await?;
    r.send(&msg(b'z', b"")).await?;
    assert_eq!(r.fatal_code().await?, "08P01", "unknown type");
    let mut r = Raw::login(&proxy).await?;
    r.send(&msg(b'P', b"s1\0select 1")).await?;
    assert_eq!(r.fatal_code().await?, "08P01", "malformed Parse");
    let mut r = Raw::login(&proxy).await?;
    r.send(&msg(b'Q', b"select 1")).await?;
    assert_eq!(r.fatal_code().await?, "08P01", "Query without terminator");
    let mut r = Raw::login(&proxy).await?;
    let mut batch = msg(b'P', b"\0select 1\0\0\0");
    batch.extend(msg(b'Q', b"select 2\0"));
    r.send(&batch).await?;
    assert_eq!(r.fatal_code().await?, "08P01", "Query inside an extended batch");
    // A FunctionCall there too: sent on ahead of the held batch, it would run out of order.
    let mut r = Raw::login(&proxy).await?;
    let mut batch = msg(b'P', b"\0select 1\0\0\0");
    batch.extend(msg(b'F', b"\0\0\x0c\xe2\0\0\0\0\0\0"));
    r.send(&batch).await?;
    assert_eq!(
        r.fatal_code().await?,
        "08P01",
        "FunctionCall inside an extended batch"
    );

    // The proxy still serves well-behaved clients.
    let c = proxy.connect("postgres", "").await?;
    assert_eq!(c.simple_query("select 1").await?.len(), 3);

    // A client that disconnects mid-query: its backend query is cancelled.
    let mut r = Raw::login(&proxy).await?;
    r.send(&msg(b'Q', b"select pg_sleep(60) /* abandoned */\0"))
        .await?;
    let primary = cluster.primary();
    let running = "select count(*) from pg_stat_activity where query like '%abandoned%' \
                   and state = 'active' and pid <> pg_backend_pid()";
    wait_for("the query to start", DEADLINE, || {
        Ok((primary.psql(running)? == "1").then_some(()))
    })?;
    drop(r);
    wait_for("the abandoned query to be cancelled", DEADLINE, || {
        Ok((primary.psql(running)? == "0").then_some(()))
    })?;

    // A client's CancelRequest reaches the backend running its query.
    let c2 = proxy.connect("postgres", "").await?;
    let token = c2.cancel_token();
    let sleeper = tokio::spawn(async move { c2.simple_query("select pg_sleep(60) /* to cancel */").await });
    let running = "select count(*) from pg_stat_activity where query like '%to cancel%' \
                   and state = 'active' and pid <> pg_backend_pid()";
    wait_for("the query to start", DEADLINE, || {
        Ok((primary.psql(running)? == "1").then_some(()))
    })?;
    token.cancel_query(tokio_postgres::NoTls).await?;
    let err = sleeper.await?.expect_err("cancelled");
    assert_eq!(support::code(&err), "57014");

    // pg_terminate_backend of an idle session's backend (the process id the client got, as
    // `pg_stat_activity` shows it): the session ends with that backend's FATAL 57P01, as it
    // would directly; the others carry on.
    let victim = proxy.connect("postgres", "").await?;
    let other = proxy.connect("postgres", "").await?;
    victim.simple_query("select 1 /* victim */").await?;
    primary.psql(
        "select pg_terminate_backend(pid, 5000) from pg_stat_activity where query like '%victim%' \
         and pid <> pg_backend_pid()",
    )?;
    let err = victim
        .simple_query("select 2")
        .await
        .expect_err("the session's backend was terminated");
    // The FATAL comes when the backend goes, as directly: tokio-postgres reports it if it came
    // after the query was sent, otherwise only that the connection closed.
    assert!(err.is_closed() || support::code(&err) == "57P01", "{err}");
    assert!(
        victim.simple_query("select 3").await.is_err(),
        "the session ended"
    );

    // The same while the backend runs the client's statement: 57P01 to that client, whose
    // session ends.
    let running = tokio::spawn({
        let victim_sql = "select pg_sleep(30) /* dropped */";
        let c = proxy.connect("postgres", "").await?;
        async move {
            let r = c.simple_query(victim_sql).await;
            (c, r)
        }
    });
    let active = "select count(*) from pg_stat_activity where query like '%dropped%' \
                  and state = 'active' and pid <> pg_backend_pid()";
    wait_for("the statement to start", DEADLINE, || {
        Ok((primary.psql(active)? == "1").then_some(()))
    })?;
    primary.psql(
        "select pg_terminate_backend(pid) from pg_stat_activity where query like '%dropped%' \
         and pid <> pg_backend_pid()",
    )?;
    let (dropped, r) = running.await?;
    let err = r.expect_err("the backend was terminated mid-statement");
    assert_eq!(support::code(&err), "57P01", "{err}");
    assert!(
        dropped.simple_query("select 3").await.is_err(),
        "the session ended"
    );
    // Those dropped connections were data-path errors on the primary: each made the health
    // checker look at once, and it found the primary fine: no failover, no node down.
    let status: serde_json::Value = serde_json::from_str(&proxy.admin_get("/status")?)?;
    assert_eq!(status["history"], serde_json::json!([]), "{status}");
    assert_eq!(status["primary"], 0, "{status}");
    assert_eq!(status["nodes"][0]["status"], "up", "{status}");
    assert_eq!(
        other.simple_query("select 1").await?.len(),
        3,
        "other sessions are unaffected"
    );
    Ok(())
}

/// A client that sends Bind/Execute pairs for ever without a Sync does not make dbproxy hold them
/// all: past its bound the batch goes on to the primary (a held batch of reads would have gone to
/// the standby at its Sync), and every row still comes back, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_without_sync_is_not_held_without_bound() -> Result<()> {
    support::bounded(a_batch_without_sync_body()).await
}

async fn a_batch_without_sync_body() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).start()).await??;
    let config = trusting(&cluster);
    let proxy = Proxy::start(config)?;
    let mut r = Raw::login(&proxy).await?;
    const N: usize = 5000;
    let mut out = msg(b'P', b"\0select $1::int, pg_is_in_recovery()\0\0\0");
    for i in 0..N {
        let v = i.to_string();
        let mut bind = b"\0\0\0\0\0\x01".to_vec();
        bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
        bind.extend_from_slice(v.as_bytes());
        bind.extend_from_slice(b"\0\0");
        out.extend(msg(b'B', &bind));
        out.extend(msg(b'E', b"\0\0\0\0\0"));
    }
    out.extend(msg(b'S', b""));
    r.send(&out).await?;
    let mut rows = 0usize;
    loop {
        let f = r.frame().await?.context("closed mid-batch")?;
        match f.tag() {
            b'D' => {
                // The parameter sent, then whether a standby ran it.
                let body = f.body();
                let len = i32::from_be_bytes(body[2..6].try_into()?) as usize;
                assert_eq!(std::str::from_utf8(&body[6..6 + len])?, rows.to_string());
                let rest = &body[6 + len..];
                assert_eq!(
                    &rest[4..],
                    b"f",
                    "row {rows} ran on a standby: the batch was held to its Sync"
                );
                rows += 1;
            }
            b'Z' => break,
            b'E' => anyhow::bail!("error: {:?}", dbproxy::protocol::error::field(f.body(), b'M')),
            _ => {}
        }
    }
    assert_eq!(rows, N);
    // The session goes on.
    assert_eq!(r.value("select 42").await?.as_deref(), Some(&b"42"[..]));

    // A FunctionCall (the fast-path interface) is answered, by the primary.
    let oid = r.value("select 'pg_is_in_recovery'::regproc::oid").await?;
    let oid: u32 = std::str::from_utf8(&oid.context("no oid")?)?.parse()?;
    let mut call = oid.to_be_bytes().to_vec();
    call.extend_from_slice(b"\0\0\0\0\0\0"); // no argument formats, no arguments, text result
    for _ in 0..2 {
        r.send(&msg(b'F', &call)).await?;
        // FunctionCallResponse: the value's length (4 bytes), then the value.
        let value = r.last_until_ready(b'V', 4).await?;
        assert_eq!(
            value.as_deref(),
            Some(&b"f"[..]),
            "pg_is_in_recovery() ran on the primary"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_per_session_are_capped() -> Result<()> {
    support::bounded(prepared_cap_body()).await
}

async fn prepared_cap_body() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::builder().start()).await??;
    let mut config = trusting(&cluster);
    config.limits.max_prepared_statements = 3;
    let proxy = Proxy::start(config)?;
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            proxy.port()
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(client.prepare(&format!("select {i}")).await?);
    }
    // A closed statement frees its place (tokio-postgres closes it when dropped).
    kept.pop();
    kept.push(client.prepare("select 'again'").await?);
    let e = client.prepare("select 'one too many'").await.unwrap_err();
    let db = e.as_db_error().context("an ErrorResponse")?;
    assert_eq!(db.code().code(), "53400");
    assert_eq!(
        db.message(),
        "too many prepared statements in this session (limits.max_prepared_statements = 3)"
    );
    assert!(client.is_closed() || client.simple_query("select 1").await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_share_one_memory_budget() -> Result<()> {
    support::bounded(message_budget_body()).await
}

/// dbproxy's `dbproxy_message_memory_bytes` gauge, polled until it is `want`.
fn wait_charged(proxy: &Proxy, want: usize) -> Result<()> {
    wait_for(&format!("{want} bytes charged"), DEADLINE, || {
        let metrics = proxy.admin_get("/metrics")?;
        let now = metrics
            .lines()
            .find_map(|l| l.strip_prefix("dbproxy_message_memory_bytes "))
            .context("no dbproxy_message_memory_bytes")?;
        Ok((now.trim() == want.to_string()).then_some(()))
    })
}

/// `limits.max_message_memory` bounds what large client messages hold at once over all sessions.
/// With 5 MiB queries (charged twice their size) and a budget of 16 MiB: a session whose query
/// is still arriving holds its charge, a second session's large query then ends that session
/// with 53200 while a small query runs as usual, and once the first query is answered its charge
/// is given back and a third session's large query runs.
async fn message_budget_body() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::builder().start()).await??;
    let mut config = trusting(&cluster);
    config.limits.max_message_size = 8 << 20;
    config.limits.max_message_memory = 16 << 20;
    let proxy = Proxy::start(config)?;
    const TEXT: usize = 5 << 20;
    let mut sql = format!("select length('{}')", "x".repeat(TEXT)).into_bytes();
    sql.push(0);
    let big = msg(b'Q', &sql);
    let length = TEXT.to_string().into_bytes();

    let mut a = Raw::login(&proxy).await?;
    let (head, rest) = big.split_at(big.len() / 2);
    a.send(head).await?;
    tokio::task::block_in_place(|| wait_charged(&proxy, 2 * big.len()))?;

    let mut b = Raw::login(&proxy).await?;
    b.send(&big).await?;
    assert_eq!(b.fatal_code().await?, "53200", "past the budget");
    let mut small = Raw::login(&proxy).await?;
    assert_eq!(small.value("select 'small'").await?, Some(b"small".to_vec()));

    a.send(rest).await?;
    assert_eq!(a.last_until_ready(b'D', 6).await?, Some(length.clone()));
    tokio::task::block_in_place(|| wait_charged(&proxy, 0))?;

    let mut c = Raw::login(&proxy).await?;
    c.send(&big).await?;
    assert_eq!(c.last_until_ready(b'D', 6).await?, Some(length));
    assert_eq!(a.value("select 'a again'").await?, Some(b"a again".to_vec()));
    Ok(())
}
