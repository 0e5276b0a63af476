//! The built-in rejoin (`failover.rejoin.method = "rewind"`) on real PostgreSQL clusters: a
//! crashed old primary rewound into a standby of the new one, the base-backup fallback when
//! pg_rewind cannot work, the chain drill (three primaries killed in a row, each coming back as a
//! standby on its own), a switchover that keeps the old primary as a standby, a failover that
//! stops a rejoin under way (which then rejoins the new primary), and the errors for a node
//! whose data directory is unknown.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dbproxy::config::Config;
use dbproxy::rejoin::RejoinMethod;
use serde_json::Value;
use support::writers::Writers;
use support::{config_for, Proxy};
use testkit::{wait_for, PgCluster, DEADLINE};

async fn cluster(standbys: usize) -> Result<Arc<PgCluster>> {
    cluster_sync(standbys, false).await
}

async fn cluster_sync(standbys: usize, synchronous: bool) -> Result<Arc<PgCluster>> {
    let c = tokio::task::spawn_blocking(move || {
        PgCluster::builder()
            .standbys(standbys)
            .synchronous(synchronous)
            .password("pw")
            .start()
    })
    .await??;
    c.primary().psql("create table t (id bigint primary key)")?;
    c.wait_replicated()?;
    Ok(Arc::new(c))
}

/// dbproxy in front of `c` with the built-in rejoin and each node's data directory.
fn proxy_for(c: &PgCluster, automatic: bool, tweak: impl FnOnce(&mut Config)) -> Result<Proxy> {
    let mut cfg = config_for(c, Some("pw"));
    for (i, n) in cfg.nodes.iter_mut().enumerate() {
        n.data_dir = c.node(i).data_dir().display().to_string();
    }
    cfg.failover.rejoin.method = RejoinMethod::Rewind;
    cfg.failover.rejoin.automatic = automatic;
    cfg.failover.rejoin.timeout = 90.0;
    tweak(&mut cfg);
    Proxy::start(cfg)
}

fn node_status(proxy: &Proxy, i: usize) -> Result<Value> {
    Ok(proxy.status()?["nodes"][i].clone())
}

fn elected(proxy: &Proxy) -> Result<usize> {
    wait_for("a primary elected", DEADLINE, || {
        Ok(proxy.status()?["primary"].as_u64().map(|p| p as usize))
    })
}

