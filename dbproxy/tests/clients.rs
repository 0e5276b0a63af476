//! Real clients through dbproxy: psql and pgbench (simple, extended and prepared protocols, COPY
//! from `pgbench -i`), COPY in both directions, the 25006 replay, SHOW POOL_NODES, the admin API,
//! and a standby going down and coming back.

mod support;

use anyhow::{Context, Result};
use futures_util::SinkExt;
use support::{config_for, pg_program, psql, Proxy};
use testkit::{wait_for, PgCluster, DEADLINE};

fn pgbench(proxy: &Proxy, args: &[&str]) -> Result<String> {
    let out = pg_program("pgbench")?
        .args(["-h", "127.0.0.1", "-p"])
        .arg(proxy.port().to_string())
        .args(["-U", "postgres"])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", "pw")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "pgbench {args:?} failed: {text}");
    Ok(text)
}

/// The select_cnt column of SHOW POOL_NODES for `node`.
fn select_cnt(proxy: &Proxy, node: usize) -> Result<u64> {
    let out = psql(proxy, "postgres", "pw", "show pool_nodes")?;
    let line = out.lines().nth(node).context("no such node row")?;
    Ok(line.split('|').nth(8).context("no select_cnt")?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_pgbench_copy_replay_and_admin() -> Result<()> {
    support::bounded(psql_pgbench_copy_replay_and_admin_body()).await
}

async fn psql_pgbench_copy_replay_and_admin_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    let (pp, sp) = (cluster.primary().port(), cluster.standby(0).port());
    let mut config = config_for(&cluster, Some("pw"));
    config.routing.read_only_functions = vec!["bump".into()];
    let proxy = Proxy::start(config)?;

    // pgbench -i writes through COPY FROM STDIN; then the read-only and mixed runs with every
    // query protocol, reads balanced to the standby.
    tokio::task::block_in_place(|| -> Result<()> {
        pgbench(&proxy, &["-i", "-s", "1", "-q"])?;
        cluster
            .standby(0)
            .wait_replayed(&cluster.primary().current_lsn()?)?;
        let before = select_cnt(&proxy, 1)?;
        for mode in ["simple", "extended", "prepared"] {
            let out = pgbench(
                &proxy,
                &["-n", "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "100"],
            )?;
            assert!(
                out.contains("number of transactions actually processed: 400/400"),
                "{out}"
            );
        }
        let out = pgbench(&proxy, &["-n", "-M", "prepared", "-c", "2", "-t", "50"])?;
        assert!(out.contains("processed: 100/100"), "{out}");
        assert!(
            select_cnt(&proxy, 1)? >= before + 1200,
            "pgbench -S reads ran on the standby"
        );
        let n = cluster.primary().psql("select count(*) from pgbench_history")?;
        assert_eq!(n, "100", "the writes ran on the primary");
        // psql: simple queries and SHOW POOL_NODES with pgpool's columns.
        assert_eq!(
            psql(&proxy, "postgres", "pw", "select inet_server_port()")?,
            sp.to_string()
        );
        let header = pg_program("psql")?
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port().to_string(),
                "-U",
                "postgres",
                "-c",
                "show pool_nodes",
            ])
            .env("PGPASSWORD", "pw")
            .output()?;
        let header = String::from_utf8_lossy(&header.stdout).to_string();
        for col in dbproxy::admin::POOL_NODES_COLUMNS {
            assert!(header.contains(col), "column {col} in {header}");
        }
        let rows = psql(&proxy, "postgres", "pw", "show pool_nodes")?;
        let roles: Vec<&str> = rows.lines().map(|l| l.split('|').nth(6).unwrap_or("")).collect();
        assert_eq!(roles, vec!["primary", "standby"]);
        Ok(())
    })?;

    // COPY both ways through tokio-postgres.
    let c = proxy.connect("postgres", "pw").await?;
    c.batch_execute("create table c(x int, y text)").await?;
    let sink = c.copy_in("copy c from stdin").await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tone\n2\ttwo\n")).await?;
    assert_eq!(sink.finish().await?, 2);
    // The COPY out only reads, so it is balanced to the standby: wait until it has the rows
    // (replication is asynchronous here; on a loaded machine the table may not be there yet).
    tokio::task::block_in_place(|| {
        cluster
            .standby(0)
            .wait_replayed(&cluster.primary().current_lsn()?)
    })?;
    let out = c.copy_out("copy (select * from c order by x) to stdout").await?;
    futures_util::pin_mut!(out);
    let mut got = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut out).await {
        got.extend_from_slice(&chunk?);
    }
    assert_eq!(got, b"1\tone\n2\ttwo\n");

    // A function allow-listed as read-only that writes: the standby refuses with 25006 and the
    // statement is replayed on the primary, so the client never sees the refusal.
    c.batch_execute(
        "create table hits(n int); create function bump() returns int language sql \
         as 'insert into hits values (1) returning 1'",
    )
    .await?;
    tokio::task::block_in_place(|| {
        cluster
            .standby(0)
            .wait_replayed(&cluster.primary().current_lsn()?)
    })?;
    let rows = c.simple_query("select bump()").await?;
    assert_eq!(rows.len(), 3, "one row, no error");
    let row = c.query_one("select bump() + 0 * inet_server_port()", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 1, "extended protocol replay");
    assert_eq!(cluster.primary().psql("select count(*) from hits")?, "2");

    // The admin API.
    let status: serde_json::Value = serde_json::from_str(&proxy.admin_get("/status")?)?;
    assert_eq!(status["nodes"][1]["role"], "standby");
    assert_eq!(status["nodes"][0]["port"], pp.to_string());
    let metrics = proxy.admin_get("/metrics")?;
    assert!(
        metrics.contains("dbproxy_queries_total{node=\"node1\",role=\"standby\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dbproxy_routing_decisions_total{decision=\"replay_25006\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("dbproxy_node_healthy{node=\"node1\"} 1"));

    // The standby goes down: it is marked down and reads fall back to the primary; it comes back
    // once it is healthy again.
    // A read running on the standby when it shuts down is replayed on the primary: the client
    // gets its answer, not an error.
    let reader = proxy.connect("postgres", "pw").await?;
    let slow = tokio::spawn(async move {
        reader
            .query_one("select inet_server_port() from pg_sleep(2) /* slow read */", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::task::block_in_place(|| -> Result<()> {
        let running = "select count(*) from pg_stat_activity where query like '%slow read%' \
                       and state = 'active' and pid <> pg_backend_pid()";
        wait_for("the slow read to run on the standby", DEADLINE, || {
            Ok((cluster.standby(0).psql(running)? == "1").then_some(()))
        })?;
        cluster.standby(0).stop()?;
        wait_for("the standby to be marked down", DEADLINE, || {
            let rows = psql(&proxy, "postgres", "pw", "show pool_nodes")?;
            Ok(rows
                .lines()
                .nth(1)
                .is_some_and(|l| l.split('|').nth(3) == Some("down"))
                .then_some(()))
        })?;
        assert_eq!(
            psql(&proxy, "postgres", "pw", "select inet_server_port()")?,
            pp.to_string()
        );
        Ok(())
    })?;
    assert_eq!(
        slow.await?? as u16,
        pp,
        "the interrupted read was answered by the primary"
    );
    tokio::task::block_in_place(|| -> Result<()> {
        cluster.standby(0).start()?;
        wait_for("the standby to come back", DEADLINE, || {
            Ok(
                (psql(&proxy, "postgres", "pw", "select inet_server_port()")? == sp.to_string())
                    .then_some(()),
            )
        })?;
        Ok(())
    })?;
    Ok(())
}
