//! Drills of failover with two dbproxy instances coordinated through a real etcd, in front of a
//! real PostgreSQL cluster:
//!
//! - the leader is killed in the middle of a failover, at each recorded step (the test hook
//!   `HA_STACK_TEST_ABORT_AT` makes it abort exactly there): the other instance takes the lease
//!   and finishes or rolls back the promotion, so exactly one node is promoted, writes go on
//!   through it, and no write reaches the old primary when it comes back;
//! - the leader is killed in a switchover once the record says it is promoting: the other
//!   instance rolls it back, making the old primary (read-only by then) writable again;
//! - the leader is cut from the primary only (a TCP relay in its path): with `failover_quorum`
//!   it does not fail over while the other instance still sees the primary; once neither sees
//!   it, exactly one promotion happens.

mod pair;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use dbproxy::fault::ABORT_AT;
use pair::{
    etcd, metric, pair_config, promotions, recorded_primary, status, wait_leader, write, write_eventually,
    Binary, Relay, TTL,
};
use support::Proxy;
use testkit::{wait_for, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_before_it_promotes_leaves_the_promotion_to_the_next_leader() -> Result<()> {
    support::bounded(leader_dies_at("promoting", 1)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_after_promoting_but_before_recording_it_is_finished_by_the_next_leader() -> Result<()>
{
    support::bounded(leader_dies_at("promoted", 1)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_after_recording_the_switch_leaves_the_standbys_to_the_next_leader() -> Result<()> {
    support::bounded(leader_dies_at("switched", 2)).await
}

/// The leader `a` fails the killed primary over and aborts at `step`; `b` takes over.
async fn leader_dies_at(step: &str, standbys: usize) -> Result<()> {
    let c = pair::pg(standbys).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let prefix = format!("/midway-{step}");
    let mut a = Binary::start_with_env(
        pair_config(&c, etcd.endpoints(), &prefix, "a", &counted),
        &[(ABORT_AT, step)],
    )?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), &prefix, "b", &counted))?;
    let mut id = 0;
    let (old, new) = (c.node(0).port(), c.node(1).port());
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, old);
    let last_on_old = id;

    c.node(0).kill9()?;
    let died = wait_for("the leader to abort at the step", DEADLINE, || {
        Ok(a.child.try_wait()?.map(|_| Instant::now()))
    })?;
    let log = a.log();
    assert!(
        log.lines()
            .any(|l| l.contains("aborting (test hook)") && l.contains(&format!("\"{step}\""))),
        "a aborted at {step}: {log}"
    );
    // Every write acknowledged from now on landed on the new primary.
    assert_eq!(
        write_eventually(b.port(), &mut id, Duration::from_secs(TTL) + DEADLINE).await?,
        new
    );
    let took = died.elapsed();
    eprintln!("{step}: first write through the other instance {took:?} after the leader died (TTL {TTL} s)");
    wait_for(
        "b's record to name node1 with nothing under way",
        DEADLINE,
        || {
            let s = status(b.admin)?;
            Ok((s["record"]["primary"] == "node1" && s["record"]["operation"].is_null()).then_some(()))
        },
    )?;
    assert_eq!(promotions(&counted), ["node1"], "exactly one promotion");
    let s = status(b.admin)?;
    assert!(s["record"]["fenced"]["node0"].is_u64(), "{s}");
    let resolved = s["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["resolved"].is_object()))
        .cloned()
        .unwrap_or_default();
    let expected = if step == "switched" {
        "switched"
    } else {
        "promoting"
    };
    assert_eq!(
        resolved["resolved"]["step"], expected,
        "b resolved what a left: {s}"
    );
    if standbys == 2 {
        // a never re-pointed node2 (it died first at `switched`); b did.
        tokio::task::block_in_place(|| c.node(2).wait_streaming_from(c.node(1)))?;
    }

    // The old primary comes back (a primary of the old timeline): it gets no write.
    tokio::task::block_in_place(|| c.node(0).start())?;
    wait_for("node0 to answer again", DEADLINE, || {
        Ok(c.node(0).psql("select 1").ok().map(|_| ()))
    })?;
    for _ in 0..3 {
        assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, new);
    }
    // The fence step may end this session on node0 (it answers as a primary): ask until it
    // answers.
    let count = format!("select count(*) from t where id > {last_on_old}");
    let on_old: i64 = wait_for("node0 to answer the count", DEADLINE, || {
        Ok(c.node(0).psql(&count).ok().and_then(|n| n.trim().parse().ok()))
    })?;
    assert_eq!(on_old, 0, "no write reached the old primary");
    assert_eq!(recorded_primary(b.admin)?.as_deref(), Some("node1"));
    assert_eq!(promotions(&counted), ["node1"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_failover_quorum_a_leader_cut_from_the_primary_alone_does_not_promote() -> Result<()> {
    support::bounded(quorum()).await
}

async fn quorum() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let primary: SocketAddr = format!("127.0.0.1:{}", c.node(0).port()).parse()?;
    // Each instance reaches the primary through its own relay, so each can be cut alone.
    let (to_a, to_b) = (Relay::start(primary).await?, Relay::start(primary).await?);
    let config = |name: &str, relay: &Relay| {
        let mut cfg = pair_config(&c, etcd.endpoints(), "/quorum", name, &counted);
        cfg.nodes[0].port = relay.port;
        cfg.coordination.failover_quorum = true;
        cfg
    };
    let a = Proxy::start(config("a", &to_a))?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(config("b", &to_b))?;
    let mut id = 0;
    let old = c.node(0).port();
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, old);
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, old);

    to_a.cut();
    // The leader saw the primary down and considered failing over, more than once, and refused
    // each time.
    wait_for("a to refuse the failover twice", DEADLINE, || {
        Ok((metric(a.admin, "dbproxy_failover_quorum_refused_total")? >= 2.0).then_some(()))
    })?;
    assert!(promotions(&counted).is_empty(), "no promotion without the quorum");
    assert_eq!(recorded_primary(b.admin)?.as_deref(), Some("node0"));
    assert_eq!(
        write(b.port(), 1_000_000).await?,
        old,
        "b still writes to the primary"
    );
    assert!(coordination_is_leader(a.admin)?, "a still leads");

    // Now neither instance sees the primary: the quorum agrees, and one promotion happens.
    to_b.cut();
    let new = c.node(1).port();
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, new);
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, new);
    assert_eq!(promotions(&counted), ["node1"], "exactly one promotion");
    Ok(())
}

