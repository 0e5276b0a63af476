//! Two dbproxy instances coordinated through a real etcd show the same cluster: `SHOW POOL_NODES`
//! and `/status` agree on every part that describes the cluster (nodes, their state and roles,
//! the elected primary, the record, the leader) before a failover and after it. What describes
//! one instance stays its own: the reads it balanced (`select_cnt`, `load_balance_node`), the
//! lag and the time it last saw a node change (its own health checks measure them), the
//! failovers it ran itself (`history`), its queued operations, and whether it is the leader.

mod pair;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;
use pair::{etcd, pair_config, pool_nodes, recorded_primary, status, wait_leader, write_eventually, Binary};
use serde_json::Value;
use support::Proxy;
use testkit::{wait_for, DEADLINE};

/// Columns of SHOW POOL_NODES (and fields of `/status`'s nodes) measured by each instance.
const OWN: [&str; 4] = [
    "select_cnt",
    "load_balance_node",
    "replication_delay",
    "last_status_change",
];

/// The cluster parts of SHOW POOL_NODES through the proxy on `port`.
async fn shared_pool_nodes(port: u16) -> Result<Vec<BTreeMap<String, String>>> {
    let mut rows = pool_nodes("127.0.0.1", port).await?;
    for r in &mut rows {
        r.retain(|k, _| !OWN.contains(&k.as_str()));
    }
    Ok(rows)
}

/// The cluster parts of an instance's `/status`.
fn shared_status(admin: SocketAddr) -> Result<Value> {
    let s = status(admin)?;
    let mut record = s["record"].clone();
    let coordination = record["coordination"].clone();
    if let Some(r) = record.as_object_mut() {
        r.remove("coordination");
    }
    let mut nodes = s["nodes"].clone();
    for n in nodes.as_array_mut().into_iter().flatten() {
        if let Some(n) = n.as_object_mut() {
            n.retain(|k, _| !OWN.contains(&k.as_str()));
        }
    }
    Ok(serde_json::json!({
        "primary": s["primary"],
        "record": record,
        "leader": coordination["leader"],
        "etcd_reachable": coordination["etcd_reachable"],
        "lease_ttl_s": coordination["lease_ttl_s"],
        "nodes": nodes,
    }))
}

/// Waits until both instances show the same cluster; returns it.
async fn agree(a: (u16, SocketAddr), b: (u16, SocketAddr), what: &str) -> Result<(Value, Value)> {
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        let views = (
            (shared_pool_nodes(a.0).await?, shared_status(a.1)?),
            (shared_pool_nodes(b.0).await?, shared_status(b.1)?),
        );
        if views.0 == views.1 {
            let rows = serde_json::to_value(&views.0 .0)?;
            return Ok((rows, views.0 .1));
        }
        anyhow::ensure!(
            std::time::Instant::now() < end,
            "{what}: the instances still disagree:\n a: {:?}\n b: {:?}",
            views.0,
            views.1
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_instances_show_the_same_pool_nodes_and_status_before_and_after_a_failover() -> Result<()> {
    support::bounded(same_views()).await
}

async fn same_views() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let a = Binary::start(pair_config(&c, etcd.endpoints(), "/views", "a", &counted))?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), "/views", "b", &counted))?;
    let mut id = 0;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    let (rows, st) = agree((a.port, a.admin), (b.port(), b.admin), "before the failover").await?;
    assert_eq!(rows[0]["role"], "primary", "{rows}");
    assert_eq!(rows[1]["role"], "standby", "{rows}");
    assert_eq!(rows[0]["status"], "up", "{rows}");
    assert_eq!(st["record"]["primary"], "node0", "{st}");
    assert_eq!(st["leader"], "a", "{st}");

    c.node(0).kill9()?;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    for admin in [a.admin, b.admin] {
        wait_for("the record to name node1", DEADLINE, || {
            Ok((recorded_primary(admin)?.as_deref() == Some("node1")).then_some(()))
        })?;
    }
    let (rows, st) = agree((a.port, a.admin), (b.port(), b.admin), "after the failover").await?;
    assert_eq!(rows[1]["role"], "primary", "{rows}");
    assert_eq!(rows[0]["status"], "down", "{rows}");
    assert_eq!(st["primary"], 1, "{st}");
    assert!(st["record"]["fenced"]["node0"].is_u64(), "{st}");
    Ok(())
}
