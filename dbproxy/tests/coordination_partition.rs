//! A dbproxy instance partitioned from etcd by nftables: instance `b` runs in a network namespace
//! of its own (veth to the test's namespace, where PostgreSQL and etcd listen), and an nftables
//! rule inside that namespace drops every packet it sends to etcd, as a network partition
//! would. It must stop leading before its lease runs out, say so, keep routing to the recorded
//! primary, neither promote nor send a write to any other node when the primary dies, and once
//! the rule is gone follow the record the other instance wrote, without taking the lease back.

mod pair;
mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pair::netns::Netns;
use pair::{
    coordination, pair_config, promotions, recorded_primary, wait_leader, write_at, write_eventually,
    write_eventually_at, Binary, TTL,
};
use support::Proxy;
use testkit::etcd::EtcdCluster;
use testkit::{wait_for, PgCluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_partitioned_from_etcd_by_nftables_never_promotes_and_rejoins() -> Result<()> {
    support::bounded(nft_partition()).await
}

/// A primary and a standby listening on loopback and on the namespace link too, letting the
/// namespace's address in, with a table `t` to write to.
async fn pg_for(ns: &Netns) -> Result<Arc<PgCluster>> {
    let listen = format!("'127.0.0.1,{}'", ns.outside);
    let c = tokio::task::spawn_blocking(move || {
        PgCluster::builder()
            .standbys(1)
            .password("pw")
            .setting("listen_addresses", &listen)
            .start()
    })
    .await??;
    c.primary().psql("create table t (id bigint primary key)")?;
    for n in c.nodes() {
        let hba = n.data_dir().join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)?;
        text.push_str(&format!("host all all {}/32 scram-sha-256\n", ns.inside));
        std::fs::write(&hba, text)?;
        n.psql("select pg_reload_conf()")?;
    }
    c.wait_replicated()?;
    Ok(Arc::new(c))
}

async fn nft_partition() -> Result<()> {
    let ns = Netns::create()?;
    let c = pg_for(&ns).await?;
    let outside = IpAddr::V4(ns.outside);
    let etcd = tokio::task::spawn_blocking(move || EtcdCluster::start_also_on(1, Some(outside))).await??;
    let etcd_port: u16 = etcd.endpoints()[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("etcd's port")?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");

    // b, in the namespace, reaches etcd and both nodes through the link; it leads first.
    let mut b_cfg = pair_config(
        &c,
        vec![format!("http://{}:{etcd_port}", ns.outside)],
        "/nft",
        "b",
        &counted,
    );
    for n in &mut b_cfg.nodes {
        n.host = ns.outside.to_string();
    }
    let b = Binary::start_in(b_cfg, &ns)?;
    let b_host = ns.inside.to_string();
    wait_leader(b.admin, DEADLINE)?;
    let a = Proxy::start(pair_config(&c, etcd.endpoints(), "/nft", "a", &counted))?;
    let mut id = 0;
    let (old, new) = (c.node(0).port(), c.node(1).port());
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, old);
    assert_eq!(
        write_eventually_at(&b_host, b.port, &mut id, DEADLINE).await?,
        old
    );

    let cut = Instant::now();
    ns.cut(&[etcd_port])?;
    wait_for("b to stop leading and say etcd is unreachable", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["is_leader"] == false && s["etcd_reachable"] == false).then_some(()))
    })?;
    let stopped = cut.elapsed();
    assert!(
        stopped < Duration::from_secs(TTL),
        "b stopped acting {stopped:?} after the cut, not before its lease ran out"
    );
    assert!(ns.dropped()? > 0, "the nftables rule dropped b's packets to etcd");
    wait_leader(a.admin, Duration::from_secs(TTL) + DEADLINE)?;
    eprintln!(
        "a took the lease {:?} after b was partitioned from etcd (TTL {TTL} s)",
        cut.elapsed()
    );
    let s = coordination(b.admin)?;
    assert!(
        s["mode"].as_str().unwrap_or("").contains("never promoting"),
        "{s}"
    );
    let metrics = support::admin_request(b.admin, "GET", "/metrics")?.1;
    assert!(metrics.contains("dbproxy_etcd_reachable 0"), "{metrics}");
    assert!(metrics.contains("dbproxy_leader 0"), "{metrics}");
    // Partitioned from etcd only, b still routes to the recorded primary.
    assert_eq!(
        write_eventually_at(&b_host, b.port, &mut id, DEADLINE).await?,
        old
    );

    // The primary dies: a promotes node1; b, partitioned, neither promotes nor writes to node1.
    c.node(0).kill9()?;
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, new);
    assert_eq!(recorded_primary(b.admin)?.as_deref(), Some("node0"));
    let refused = write_at(&b_host, b.port, 3_000_000).await;
    assert!(
        refused.is_err(),
        "b sends no write to node1 without the record: {refused:?}"
    );
    assert_eq!(c.node(1).psql("select count(*) from t where id = 3000000")?, "0");
    assert_eq!(promotions(&counted), ["node1"], "only the leader promoted");

    // The partition heals: b follows the record, routes to node1, and a keeps the lease.
    ns.heal()?;
    wait_for("b to follow the record again", DEADLINE, || {
        Ok((recorded_primary(b.admin)?.as_deref() == Some("node1")).then_some(()))
    })?;
    assert_eq!(
        write_eventually_at(&b_host, b.port, &mut id, DEADLINE).await?,
        new
    );
    let s = wait_for("b to reach etcd again", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["etcd_reachable"] == true).then_some(s))
    })?;
    assert_eq!(
        (s["leader"].as_str(), s["is_leader"].as_bool()),
        (Some("a"), Some(false)),
        "{s}"
    );
    assert_eq!(promotions(&counted), ["node1"], "exactly one promotion");
    Ok(())
}