fn coordination_is_leader(admin: SocketAddr) -> Result<bool> {
    Ok(pair::coordination(admin)?["is_leader"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_in_a_switchover_before_it_promotes_leaves_the_old_primary_writable() -> Result<()> {
    support::bounded(switchover_rolled_back()).await
}

/// The leader `a` is asked for a switchover to node1 and aborts once the record says it is
/// promoting: node0 was made read-only and nothing was promoted. `b` takes over, rolls back
/// (node0 writable again) and routes writes to node0.
async fn switchover_rolled_back() -> Result<()> {
    let c = pair::pg(1).await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let mut a = Binary::start_with_env(
        pair_config(&c, etcd.endpoints(), "/switch-midway", "a", &counted),
        &[(ABORT_AT, "promoting")],
    )?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), "/switch-midway", "b", &counted))?;
    let mut id = 0;
    let old = c.node(0).port();
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, old);
    wait_for("a to see node1 as a healthy standby", DEADLINE, || {
        let s = status(a.admin)?;
        Ok((s["nodes"][1]["status"] == "up" && s["nodes"][1]["role"] == "standby").then_some(()))
    })?;
    let (code, body) = support::admin_request(a.admin, "POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    let died = wait_for("the leader to abort at promoting", DEADLINE, || {
        Ok(a.child.try_wait()?.map(|_| Instant::now()))
    })?;
    assert_eq!(
        c.node(0).psql("show default_transaction_read_only")?,
        "on",
        "a made node0 read-only before it died"
    );
    assert_eq!(
        write_eventually(b.port(), &mut id, Duration::from_secs(TTL) + DEADLINE).await?,
        old
    );
    eprintln!(
        "switchover rolled back: first write through the other instance {:?} after the leader died",
        died.elapsed()
    );
    assert!(promotions(&counted).is_empty(), "nothing was promoted");
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "t");
    let s = status(b.admin)?;
    assert_eq!(s["record"]["primary"], "node0", "{s}");
    assert!(s["record"]["operation"].is_null(), "{s}");
    assert!(
        s["record"]["fenced"].as_object().is_some_and(|f| f.is_empty()),
        "{s}"
    );
    let rolled_back = s["history"].as_array().is_some_and(|h| {
        h.iter()
            .any(|e| e["kind"] == "switchover" && e["resolved"]["step"] == "promoting")
    });
    assert!(rolled_back, "{s}");
    Ok(())
}