/// Waits until `/status` holds `n` events of `kind` and returns the last.
fn wait_event(proxy: &Proxy, kind: &str, n: usize) -> Result<Value> {
    wait_for(&format!("{n} {kind} event(s) in /status"), DEADLINE, || {
        let s = proxy.status()?;
        let events: Vec<Value> = s["history"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect();
        Ok((events.len() >= n).then(|| events[n - 1].clone()))
    })
}

/// Waits until the operation an admin POST answered with (`body`) has ended.
fn operation(proxy: &Proxy, body: &str) -> Result<Value> {
    let accepted: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    let id = accepted["operation"]
        .as_u64()
        .with_context(|| format!("no operation id: {body}"))?;
    wait_for(
        &format!("operation {id} to end"),
        Duration::from_secs(120),
        || {
            let s = proxy.status()?;
            let op = s["operations"]
                .as_array()
                .and_then(|ops| ops.iter().find(|o| o["id"] == id).cloned())
                .with_context(|| format!("operation {id} in {s}"))?;
            Ok(matches!(op["state"].as_str(), Some("succeeded" | "failed")).then_some(op))
        },
    )
}

/// The standbys streaming from node `p`, by name.
fn streaming_from(c: &PgCluster, p: usize) -> Result<Vec<String>> {
    let out = c
        .node(p)
        .psql("select application_name from pg_stat_replication where state = 'streaming' order by 1")?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Waits until node `i` is an unfenced standby streaming from node `p` on `p`'s timeline.
fn wait_rejoined(proxy: &Proxy, c: &PgCluster, i: usize, p: usize, limit: Duration) -> Result<()> {
    let name = c.node(i).name().to_string();
    wait_for(&format!("{name} back as a standby of node{p}"), limit, || {
        let s = node_status(proxy, i)?;
        let streams = streaming_from(c, p)?.contains(&name);
        Ok((s["fenced"] == false && streams).then_some(()))
    })?;
    let tl = |n: usize, sql: &str| -> Result<String> { c.node(n).psql(sql) };
    let primary_tl = tl(p, "select timeline_id from pg_control_checkpoint()")?;
    let standby_tl = wait_for(&format!("{name} on the primary's timeline"), DEADLINE, || {
        let t = tl(i, "select received_tli from pg_stat_wal_receiver")?;
        Ok((t == primary_tl).then_some(t))
    })?;
    assert_eq!(standby_tl, primary_tl);
    Ok(())
}

/// Errors writers may see across a failover: the statement in flight (08006, or a closed
/// session) and connections refused while there was no primary.
fn assert_clean_errors(errors: &BTreeMap<String, usize>) {
    for k in errors.keys() {
        assert!(
            k.starts_with("08") || k == "closed" || k == "57P01",
            "unexpected client error {k}: {errors:?}"
        );
    }
}

/// The ids of table `t` on node `i`.
fn ids_on(c: &PgCluster, i: usize) -> Result<HashSet<i64>> {
    Ok(c.node(i)
        .psql("select id from t")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chain_drill_three_primaries_killed_in_a_row_all_come_back_as_standbys() -> Result<()> {
    support::bounded(chain_body(false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chain_drill_in_synchronous_mode_loses_no_acknowledged_write() -> Result<()> {
    support::bounded(chain_body(true)).await
}

async fn chain_body(synchronous: bool) -> Result<()> {
    let c = cluster_sync(2, synchronous).await?;
    let proxy = proxy_for(&c, true, |cfg| cfg.failover.rejoin.retry_interval = 2.0)?;
    let writers = Writers::start(&proxy, 2);
    writers.first_ack_after(Instant::now()).await?;
    let mut killed = Vec::new();
    let mut primary = elected(&proxy)?;
    for round in 1..=3 {
        let victim = primary;
        c.node(victim).kill9()?;
        let t0 = Instant::now();
        let ev = wait_event(&proxy, "failover", round)?;
        assert!(ev["error"].is_null(), "round {round}: {ev}");
        assert_eq!(ev["failed"], c.node(victim).name(), "{ev}");
        let first = writers.first_ack_after(t0).await?;
        primary = elected(&proxy)?;
        assert_ne!(primary, victim);
        // The killed node comes back on its own: restarted, rewound, streaming, unfenced.
        wait_rejoined(&proxy, &c, victim, primary, Duration::from_secs(120))?;
        eprintln!(
            "chain drill (synchronous: {synchronous}): failure {round} (node{victim} killed): kill to first acknowledged write {} ms, \
             kill to node{victim} back as a standby {} ms",
            first.duration_since(t0).as_millis(),
            t0.elapsed().as_millis()
        );
        killed.push(victim);
    }
    let t_end = Instant::now();
    writers.first_ack_after(t_end).await?;
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    // Every node but the last primary streams from it.
    let mut want: Vec<String> = (0..3)
        .filter(|&i| i != primary)
        .map(|i| c.node(i).name().to_string())
        .collect();
    want.sort();
    wait_for(
        "every other node streaming from the last primary",
        DEADLINE,
        || Ok((streaming_from(&c, primary)? == want).then_some(())),
    )?;
    assert!(killed.len() == 3 && !acked.is_empty());
    let present = ids_on(&c, primary)?;
    let lost = acked.iter().filter(|id| !present.contains(id)).count();
    eprintln!(
        "chain drill (synchronous: {synchronous}): {} writes acknowledged, {lost} lost",
        acked.len()
    );
    if synchronous {
        assert_eq!(lost, 0, "acknowledged writes lost in synchronous mode");
    }
    // Rejoins are operations in /status.
    let ops = proxy.status()?["operations"].clone();
    let rejoins = ops
        .as_array()
        .map(|o| {
            o.iter()
                .filter(|o| o["kind"] == "rejoin" && o["state"] == "succeeded")
                .count()
        })
        .unwrap_or(0);
    for o in ops.as_array().into_iter().flatten() {
        if o["state"] == "failed" {
            eprintln!("chain drill (synchronous: {synchronous}): a failed operation: {o}");
        }
    }
    assert!(rejoins >= 3, "{ops}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_old_primary_is_rewound_into_a_standby_on_the_new_timeline() -> Result<()> {
    support::bounded(crashed_body()).await
}

async fn crashed_body() -> Result<()> {
    let c = cluster(2).await?;
    let proxy = proxy_for(&c, false, |_| {})?;
    assert_eq!(elected(&proxy)?, 0);
    // Writes the old primary took, then a crash with WAL of its own after them.
    support::psql(
        &proxy,
        "postgres",
        "pw",
        "insert into t select generate_series(1, 1000)",
    )?;
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert!(ev["error"].is_null(), "{ev}");
    let p = elected(&proxy)?;
    support::psql(&proxy, "postgres", "pw", "insert into t values (5000)")?;
    assert_eq!(node_status(&proxy, 0)?["fenced"], true);

    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let result = op["result"].as_str().unwrap_or_default();
    assert!(result.contains("rewound with pg_rewind"), "{op}");
    wait_rejoined(&proxy, &c, 0, p, DEADLINE)?;
    // It has the write made after the failover, and it is a standby: it refuses writes.
    let lsn = c.node(p).current_lsn()?;
    c.node(0).wait_replayed(&lsn)?;
    assert!(ids_on(&c, 0)?.contains(&5000));
    let refused = c.node(0).psql("insert into t values (6000)").unwrap_err();
    assert!(format!("{refused:#}").contains("read-only"), "{refused:#}");
    // Its own settings survived the rewind (pg_rewind copies the primary's configuration files).
    assert_eq!(c.node(0).psql("show cluster_name")?, "node0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_pg_rewind_cannot_work_a_fresh_base_backup_rejoins_the_node() -> Result<()> {
    support::bounded(fallback_body()).await
}

async fn fallback_body() -> Result<()> {
    let c = cluster(1).await?;
    let proxy = proxy_for(&c, false, |_| {})?;
    assert_eq!(elected(&proxy)?, 0);
    c.node(0).kill9()?;
    wait_event(&proxy, "failover", 1)?;
    support::psql(&proxy, "postgres", "pw", "insert into t values (7000)")?;
    // The crashed node's WAL is gone: neither crash recovery nor pg_rewind can work.
    let wal = c.node(0).data_dir().join("pg_wal");
    for e in std::fs::read_dir(&wal)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::remove_file(e.path())?;
        }
    }
    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let result = op["result"].as_str().unwrap_or_default();
    assert!(
        result.contains("rebuilt with pg_basebackup") && result.contains("pg_rewind failed"),
        "{op}"
    );
    wait_rejoined(&proxy, &c, 0, 1, DEADLINE)?;
    let lsn = c.node(1).current_lsn()?;
    c.node(0).wait_replayed(&lsn)?;
    assert!(ids_on(&c, 0)?.contains(&7000));
    assert_eq!(c.node(0).psql("show cluster_name")?, "node0");
    assert!(
        !c.node(0).data_dir().with_extension("rejoin-old").exists(),
        "the old directory is removed once the backup succeeded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_keeps_the_old_primary_as_a_standby_and_loses_no_write() -> Result<()> {
    support::bounded(switchover_body()).await
}

async fn switchover_body() -> Result<()> {
    let c = cluster(2).await?;
    let proxy = proxy_for(&c, false, |_| {})?;
    assert_eq!(elected(&proxy)?, 0);
    let before = streaming_from(&c, 0)?.len();
    let writers = Writers::start(&proxy, 3);
    writers.first_ack_after(Instant::now()).await?;
    let (code, body) = proxy.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let v: Value = serde_json::from_str(op["result"].as_str().unwrap_or("{}"))?;
    assert_eq!(v["promoted"], "node1", "{v}");
    assert_eq!(v["rejoin"]["ok"], true, "{v}");
    let t = Instant::now();
    writers.first_ack_after(t).await?;
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    wait_rejoined(&proxy, &c, 0, 1, DEADLINE)?;
    assert_eq!(streaming_from(&c, 1)?.len(), before, "as many standbys as before");
    // No acknowledged write is lost, and the old primary, now a standby, has them all.
    let lsn = c.node(1).current_lsn()?;
    c.node(0).wait_replayed(&lsn)?;
    for i in [0, 1] {
        let present = ids_on(&c, i)?;
        let lost = acked.iter().filter(|id| !present.contains(id)).count();
        assert_eq!(lost, 0, "acknowledged writes missing on node{i}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewind_rejoin_without_a_data_directory_fails_clearly_and_the_node_stays_fenced() -> Result<()> {
    support::bounded(no_data_dir_body()).await
}

async fn no_data_dir_body() -> Result<()> {
    let c = cluster(1).await?;
    let not_pg = tempfile::tempdir()?;
    let mut state_dir = String::new();
    let proxy = proxy_for(&c, false, |cfg| {
        cfg.nodes[0].data_dir = String::new();
        state_dir.clone_from(&cfg.state_dir);
    })?;
    assert_eq!(elected(&proxy)?, 0);
    c.node(0).kill9()?;
    wait_event(&proxy, "failover", 1)?;
    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "failed", "{op}");
    let error = op["error"].as_str().unwrap_or_default();
    assert!(error.contains("its data directory is unknown"), "{op}");
    assert_eq!(node_status(&proxy, 0)?["fenced"], true);
    drop(proxy);

    // A directory that is not a PostgreSQL data directory (the record keeps node0 fenced).
    let proxy = proxy_for(&c, false, |cfg| {
        cfg.nodes[0].data_dir = not_pg.path().display().to_string();
        cfg.state_dir = state_dir;
    })?;
    let p = elected(&proxy)?;
    assert_eq!(p, 1);
    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert!(
        op["error"]
            .as_str()
            .unwrap_or_default()
            .contains("is not a PostgreSQL data directory"),
        "{op}"
    );
    // Nothing was made of the directory, and the node stays fenced.
    assert_eq!(
        std::fs::read_dir(not_pg.path())?.count(),
        0,
        "nothing written there"
    );
    assert_eq!(node_status(&proxy, 0)?["fenced"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_stops_a_rejoin_under_way_and_the_node_then_rejoins_the_new_primary() -> Result<()> {
    support::bounded(failover_during_rejoin_body()).await
}

/// The operations on node `name` of kind `kind` in `/status`.
fn operations_on(proxy: &Proxy, kind: &str, name: &str) -> Result<Vec<Value>> {
    Ok(proxy.status()?["operations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["kind"] == kind && o["node"] == name)
        .cloned()
        .collect())
}

async fn failover_during_rejoin_body() -> Result<()> {
    let c = cluster(2).await?;
    let proxy = proxy_for(&c, true, |cfg| cfg.failover.rejoin.retry_interval = 1.0)?;
    assert_eq!(elected(&proxy)?, 0);
    // The primary freezes: dbproxy fails over, and the automatic rejoin of node0 starts at once
    // and stays in its first step, since a frozen server never finishes its fast shutdown.
    c.node(0).sigstop()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert!(ev["error"].is_null(), "{ev}");
    let p1 = elected(&proxy)?;
    let p2 = 3 - p1;
    let stuck = wait_for("node0's rejoin stopping it", DEADLINE, || {
        let ops = operations_on(&proxy, "rejoin", "node0")?;
        Ok(ops.into_iter().find(|o| {
            o["state"] == "running" && o["step"].as_str().is_some_and(|s| s.contains("stopping node0"))
        }))
    })?;

    // The new primary dies while that rejoin runs: the failover does not wait behind it.
    c.node(p1).kill9()?;
    let t0 = Instant::now();
    let ev = wait_event(&proxy, "failover", 2)?;
    assert!(ev["error"].is_null(), "{ev}");
    assert_eq!(ev["failed"], c.node(p1).name(), "{ev}");
    assert_eq!(ev["promoted"], c.node(p2).name(), "{ev}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the failover waited {:?} (behind the rejoin?)",
        t0.elapsed()
    );
    let stopped = wait_for("the rejoin under way to end", DEADLINE, || {
        let ops = operations_on(&proxy, "rejoin", "node0")?;
        Ok(ops
            .into_iter()
            .find(|o| o["id"] == stuck["id"] && o["state"] == "failed"))
    })?;
    let error = stopped["error"].as_str().unwrap_or_default();
    assert!(error.contains("a failover comes first"), "{stopped}");
    assert_eq!(elected(&proxy)?, p2);
    support::psql(&proxy, "postgres", "pw", "insert into t values (8000)")?;

    // node0 thaws (and ends the fast shutdown it was asked for): the rejoin is tried again, now
    // against the new primary; node0 is never elected.
    c.node(0).sigcont()?;
    wait_rejoined(&proxy, &c, 0, p2, Duration::from_secs(120))?;
    assert_eq!(elected(&proxy)?, p2);
    let port = support::psql(
        &proxy,
        "postgres",
        "pw",
        "with i as (insert into t values (8001) returning 1) select inet_server_port() from i",
    )?;
    assert_eq!(port, c.node(p2).port().to_string());
    assert_eq!(c.node(0).psql("select pg_is_in_recovery()")?, "t");
    let lsn = c.node(p2).current_lsn()?;
    c.node(0).wait_replayed(&lsn)?;
    let ids = ids_on(&c, 0)?;
    assert!(
        ids.contains(&8000) && ids.contains(&8001),
        "node0 follows node{p2}"
    );
    let r = proxy.status()?["record"].clone();
    assert_eq!(r["primary"], c.node(p2).name(), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn started_while_the_recorded_primary_is_down_every_other_standby_follows_the_promoted_one(
) -> Result<()> {
    support::bounded(start_with_primary_down_body()).await
}

async fn start_with_primary_down_body() -> Result<()> {
    let c = cluster(2).await?;
    let mut state_dir = String::new();
    let proxy = proxy_for(&c, false, |cfg| state_dir.clone_from(&cfg.state_dir))?;
    assert_eq!(elected(&proxy)?, 0);
    // A switchover makes node1 the primary and keeps node0 as its standby: node0, which the node
    // table takes for the primary until its first health check, is now a standby.
    let (code, body) = proxy.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "succeeded", "{op}");
    wait_rejoined(&proxy, &c, 0, 1, DEADLINE)?;
    wait_for("node2 streaming from node1", DEADLINE, || {
        Ok((streaming_from(&c, 1)? == ["node0", "node2"]).then_some(()))
    })?;
    drop(proxy);
    // dbproxy is down when the primary dies; it starts with the recorded primary unreachable.
    c.node(1).kill9()?;
    let proxy = proxy_for(&c, false, |cfg| cfg.state_dir = state_dir)?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert!(ev["error"].is_null(), "{ev}");
    assert_eq!(ev["failed"], "node1", "{ev}");
    let p = elected(&proxy)?;
    assert_ne!(p, 1);
    let other = 2 - p; // node0 or node2, whichever was not promoted
    let name = c.node(other).name();
    assert!(
        ev["followers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x["node"] == name && x["ok"] == true)),
        "{name} was re-pointed at node{p}: {ev}"
    );
    wait_for(&format!("{name} streaming from node{p}"), DEADLINE, || {
        Ok(streaming_from(&c, p)?.contains(&name.to_string()).then_some(()))
    })?;
    Ok(())
}

#[test]
fn automatic_rejoin_needs_a_way_to_rejoin() {
    let mut cfg = Config::loopback([("a", 1), ("b", 2)], None);
    cfg.failover.rejoin.automatic = true;
    let e = common::Validate::validate(cfg.clone()).unwrap_err().to_string();
    assert!(e.contains("failover.rejoin.automatic"), "{e}");
    cfg.failover.rejoin.method = RejoinMethod::Rewind;
    common::Validate::validate(cfg.clone()).unwrap();
    cfg.failover.rejoin.retry_interval = 0.0;
    let e = common::Validate::validate(cfg).unwrap_err().to_string();
    assert!(e.contains("failover.rejoin.retry_interval"), "{e}");
}

/// Sends `sig` (STOP, CONT) to process `pid`.
fn signal(pid: &str, sig: &str) -> Result<()> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{sig} {pid}"))
        .output()?;
    anyhow::ensure!(out.status.success(), "kill -{sig} {pid}: {out:?}");
    Ok(())
}

/// The greatest WAL position node `i` has received or replayed.
fn standby_lsn(c: &PgCluster, i: usize) -> Result<String> {
    c.node(i).psql(
        "select greatest(coalesce(pg_last_wal_receive_lsn(), '0/0'), coalesce(pg_last_wal_replay_lsn(), '0/0'))",
    )
}

/// Synchronous mode, the potential standby ahead of the synchronous one when the primary dies
/// (the WAL of a commit still waiting for the synchronous standby reached only the other one,
/// as under load, or with a standby that has just rejoined): promoting the synchronous one
/// would leave the other with WAL past the new timeline's start, unable to ever follow it,
/// and writes held until `synchronous_standby_names` was cleared (`follow_timeout` later).
/// The standby ahead is promoted instead (it holds every acknowledged commit), the synchronous
/// one follows it and stays synchronous, and writes resume at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_synchronous_mode_a_standby_ahead_of_the_synchronous_one_is_promoted() -> Result<()> {
    support::bounded(ahead_body()).await
}

async fn ahead_body() -> Result<()> {
    let c = cluster_sync(2, true).await?;
    // A hang would last follow_timeout: make it unmistakable.
    let proxy = proxy_for(&c, true, |cfg| cfg.failover.follow_timeout = 60.0)?;
    assert_eq!(elected(&proxy)?, 0);
    let sync_name = c
        .primary()
        .psql("select application_name from pg_stat_replication where sync_state = 'sync'")?;
    let s = (1..3)
        .find(|&i| c.node(i).name() == sync_name)
        .with_context(|| format!("no synchronous standby: {sync_name:?}"))?;
    let y = 3 - s;
    wait_for("dbproxy to see the synchronous standby", DEADLINE, || {
        Ok((node_status(&proxy, s)?["replication_sync_state"] == "sync").then_some(()))
    })?;
    // Freeze the primary's WAL sender to the synchronous standby: a commit then waits for it,
    // while its WAL reaches the other standby.
    let sender = c.primary().psql(&format!(
        "select pid from pg_stat_replication where application_name = '{sync_name}'"
    ))?;
    signal(&sender, "STOP")?;
    let c2 = c.clone();
    let pending = std::thread::spawn(move || {
        // Ends with an error when the primary is killed.
        let _ = c2.node(0).psql_timeout("insert into t values (424242)", DEADLINE);
    });
    let ahead = wait_for(
        "the potential standby ahead of the synchronous one",
        DEADLINE,
        || {
            let (ly, ls) = (standby_lsn(&c, y)?, standby_lsn(&c, s)?);
            let gt = c
                .node(y)
                .psql(&format!("select '{ly}'::pg_lsn > '{ls}'::pg_lsn"))?;
            Ok((gt == "t").then_some(()))
        },
    );
    let killed = ahead.and_then(|()| c.node(0).kill9());
    // Killed, not thawed: it would send the synchronous standby what it holds.
    signal(&sender, "KILL")?;
    killed?;
    let t0 = Instant::now();
    let ev = wait_event(&proxy, "failover", 1)?;
    let took = t0.elapsed();
    assert!(ev["error"].is_null(), "{ev}");
    assert_eq!(ev["promoted"], c.node(y).name(), "{ev}");
    assert!(
        took < Duration::from_secs(20),
        "the failover took {took:?} (writes held meanwhile): {ev}"
    );
    assert_eq!(ev["cleared_synchronous_standby_names"], false, "{ev}");
    // A write through dbproxy is acknowledged: the old synchronous standby follows and is
    // synchronous again.
    let mut w = tokio_postgres::connect(&proxy.conn_string("postgres", "pw"), tokio_postgres::NoTls).await?;
    tokio::spawn(w.1);
    let w = &mut w.0;
    tokio::time::timeout(
        Duration::from_secs(20),
        w.execute("insert into t values (1)", &[]),
    )
    .await??;
    wait_for("the old synchronous standby synchronous again", DEADLINE, || {
        let out = c.node(y).psql(&format!(
            "select sync_state from pg_stat_replication where application_name = '{}'",
            c.node(s).name()
        ))?;
        Ok((out == "sync").then_some(()))
    })?;
    // The commit that was waiting reached the new primary (it was in the WAL it got first).
    assert!(ids_on(&c, y)?.contains(&424242));
    let _ = pending.join();
    Ok(())
}
