//! Drills with two dbproxy instances coordinated through a real etcd in front of a real
//! PostgreSQL cluster: the leader killed (the other takes the lease within the TTL and writes go
//! on), the primary killed while both run (exactly one promotion, both route to the new
//! primary), and an instance cut off from etcd (it stops leading, never promotes, says so, keeps
//! the recorded primary, and follows the record again when etcd is back), once with the etcd
//! member it talks to frozen and once with its connections to etcd closed by a relay.

mod pair;
mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use pair::{
    coordination, etcd, pair_config, promotions, recorded_primary, wait_leader, write, write_eventually,
    Binary, TTL,
};
use support::Proxy;
use testkit::{wait_for, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_leader_dbproxy_is_killed_the_other_takes_the_lease_within_the_ttl() -> Result<()> {
    support::bounded(leader_killed()).await
}

async fn leader_killed() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let mut a = Binary::start(pair_config(&c, etcd.endpoints(), "/drill1", "a", &counted))?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), "/drill1", "b", &counted))?;
    let st = coordination(b.admin)?;
    assert_eq!(st["is_leader"], false, "{st}");
    assert_eq!(st["leader"], "a", "{st}");
    assert_eq!(st["mode"], "follower", "{st}");
    let mut id = 0;
    assert_eq!(
        write_eventually(a.port, &mut id, DEADLINE).await?,
        c.node(0).port()
    );
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );
    let (code, body) = b.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 409, "a follower refuses a switchover: {body}");
    assert!(body.contains("leader lease") && body.contains("(a)"), "{body}");

    let killed = Instant::now();
    a.kill9()?;
    // Writes through b never depended on a.
    assert_eq!(write(b.port(), 1_000_000).await?, c.node(0).port());
    wait_leader(b.admin, Duration::from_secs(TTL) + Duration::from_secs(5))?;
    let took = killed.elapsed();
    eprintln!("lease taken over {took:?} after the leader was killed (TTL {TTL} s)");
    assert!(
        // The lease runs out at most a TTL after the leader's last renewal, and the follower,
        // watching the leader key, takes it at once (1 s of slack for a loaded machine).
        took <= Duration::from_secs(TTL) + Duration::from_secs(1),
        "takeover took {took:?}"
    );
    assert_eq!(write(b.port(), 1_000_001).await?, c.node(0).port());
    // The new leader acts: a switchover through it works and is recorded.
    let (code, body) = b.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    wait_for("the switchover to be recorded", DEADLINE, || {
        Ok((recorded_primary(b.admin)?.as_deref() == Some(c.node(1).name())).then_some(()))
    })?;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    let metrics = b.admin_get("/metrics")?;
    assert!(metrics.contains("dbproxy_leader 1"), "{metrics}");
    assert!(metrics.contains("dbproxy_etcd_reachable 1"), "{metrics}");
    assert_eq!(
        promotions(&counted),
        ["node1"],
        "one promotion, by the new leader"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_is_promoted_once_and_both_instances_route_to_the_new_one() -> Result<()> {
    support::bounded(primary_killed()).await
}

async fn primary_killed() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let a = Proxy::start(pair_config(&c, etcd.endpoints(), "/drill2", "a", &counted))?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), "/drill2", "b", &counted))?;
    let mut id = 0;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    c.node(0).kill9()?;
    let new = c.node(1).port();
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, new);
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, new);
    for admin in [a.admin, b.admin] {
        wait_for("the record to name node1", DEADLINE, || {
            Ok((recorded_primary(admin)?.as_deref() == Some("node1")).then_some(()))
        })?;
    }
    assert_eq!(promotions(&counted), ["node1"], "exactly one promotion");
    let b_status = b.status()?;
    assert!(b_status["record"]["fenced"]["node0"].is_u64(), "{b_status}");
    assert!(
        b_status["history"].as_array().is_some_and(|h| h.is_empty()),
        "the follower ran no failover: {b_status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_cut_off_from_etcd_stops_leading_never_promotes_and_follows_again() -> Result<()> {
    support::bounded(partitioned()).await
}

