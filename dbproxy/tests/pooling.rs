//! Session-mode connection pooling against real PostgreSQL: a server connection a client left is
//! reset and reused without a backend login (same backend pid, same backend_start), no session
//! state leaks to the next client, a connection left inside a transaction is closed, the pool
//! size holds under many pgbench clients (counted in pg_stat_activity), a full pool answers 53300
//! after `pool.checkout_timeout`, a cancel still reaches a reused connection, SHOW POOLS /
//! CLIENTS / SERVERS, a failover while clients wait for a pooled connection, and a connection
//! its client never used going back without a reset.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use support::pooling::{cluster, metric, one, pgbench, pgbench_init, proxy, MaxConnections};
use support::Proxy;
use testkit::{wait_for, DEADLINE};

/// SHOW `what` through the proxy, as one map of column → value per row.
async fn show(proxy: &Proxy, what: &str) -> Result<Vec<HashMap<String, String>>> {
    let client = proxy.connect("postgres", "pw").await?;
    let rows = client.simple_query(&format!("show {what}")).await?;
    let mut out = Vec::new();
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let mut row = HashMap::new();
            for (i, col) in r.columns().iter().enumerate() {
                row.insert(col.name().to_string(), r.get(i).unwrap_or("").to_string());
            }
            out.push(row);
        }
    }
    Ok(out)
}

/// The server pid and backend_start of a session's primary connection.
async fn backend_of(client: &tokio_postgres::Client) -> Result<(String, String)> {
    let pid = one(client, "select pg_backend_pid()").await?;
    let start = one(
        client,
        "select backend_start::text from pg_stat_activity where pid = pg_backend_pid()",
    )
    .await?;
    Ok((pid, start))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_saves_the_login_and_carries_no_state_of_the_last_client() -> Result<()> {
    support::bounded(reuse_body()).await
}

async fn reuse_body() -> Result<()> {
    let c = cluster(0).await?;
    c.primary().psql("create table t (x int)")?;
    // One connection per key: the next client can only get the one the last client left.
    let p = proxy(&c, 1, |_| {})?;
    let first = p.connect("postgres", "pw").await?;
    let (pid, started) = backend_of(&first).await?;
    // Session state of every kind PostgreSQL keeps per connection.
    first
        .batch_execute(
            "set work_mem = '7MB'; set application_name = 'leaky'; \
             create temp table tt (x int); prepare p as select 1; listen chan; \
             select pg_advisory_lock(42); declare cur cursor with hold for select 1",
        )
        .await?;
    // A protocol-level prepared statement too.
    let stmt = first.prepare("select $1::int + 1").await?;
    assert_eq!(first.query_one(&stmt, &[&1i32]).await?.get::<_, i32>(0), 2);
    drop(stmt);
    drop(first);
    // The next client waits (within pool.checkout_timeout) for the reset to finish.
    let second = p.connect("postgres", "pw").await?;
    let (pid2, started2) = backend_of(&second).await?;
    assert_eq!(
        (&pid2, &started2),
        (&pid, &started),
        "the same server connection, no new login"
    );
    assert_eq!(one(&second, "show work_mem").await?, "4MB");
    assert_eq!(one(&second, "show application_name").await?, "");
    assert_eq!(
        one(&second, "select count(*) from pg_prepared_statements").await?,
        "0"
    );
    assert_eq!(
        one(&second, "select to_regclass('pg_temp.tt') is null").await?,
        "t"
    );
    assert_eq!(
        one(&second, "select count(*) from pg_listening_channels()").await?,
        "0"
    );
    assert_eq!(
        one(
            &second,
            "select count(*) from pg_locks where locktype = 'advisory'"
        )
        .await?,
        "0"
    );
    assert_eq!(one(&second, "select count(*) from pg_cursors").await?, "0");
    // The client's own prepared statements work on the reused connection.
    let stmt = second.prepare("select $1::int * 3").await?;
    assert_eq!(second.query_one(&stmt, &[&2i32]).await?.get::<_, i32>(0), 6);

    // A cancel reaches the reused connection (the client's key maps to the backend now serving it).
    let token = second.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = second.simple_query("select pg_sleep(60)").await;
        (second, r)
    });
    wait_for("the sleep to run", DEADLINE, || {
        let n = c.primary().psql(&format!(
            "select count(*) from pg_stat_activity where pid = {pid} and query like 'select pg_sleep%' and state = 'active'"
        ))?;
        Ok((n == "1").then_some(()))
    })?;
    token.cancel_query(tokio_postgres::NoTls).await?;
    let (second, r) = sleeper.await?;
    let e = r.expect_err("the sleep was cancelled");
    assert_eq!(support::code(&e), "57014", "{e}");
    drop(second);
    let third = p.connect("postgres", "pw").await?;
    assert_eq!(backend_of(&third).await?.0, pid);

    // One login for three clients: two checkouts reused it.
    let reused = metric(
        &p,
        "dbproxy_pool_checkouts_total{node=\"node0\",result=\"reused\"}",
    )?;
    let new = metric(&p, "dbproxy_pool_checkouts_total{node=\"node0\",result=\"new\"}")?;
    assert!(reused >= 2.0 && new == 1.0, "reused {reused}, new {new}");
    Ok(())
}

