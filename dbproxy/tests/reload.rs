//! Reloading a running dbproxy (what SIGHUP does, here through `run_with`'s reload channel):
//! node weights, health settings and appended nodes apply at once, an open session keeps working
//! throughout, and what needs a restart keeps its running value.

mod support;

use std::time::Instant;

use anyhow::{bail, Result};
use dbproxy::config::NodeConfig;
use support::{config_for, Proxy};
use testkit::{PgCluster, DEADLINE};
use tokio_postgres::{Client, SimpleQueryMessage};

async fn port(c: &Client) -> Result<u16> {
    let row = c.query_one("select inet_server_port()", &[]).await?;
    Ok(row.get::<_, i32>(0) as u16)
}

/// SHOW POOL_NODES, one vector of columns per node.
async fn pool_nodes(c: &Client) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    for m in c.simple_query("show pool_nodes").await? {
        if let SimpleQueryMessage::Row(r) = m {
            rows.push((0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect());
        }
    }
    Ok(rows)
}

/// Column `col` of every node's row.
async fn column(c: &Client, col: usize) -> Result<Vec<String>> {
    Ok(pool_nodes(c).await?.into_iter().map(|r| r[col].clone()).collect())
}

const PORT: usize = 2;
const STATUS: usize = 3;
const LB_WEIGHT: usize = 5;

/// Polls SHOW POOL_NODES column `col` until it equals `want`, within the test deadline.
async fn wait_column(c: &Client, col: usize, want: &[&str]) -> Result<()> {
    let start = Instant::now();
    loop {
        let got = column(c, col).await?;
        if got == want {
            return Ok(());
        }
        if start.elapsed() > DEADLINE {
            bail!("SHOW POOL_NODES column {col} is {got:?}, not {want:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_health_and_added_nodes_apply_on_reload() -> Result<()> {
    support::bounded(weights_health_and_added_nodes_apply_on_reload_body()).await
}

async fn weights_health_and_added_nodes_apply_on_reload_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(2).password("pw").start()).await??;
    let (pp, s1, s2) = (
        cluster.primary().port(),
        cluster.standby(0).port(),
        cluster.standby(1).port(),
    );
    // Start with the primary and node1 only; node2 is added by a reload. No failover: the health
    // settings changed below take every node down for a while.
    let mut config = config_for(&cluster, Some("pw"));
    config.nodes.truncate(2);
    config.failover.enabled = false;
    let proxy = Proxy::start(config.clone())?;
    let open = proxy.connect("postgres", "pw").await?;
    open.batch_execute("set application_name = 'kept'").await?;
    assert_eq!(port(&open).await?, s1);
    assert_eq!(column(&open, LB_WEIGHT).await?, ["0.500000", "0.500000"]);

    // node1's weight goes to 0 and node2 is appended: once node2's health checks pass, reads go
    // there, for the open session too.
    let mut next = config.clone();
    next.nodes[1].weight = 0;
    next.nodes.push(NodeConfig {
        name: "node2".into(),
        host: "127.0.0.1".into(),
        port: s2,
        weight: 1,
        ..NodeConfig::default()
    });
    proxy.reload(next.clone()).await?;
    wait_column(&open, STATUS, &["up", "up", "up"]).await?;
    assert_eq!(
        column(&open, LB_WEIGHT).await?,
        ["0.500000", "0.000000", "0.500000"]
    );
    assert_eq!(
        port(&open).await?,
        s2,
        "the open session reads from the added node"
    );
    let fresh = proxy.connect("postgres", "pw").await?;
    assert_eq!(port(&fresh).await?, s2, "so does a new one");

    // Weight 0 on node2 as well: reads go to the primary.
    next.nodes[2].weight = 0;
    proxy.reload(next.clone()).await?;
    wait_column(&open, LB_WEIGHT, &["1.000000", "0.000000", "0.000000"]).await?;
    assert_eq!(
        port(&open).await?,
        pp,
        "no standby has weight: reads on the primary"
    );

    // Health settings apply live: a role the servers do not know fails every check and takes
    // the nodes down; the right one brings them back. The open session keeps working meanwhile.
    next.health.user = "nobody".into();
    proxy.reload(next.clone()).await?;
    wait_column(&open, STATUS, &["down", "down", "down"]).await?;
    assert_eq!(port(&open).await?, pp);
    next.health.user = "postgres".into();
    next.nodes[1].weight = 1;
    proxy.reload(next.clone()).await?;
    wait_column(&open, STATUS, &["up", "up", "up"]).await?;
    wait_column(&open, LB_WEIGHT, &["0.500000", "0.500000", "0.000000"]).await?;
    assert_eq!(port(&open).await?, s1);

    // What needs a restart keeps its running value: node0's port, the listener, the connection
    // limit; the weight in the same reload still applies.
    let mut restart = next.clone();
    restart.nodes[0].port = 1;
    restart.listen = "127.0.0.1:1".into();
    restart.limits.max_connections = 1;
    restart.nodes[2].weight = 2;
    proxy.reload(restart).await?;
    wait_column(&open, LB_WEIGHT, &["0.250000", "0.250000", "0.500000"]).await?;
    assert_eq!(column(&open, PORT).await?, [pp, s1, s2].map(|p| p.to_string()));
    let writer = proxy.connect("postgres", "pw").await?;
    let another = proxy.connect("postgres", "pw").await?;
    writer
        .batch_execute("create table after_reload(x int); insert into after_reload values (1)")
        .await?;
    assert_eq!(cluster.primary().psql("select count(*) from after_reload")?, "1");
    another.simple_query("select 1").await?;

    // The open session saw every reload and still has its settings.
    let row = open
        .query_one("select current_setting('application_name')", &[])
        .await?;
    assert_eq!(row.get::<_, String>(0), "kept");
    Ok(())
}