async fn partitioned() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(3).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    // b talks to member 2 only, a to members 0 and 1: freezing member 2 cuts b off while the
    // etcd cluster keeps its quorum.
    let b_urls = vec![etcd.member(2).client_url().to_string()];
    let a_urls = vec![
        etcd.member(0).client_url().to_string(),
        etcd.member(1).client_url().to_string(),
    ];
    let b = Proxy::start(pair_config(&c, b_urls, "/drill3", "b", &counted))?;
    wait_leader(b.admin, DEADLINE)?;
    let a = Proxy::start(pair_config(&c, a_urls, "/drill3", "a", &counted))?;
    let mut id = 0;
    assert_eq!(
        write_eventually(a.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    let cut = Instant::now();
    etcd.member(2).sigstop()?;
    wait_for("b to stop leading and say etcd is unreachable", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["is_leader"] == false && s["etcd_reachable"] == false).then_some(s))
    })?;
    let stopped = cut.elapsed();
    assert!(
        stopped < Duration::from_secs(TTL),
        "b stopped acting {stopped:?} after the cut, not before its lease ran out"
    );
    wait_leader(a.admin, DEADLINE)?;
    let s = coordination(b.admin)?;
    assert!(
        s["mode"].as_str().unwrap_or("").contains("never promoting"),
        "{s}"
    );
    let metrics = b.admin_get("/metrics")?;
    assert!(metrics.contains("dbproxy_etcd_reachable 0"), "{metrics}");
    assert!(metrics.contains("dbproxy_leader 0"), "{metrics}");
    // Still routes to the recorded primary.
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    // The primary dies: a promotes; b, cut off, does not.
    c.node(0).kill9()?;
    assert_eq!(
        write_eventually(a.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    assert_eq!(promotions(&counted), ["node1"], "only the leader promoted");
    assert_eq!(
        recorded_primary(b.admin)?.as_deref(),
        Some("node0"),
        "b still has the old record"
    );
    let e = write(b.port(), 2_000_000).await;
    assert!(e.is_err(), "b sends no write to node1 without the record: {e:?}");

    // etcd is back: b follows the record and routes to the new primary.
    etcd.member(2).sigcont()?;
    wait_for("b to follow the record again", DEADLINE, || {
        Ok((recorded_primary(b.admin)?.as_deref() == Some("node1")).then_some(()))
    })?;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    let s = wait_for("b to reach etcd again", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["etcd_reachable"] == true).then_some(s))
    })?;
    assert_eq!(s["leader"], "a", "{s}");
    assert_eq!(s["is_leader"], false, "{s}");
    assert_eq!(promotions(&counted), ["node1"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_whose_etcd_connections_are_cut_keeps_to_the_recorded_primary_and_recovers() -> Result<()>
{
    support::bounded(etcd_connections_cut()).await
}

/// Like [`partitioned`], but b's connections to etcd are closed (a relay in between is cut)
/// rather than left hanging on a frozen member, and etcd is one member.
async fn etcd_connections_cut() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let member: std::net::SocketAddr = etcd.endpoints()[0].trim_start_matches("http://").parse()?;
    let relay = pair::Relay::start(member).await?;
    let through_relay = vec![format!("http://127.0.0.1:{}", relay.port)];
    let b = Proxy::start(pair_config(&c, through_relay, "/cut", "b", &counted))?;
    wait_leader(b.admin, DEADLINE)?;
    let a = Proxy::start(pair_config(&c, etcd.endpoints(), "/cut", "a", &counted))?;
    let mut id = 0;
    let (old, new) = (c.node(0).port(), c.node(1).port());
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, old);

    let cut = Instant::now();
    relay.cut();
    wait_for("b to stop leading and say etcd is unreachable", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["is_leader"] == false && s["etcd_reachable"] == false).then_some(()))
    })?;
    let stopped = cut.elapsed();
    assert!(
        stopped < Duration::from_secs(TTL),
        "b stopped acting {stopped:?} after the cut"
    );
    wait_leader(a.admin, Duration::from_secs(TTL) + DEADLINE)?;
    eprintln!(
        "a took the lease {:?} after b was cut from etcd (TTL {TTL} s)",
        cut.elapsed()
    );
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, old);

    // The primary dies: a promotes; b, cut off, neither promotes nor writes to node1.
    c.node(0).kill9()?;
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, new);
    assert_eq!(promotions(&counted), ["node1"]);
    assert_eq!(recorded_primary(b.admin)?.as_deref(), Some("node0"));
    let e = write(b.port(), 3_000_000).await;
    assert!(e.is_err(), "b sends no write to node1 without the record: {e:?}");
    assert_eq!(c.node(1).psql("select count(*) from t where id = 3000000")?, "0");

    // The relay lets connections through again: b reconnects, follows the record, and does not
    // take the lease back.
    relay.heal();
    wait_for("b to follow the record again", DEADLINE, || {
        Ok((recorded_primary(b.admin)?.as_deref() == Some("node1")).then_some(()))
    })?;
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, new);
    let s = wait_for("b to reach etcd again", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["etcd_reachable"] == true).then_some(s))
    })?;
    assert_eq!(
        (s["leader"].as_str(), s["is_leader"].as_bool()),
        (Some("a"), Some(false)),
        "{s}"
    );
    assert_eq!(promotions(&counted), ["node1"]);
    Ok(())
}