/// A session-mode client takes its primary connection at login (its BackendKeyData carries that
/// backend's pid); one that never sends anything on it gives it back at once without the reset
/// query, and the next client gets that same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_connection_goes_back_without_a_reset() -> Result<()> {
    support::bounded(unused_body()).await
}

async fn unused_body() -> Result<()> {
    let c = cluster(0).await?;
    let p = proxy(&c, 1, |_| {})?;
    // Client backends that never ran a query: a reset (DISCARD ALL) would show as theirs.
    let untouched = "select string_agg(pid::text, ',') from pg_stat_activity \
                     where backend_type = 'client backend' and pid <> pg_backend_pid() and query = ''";
    let first = p.connect("postgres", "pw").await?;
    let pid = c.primary().psql(untouched)?;
    assert!(pid.parse::<i32>().is_ok(), "one untouched connection: {pid:?}");
    drop(first);
    wait_for("the connection back in the pool", DEADLINE, || {
        Ok((metric(&p, "dbproxy_pool_idle{node=\"node0\"}")? == 1.0).then_some(()))
    })?;
    assert_eq!(c.primary().psql(untouched)?, pid, "no reset query ran on it");
    let second = p.connect("postgres", "pw").await?;
    assert_eq!(
        one(&second, "select pg_backend_pid()").await?,
        pid,
        "the same connection"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_inside_a_transaction_does_not_hand_it_on() -> Result<()> {
    support::bounded(mid_transaction_body()).await
}

async fn mid_transaction_body() -> Result<()> {
    let c = cluster(0).await?;
    c.primary().psql("create table t (x int)")?;
    let p = proxy(&c, 1, |_| {})?;
    let first = p.connect("postgres", "pw").await?;
    let (pid, _) = backend_of(&first).await?;
    first.batch_execute("begin; insert into t values (1)").await?;
    drop(first);
    // Its server connection is closed (PostgreSQL rolls the transaction back), not pooled.
    wait_for("the abandoned backend to end", DEADLINE, || {
        let n = c.primary().psql(&format!(
            "select count(*) from pg_stat_activity where pid = {pid}"
        ))?;
        Ok((n == "0").then_some(()))
    })?;
    let second = p.connect("postgres", "pw").await?;
    let (pid2, _) = backend_of(&second).await?;
    assert_ne!(pid2, pid);
    assert_eq!(one(&second, "select count(*) from t").await?, "0");
    assert_eq!(
        one(&second, "select current_setting('transaction_isolation')").await?,
        "read committed"
    );
    // Same for a failed transaction block.
    second.batch_execute("begin").await?;
    assert!(second.batch_execute("select 1/0").await.is_err());
    drop(second);
    wait_for("the failed-transaction backend to end", DEADLINE, || {
        let n = c.primary().psql(&format!(
            "select count(*) from pg_stat_activity where pid = {pid2}"
        ))?;
        Ok((n == "0").then_some(()))
    })?;
    let third = p.connect("postgres", "pw").await?;
    assert_eq!(one(&third, "select 1").await?, "1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_53300_after_the_checkout_timeout() -> Result<()> {
    support::bounded(timeout_body()).await
}

async fn timeout_body() -> Result<()> {
    let c = cluster(0).await?;
    let p = proxy(&c, 1, |cfg| cfg.pool.checkout_timeout = 0.5)?;
    let holder = p.connect("postgres", "pw").await?;
    // The key logged in before: the next client logs in at once and waits for a connection
    // with its first request.
    let second = p.connect("postgres", "pw").await?;
    let e = second
        .simple_query("select 1")
        .await
        .expect_err("a full pool gives no connection");
    assert_eq!(support::code(&e), "53300", "{e}");
    let db = e.as_db_error().context("an ErrorResponse")?;
    assert!(
        db.message().contains("pool.checkout_timeout") && db.message().contains("pool.size = 1"),
        "{}",
        db.message()
    );
    // The session goes on: once the holder leaves, its connection serves this client.
    let timeouts = metric(&p, "dbproxy_pool_timeouts_total{node=\"node0\"}")?;
    assert_eq!(timeouts, 1.0);
    drop(holder);
    assert_eq!(one(&second, "select 1").await?, "1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pgbench_clients_never_exceed_the_pool_size_per_node() -> Result<()> {
    support::bounded(many_body()).await
}

async fn many_body() -> Result<()> {
    let c = cluster(1).await?;
    pgbench_init(&c)?;
    // Two serving threads share the limit of 3 per node.
    let p = proxy(&c, 3, |cfg| {
        cfg.workers = 2;
        cfg.pool.checkout_timeout = 60.0;
    })?;
    let ports: Vec<u16> = (0..2).map(|i| c.node(i).port()).collect();
    let sampler = MaxConnections::start(&c);
    let port = p.port();
    let stdout = tokio::task::spawn_blocking(move || {
        pgbench(port, &["-n", "-S", "-C", "-c", "12", "-j", "2", "-t", "40"])
    })
    .await??;
    let max = sampler.finish().await?;
    assert!(
        stdout.contains("number of transactions actually processed: 480/480"),
        "{stdout}"
    );
    assert!(
        max[0] >= 1 && max[1] >= 1,
        "both nodes served: {max:?} on ports {ports:?}"
    );
    assert!(
        max.iter().all(|&m| m <= 3),
        "at most pool.size server connections per node: {max:?}"
    );
    // 480 sessions reading from the standby: most of them without a login (a thread at the
    // limit closes another thread's idle connection to open its own, which costs one).
    let reused = metric(
        &p,
        "dbproxy_pool_checkouts_total{node=\"node1\",result=\"reused\"}",
    )?;
    let new = metric(&p, "dbproxy_pool_checkouts_total{node=\"node1\",result=\"new\"}")?;
    assert!(reused > new, "reused {reused}, new {new}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pools_clients_and_servers_use_pgbouncer_columns() -> Result<()> {
    support::bounded(show_body()).await
}

async fn show_body() -> Result<()> {
    let c = cluster(0).await?;
    let p = proxy(&c, 2, |_| {})?;
    let held = p.connect("postgres", "pw").await?;
    let pid = one(&held, "select pg_backend_pid()").await?;
    let pools = show(&p, "pools").await?;
    assert_eq!(pools.len(), 1, "{pools:?}");
    let row = &pools[0];
    for col in [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ] {
        assert!(row.contains_key(col), "SHOW POOLS has {col}: {row:?}");
    }
    assert_eq!(row["database"], "postgres");
    assert_eq!(row["user"], "postgres");
    assert_eq!(row["pool_mode"], "session");
    // The held client's connection and the SHOW client's: in session mode a client takes its
    // primary connection at login while the pool has room (its BackendKeyData carries that
    // connection's process id).
    assert_eq!(row["sv_active"], "2", "{row:?}");
    assert_eq!(row["cl_active"], "2", "{row:?}");
    let servers = show(&p, "servers").await?;
    let server = servers
        .iter()
        .find(|s| s["remote_pid"] == pid && s["type"] == "S" && s["state"] == "active")
        .with_context(|| format!("{servers:?}"))?;
    let clients = show(&p, "clients").await?;
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert!(clients
        .iter()
        .all(|c| c["type"] == "C" && c["user"] == "postgres" && c["state"] == "active"));
    assert!(
        clients
            .iter()
            .any(|c| c["link"] == server["ptr"] && server["link"] == c["ptr"]),
        "{clients:?}"
    );
    let m = p.admin_get("/metrics")?;
    for name in [
        "dbproxy_pool_idle",
        "dbproxy_pool_active",
        "dbproxy_pool_waiting",
        "dbproxy_pool_checkouts_total",
    ] {
        assert!(m.contains(name), "{name} in /metrics");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_failover_waiting_clients_get_the_new_primary_and_the_old_pool_is_emptied() -> Result<()> {
    support::bounded(failover_body()).await
}

async fn failover_body() -> Result<()> {
    let c = cluster(1).await?;
    c.primary().psql("create table t (x int)")?;
    c.wait_replicated()?;
    let p = proxy(&c, 1, |cfg| cfg.pool.checkout_timeout = 120.0)?;
    // One more client than the pool holds; the others wait with their first write.
    let holder = p.connect("postgres", "pw").await?;
    let (pid, _) = backend_of(&holder).await?;
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let client = p.connect("postgres", "pw").await?;
        waiters.push(tokio::spawn(async move {
            let port = one(&client, "begin; select inet_server_port()").await?;
            client.batch_execute("insert into t values (1); commit").await?;
            Ok::<_, anyhow::Error>(port)
        }));
    }
    // SHOW POOLS would need a connection of the full pool too: the metric tells instead.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if metric(&p, "dbproxy_pool_waiting{node=\"node0\"}")? >= 2.0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the clients never waited for the pool");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.node(0).kill9()?;
    wait_for("node1 elected", DEADLINE, || {
        Ok((p.status()?["primary"] == 1).then_some(()))
    })?;
    // Both waiters ran on the new primary, one after the other (its pool holds one).
    for w in waiters {
        assert_eq!(w.await??, c.node(1).port().to_string());
    }
    let check = p.connect("postgres", "pw").await?;
    assert_eq!(one(&check, "select count(*) from t").await?, "2");
    drop(check);
    // Nothing of node0 is pooled any more, and the old session's backend is not among them.
    drop(holder);
    let servers = show(&p, "servers").await?;
    assert!(
        servers
            .iter()
            .all(|s| s["node_id"] != "0" && s["remote_pid"] != pid),
        "{servers:?}"
    );
    Ok(())
}

#[test]
fn bad_pool_settings_are_refused_naming_the_key() -> Result<()> {
    for (sets, key) in [
        (&["pool.mode=\"statement\""][..], "pool.mode"),
        (&["pool.size=0"][..], "pool.size"),
        (&["pool.checkout_timeout=-1"][..], "pool.checkout_timeout"),
        (&["pool.min_idle=500"][..], "pool.min_idle"),
        // Transaction pooling shares connections: they must be reset when a client leaves.
        (
            &["pool.mode=\"transaction\"", "pool.server_reset_query=\"\""][..],
            "pool.server_reset_query",
        ),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dbproxy"));
        cmd.args(["--check-config", "--set", "nodes=[{ host = \"127.0.0.1\" }]"]);
        for set in sets {
            cmd.args(["--set", set]);
        }
        let out = cmd.output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {stderr}");
        assert!(stderr.contains(key), "{sets:?}: {stderr}");
    }
    Ok(())
}
