//! Automatic failover through dbproxy against real PostgreSQL clusters: a primary killed or frozen
//! under write load, a failing first candidate, fencing of an old primary that comes back, the
//! other standby following the new primary, no acknowledged write lost in synchronous mode,
//! sessions that survive, start-up discovery by timeline, and the switchover and attach endpoints.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dbproxy::config::Config;
use dbproxy::failover::{PromoteConfig, PromoteMethod};
use serde_json::Value;
use support::writers::Writers;
use support::{config_for, Proxy};
use testkit::{wait_for, PgCluster, DEADLINE};

async fn cluster(standbys: usize, synchronous: bool) -> Result<Arc<PgCluster>> {
    let c = tokio::task::spawn_blocking(move || {
        PgCluster::builder()
            .standbys(standbys)
            .synchronous(synchronous)
            .password("pw")
            .start()
    })
    .await??;
    c.primary()
        .psql("create table t (id bigint primary key, at timestamptz default now())")?;
    c.wait_replicated()?;
    Ok(Arc::new(c))
}

fn proxy_for(c: &PgCluster, tweak: impl FnOnce(&mut Config)) -> Result<Proxy> {
    let mut cfg = config_for(c, Some("pw"));
    tweak(&mut cfg);
    Proxy::start(cfg)
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

fn node_status(proxy: &Proxy, i: usize) -> Result<Value> {
    Ok(proxy.status()?["nodes"][i].clone())
}

/// Every acknowledged id is on node `i`.
fn assert_none_lost(c: &PgCluster, i: usize, acked: &[i64]) -> Result<()> {
    let present: HashSet<i64> = c
        .node(i)
        .psql("select id from t")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
    if !lost.is_empty() {
        bail!(
            "{} acknowledged writes lost: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
    Ok(())
}

/// Errors writers may see across a failover: the statement in flight (08006, or a closed session)
/// and connections refused while there was no primary. Anything else is a bug.
fn assert_clean_errors(errors: &BTreeMap<String, usize>) {
    for k in errors.keys() {
        assert!(
            k.starts_with("08") || k == "closed" || k == "57P01",
            "unexpected client error {k}: {errors:?}"
        );
    }
}

fn node_index(status_name: &Value, c: &PgCluster) -> usize {
    let name = status_name.as_str().unwrap_or_default();
    (0..c.nodes().len())
        .find(|&i| c.node(i).name() == name)
        .expect("a known node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_is_replaced_the_other_standby_follows_and_the_old_one_stays_fenced() -> Result<()> {
    support::bounded(killed_primary_body()).await
}

async fn killed_primary_body() -> Result<()> {
    let c = cluster(2, false).await?;
    let proxy = proxy_for(&c, |_| {})?;
    // An idle session with a setting and a prepared statement, opened before the failover.
    let idle = proxy.connect("postgres", "pw").await?;
    idle.batch_execute("set application_name = 'survivor'").await?;
    let insert = idle
        .prepare("insert into t (id) values ($1) returning current_setting('application_name'), inet_server_port()")
        .await?;
    let before: String = idle.query_one(&insert, &[&1i64]).await?.get(0);
    assert_eq!(before, "survivor");

    let writers = Writers::start(&proxy, 3);
    writers.wait_acked_after(Instant::now()).await?;
    let killed = Instant::now();
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["failed"], "node0", "{ev}");
    assert!(ev["error"].is_null(), "{ev}");
    let new = node_index(&ev["promoted"], &c);
    assert_ne!(new, 0);
    let other = 3 - new;
    assert_eq!(ev["followers"][0]["node"], c.node(other).name(), "{ev}");
    assert_eq!(ev["followers"][0]["ok"], true, "{ev}");
    assert!(ev["detected"]["ms"].as_u64() <= ev["promoted_at"]["ms"].as_u64());
    writers.wait_acked_after(killed).await?;

    // The idle session survived: same setting, same prepared statement, now on the new primary.
    let row = idle.query_one(&insert, &[&2i64]).await?;
    assert_eq!(row.get::<_, String>(0), "survivor");
    assert_eq!(row.get::<_, i32>(1) as u16, c.node(new).port());

    // The other standby streams from the new primary.
    let n = c.node(new).psql(&format!(
        "select count(*) from pg_stat_replication where application_name = '{}' and state = 'streaming'",
        c.node(other).name()
    ))?;
    assert_eq!(n, "1");

    // The old primary comes back as a primary on the old timeline: fenced, it gets nothing.
    c.node(0).start()?;
    wait_for("node0 reachable again but fenced", DEADLINE, || {
        let s = node_status(&proxy, 0)?;
        Ok((s["pg_status"] == "up" && s["pg_role"] == "primary").then_some(s))
    })?;
    let s = node_status(&proxy, 0)?;
    assert_eq!(s["fenced"], true, "{s}");
    assert_eq!(s["status"], "down", "{s}");
    // Answering again, it is fenced on the node too (its sessions ended, read-only).
    fenced_on_node(&proxy, "node0")?;
    let resumed = Instant::now();
    writers.wait_acked_after(resumed).await?;
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    let late: Vec<i64> = acked.iter().rev().take(5).copied().collect();
    let on_old = c.node(0).psql(&format!(
        "select count(*) from t where id in ({})",
        late.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    ))?;
    assert_eq!(on_old, "0", "no write reaches the fenced old primary");
    // Writers after the failover went to the new primary; SHOW POOL_NODES agrees.
    let pool = support::psql(&proxy, "postgres", "pw", "show pool_nodes")?;
    let line0 = pool.lines().next().context("a row for node0")?;
    assert!(
        line0.starts_with("0|127.0.0.1|") && line0.contains("|down|"),
        "{pool}"
    );
    let metrics = proxy.admin_get("/metrics")?;
    assert!(
        metrics.contains("dbproxy_failovers_total{kind=\"failover\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_synchronous_mode_no_acknowledged_write_is_lost() -> Result<()> {
    support::bounded(sync_body()).await
}

async fn sync_body() -> Result<()> {
    let c = cluster(1, true).await?;
    let proxy = proxy_for(&c, |_| {})?;
    wait_for("the standby reported synchronous", DEADLINE, || {
        Ok((node_status(&proxy, 1)?["replication_sync_state"] == "sync").then_some(()))
    })?;
    let writers = Writers::start(&proxy, 4);
    // Enough acknowledged writes on both sides of the kill for the check below to mean something.
    writers.wait_acked(Instant::now(), 20).await?;
    let killed = Instant::now();
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["promoted"], "node1", "{ev}");
    assert_eq!(ev["cleared_synchronous_standby_names"], true, "{ev}");
    writers.wait_acked(killed, 10).await?;
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    assert!(acked.len() > 10);
    assert_none_lost(&c, 1, &acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_primary_is_replaced_and_an_open_transaction_gets_a_clean_error() -> Result<()> {
    support::bounded(frozen_body()).await
}

async fn frozen_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let proxy = proxy_for(&c, |cfg| cfg.health.timeout = 1.0)?;
    let tx = proxy.connect("postgres", "pw").await?;
    tx.batch_execute("begin; insert into t (id) values (1)").await?;
    let backend: i32 = tx.query_one("select pg_backend_pid()", &[]).await?.get(0);
    let idle = proxy.connect("postgres", "pw").await?;
    idle.batch_execute("select 1").await?;

    // Freeze the server: the postmaster takes no new session, and the transaction's own backend
    // stops answering.
    let signal = |sig: &str| -> Result<()> {
        let status = std::process::Command::new("kill")
            .arg(sig)
            .arg(backend.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill {sig} {backend}");
        Ok(())
    };
    c.node(0).sigstop()?;
    signal("-STOP")?;
    // The statement in flight must end with an error once the failover is done, not hang.
    let r = tokio::time::timeout(DEADLINE, tx.batch_execute("insert into t (id) values (2)")).await;
    let e = r.context("a statement on a frozen primary hung")?.unwrap_err();
    let code = e.code().map(|c| c.code().to_string());
    assert!(
        code.as_deref().is_some_and(|c| c.starts_with("08")) || e.is_closed(),
        "expected a class 08 error, got {e:?}"
    );
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["promoted"], "node1", "{ev}");
    // The idle session carries on against the new primary.
    idle.batch_execute("insert into t (id) values (3)").await?;
    assert_eq!(c.node(1).psql("select count(*) from t where id = 3")?, "1");
    // Thawed, the old primary still claims the role but stays fenced.
    signal("-CONT")?;
    c.node(0).sigcont()?;
    wait_for("the thawed node0 reports itself primary", DEADLINE, || {
        let s = node_status(&proxy, 0)?;
        Ok((s["pg_status"] == "up" && s["pg_role"] == "primary").then_some(()))
    })?;
    assert_eq!(node_status(&proxy, 0)?["fenced"], true);
    fenced_on_node(&proxy, "node0")?;
    idle.batch_execute("insert into t (id) values (4)").await?;
    assert_eq!(c.node(0).psql("select count(*) from t where id = 4")?, "0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_whose_promotion_fails_is_skipped() -> Result<()> {
    support::bounded(failing_candidate_body()).await
}

async fn failing_candidate_body() -> Result<()> {
    let c = cluster(2, false).await?;
    let proxy = proxy_for(&c, |cfg| {
        cfg.failover.nodes.insert(
            "node1".into(),
            PromoteConfig {
                method: PromoteMethod::Exec,
                command: "echo cannot promote {node} on port {port}; exit 7".into(),
                ..Default::default()
            },
        );
        // Equal WAL positions: node1 would win on priority, and fails.
        cfg.failover.priority.insert("node1".into(), 0);
        cfg.failover.priority.insert("node2".into(), 1);
    })?;
    let client = proxy.connect("postgres", "pw").await?;
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["promoted"], "node2", "{ev}");
    let attempt = &ev["failed_attempts"][0];
    assert_eq!(attempt["node"], "node1", "{ev}");
    let why = attempt["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("exit status: 7") && why.contains("cannot promote node1"),
        "{why}"
    );
    assert_eq!(ev["followers"][0]["node"], "node1", "{ev}");
    assert_eq!(ev["followers"][0]["ok"], true, "{ev}");
    let port: i32 = client
        .query_one("insert into t (id) values (1) returning inet_server_port()", &[])
        .await?
        .get(0);
    assert_eq!(port as u16, c.node(2).port());
    // node1 was fenced in the record before node2 was tried; streaming from node2 now, it is a
    // harmless standby again.
    let s = proxy.status()?;
    assert_eq!(s["nodes"][1]["fenced"], false, "{s}");
    assert!(s["record"]["fenced"]["node1"].is_null(), "{s}");
    assert!(
        s["record"]["term"].as_u64() >= Some(4),
        "fence, switch and lift recorded: {s}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_start_up_the_newest_timeline_wins_and_a_stale_primary_is_fenced() -> Result<()> {
    support::bounded(restart_body()).await
}

async fn restart_body() -> Result<()> {
    let c = cluster(1, false).await?;
    // A failover dbproxy did not see (or a previous dbproxy run), then the old primary restarted.
    c.node(0).kill9()?;
    c.promote(1)?;
    c.node(0).start()?;
    assert_eq!(c.node(0).psql("select pg_is_in_recovery()")?, "f");
    let proxy = proxy_for(&c, |_| {})?;
    let s = proxy.status()?;
    assert_eq!(s["primary"], 1, "{s}");
    assert_eq!(s["nodes"][0]["fenced"], true, "{s}");
    let client = proxy.connect("postgres", "pw").await?;
    let port: i32 = client
        .query_one("insert into t (id) values (1) returning inet_server_port()", &[])
        .await?
        .get(0);
    assert_eq!(port as u16, c.node(1).port());
    fenced_on_node(&proxy, "node0")?;
    assert_eq!(c.node(0).psql("select count(*) from t")?, "0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_loses_no_write_and_attach_brings_the_old_primary_back() -> Result<()> {
    support::bounded(switchover_body()).await
}

async fn switchover_body() -> Result<()> {
    let c = cluster(2, false).await?;
    let proxy = proxy_for(&c, |cfg| {
        cfg.failover.rejoin.method = dbproxy::rejoin::RejoinMethod::Exec;
        cfg.failover.rejoin.command = "echo rejoining {node} to {primary} on port {primary_port}".into();
        cfg.failover.rejoin.timeout = 30.0;
    })?;
    // Bad requests first.
    assert_eq!(proxy.admin("POST", "/nodes/9/promote")?.0, 404);
    assert_eq!(proxy.admin("GET", "/nodes/1/promote")?.0, 405);
    let (code, body) = proxy.admin("POST", "/nodes/0/promote")?;
    assert_eq!(code, 409, "{body}");
    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!((code, body.trim()), (409, "node0 is the primary"));

    let writers = Writers::start(&proxy, 3);
    writers.wait_acked_after(Instant::now()).await?;
    let (code, body) = proxy.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(
        (op["state"].as_str(), op["kind"].as_str()),
        (Some("succeeded"), Some("switchover")),
        "{op}"
    );
    let ev = wait_event(&proxy, "switchover", 1)?;
    assert_eq!(ev["promoted"], "node1", "{ev}");
    assert_eq!(ev["followers"][0]["node"], "node2", "{ev}");
    assert_eq!(ev["followers"][0]["ok"], true, "{ev}");
    let switched = Instant::now();
    writers.wait_acked_after(switched).await?;
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    // A planned switchover loses nothing, even with asynchronous replication.
    assert_none_lost(&c, 1, &acked)?;
    assert_eq!(node_status(&proxy, 0)?["fenced"], true);

    // Attaching a node that still is a primary fails and says why.
    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "failed", "{op}");
    assert!(
        op["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not in recovery"),
        "{op}"
    );
    // Rebuilt as a standby of the new primary, it can be attached and takes reads again.
    c.node(0).rebuild_as_standby(c.node(1))?;
    let (code, body) = proxy.admin("POST", "/nodes/0/attach")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let result = op["result"].as_str().unwrap_or_default();
    assert!(result.contains("rejoining node0 to node1 on port"), "{op}");
    let s = node_status(&proxy, 0)?;
    assert_eq!(s["fenced"], false, "{s}");
    let ev = wait_event(&proxy, "attach", 2)?;
    assert!(ev["error"].is_null(), "{ev}");
    wait_for("node0 up as a standby", DEADLINE, || {
        let s = node_status(&proxy, 0)?;
        Ok((s["status"] == "up" && s["role"] == "standby").then_some(()))
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_node_rejoins_on_its_own_when_configured() -> Result<()> {
    support::bounded(automatic_rejoin_body()).await
}

async fn automatic_rejoin_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let dir = tempfile::tempdir()?;
    let (asked, done) = (dir.path().join("asked"), dir.path().join("done"));
    // The rejoin command hands over to the test, which rebuilds the node as testkit owns its
    // processes, and waits (bounded) until that is done; a real one would run pg_rewind.
    let command = format!(
        "echo {{node}} > {asked}; for i in $(seq 1 600); do [ -f {done} ] && exit 0; sleep 0.1; done; exit 1",
        asked = asked.display(),
        done = done.display()
    );
    let proxy = proxy_for(&c, |cfg| {
        cfg.failover.rejoin.method = dbproxy::rejoin::RejoinMethod::Exec;
        cfg.failover.rejoin.command = command;
        cfg.failover.rejoin.automatic = true;
        cfg.failover.rejoin.timeout = 90.0;
    })?;
    wait_for("node0 elected", DEADLINE, || {
        Ok((proxy.status()?["primary"] == 0).then_some(()))
    })?;
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["promoted"], "node1", "{ev}");
    // Nothing happens while the old primary is down; once it answers, dbproxy asks for a rejoin.
    c.node(0).start()?;
    // The shell creates the file before it writes the name: wait for the name.
    let who = wait_for("dbproxy to run the rejoin command", DEADLINE, || {
        Ok(std::fs::read_to_string(&asked).ok().filter(|s| s.ends_with('\n')))
    })?;
    assert_eq!(who.trim(), "node0");
    c.node(0).rebuild_as_standby(c.node(1))?;
    std::fs::write(&done, "")?;
    let ev = wait_event(&proxy, "attach", 1)?;
    assert!(ev["error"].is_null(), "{ev}");
    assert_eq!(ev["node"], "node0", "{ev}");
    let s = node_status(&proxy, 0)?;
    assert_eq!(s["fenced"], false, "{s}");
    Ok(())
}

/// A config for `c` keeping the cluster record in `state`.
fn proxy_in(c: &PgCluster, state: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> Result<Proxy> {
    proxy_for(c, |cfg| {
        cfg.state_dir = state.display().to_string();
        tweak(cfg)
    })
}

/// The cluster record as dbproxy keeps it in `state`.
fn record_in(state: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(state.join(dbproxy::record::FILE_NAME))?;
    Ok(serde_json::from_str(&text)?)
}

/// Inserts `id` through the proxy and returns the port of the server that took it.
async fn write_through(proxy: &Proxy, id: i64) -> Result<u16> {
    let client = proxy.connect("postgres", "pw").await?;
    let port: i32 = client
        .query_one(
            "insert into t (id) values ($1) returning inet_server_port()",
            &[&id],
        )
        .await?
        .get(0);
    Ok(port as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_while_the_promoted_node_is_down_the_stale_primary_gets_nothing() -> Result<()> {
    support::bounded(restart_during_failover_body()).await
}

async fn restart_during_failover_body() -> Result<()> {
    let c = cluster(2, false).await?;
    let state = tempfile::tempdir()?;
    let proxy = proxy_in(&c, state.path(), |_| {})?;
    // Served once start-up has recorded its decision.
    assert_eq!(proxy.status()?["primary"], 0);
    let r = record_in(state.path())?;
    assert_eq!(
        (r["primary"].as_str(), r["term"].as_u64()),
        (Some("node0"), Some(1)),
        "{r}"
    );
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    let promoted = node_index(&ev["promoted"], &c);
    let other = 3 - promoted;
    assert_eq!(ev["followers"][0]["ok"], true, "{ev}");
    assert_eq!(write_through(&proxy, 1).await?, c.node(promoted).port());
    drop(proxy);
    let r = record_in(state.path())?;
    assert_eq!(r["primary"], c.node(promoted).name(), "{r}");
    // Fenced by the switch; the next term closed the promotion.
    assert_eq!(
        r["fenced"]["node0"].as_u64(),
        r["term"].as_u64().map(|t| t - 1),
        "{r}"
    );
    assert!(r["operation"].is_null(), "{r}");
    assert!(r["timeline"].as_u64() >= Some(2), "{r}");

    // While dbproxy is down, the promoted node dies and the old primary comes back as a primary
    // on its old timeline: the very node discovery alone would elect.
    c.node(promoted).kill9()?;
    c.node(0).start()?;
    assert_eq!(c.node(0).psql("select pg_is_in_recovery()")?, "f");
    let proxy = proxy_in(&c, state.path(), |_| {})?;
    let s = proxy.status()?;
    assert_eq!(s["nodes"][0]["fenced"], true, "{s}");
    assert_ne!(s["primary"], 0, "{s}");
    // The recorded primary is lost: the remaining standby takes over.
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["failed"], c.node(promoted).name(), "{ev}");
    assert_eq!(ev["promoted"], c.node(other).name(), "{ev}");
    for id in 2..12 {
        assert_eq!(write_through(&proxy, id).await?, c.node(other).port());
    }
    fenced_on_node(&proxy, "node0")?;
    assert_eq!(
        c.node(0).psql("select count(*) from t")?,
        "0",
        "no write reached the old primary"
    );
    let r = record_in(state.path())?;
    assert_eq!(r["primary"], c.node(other).name(), "{r}");
    assert!(
        r["fenced"]["node0"].is_u64() && r["fenced"][c.node(promoted).name()].is_u64(),
        "{r}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn started_while_the_recorded_primary_is_down_a_standby_is_promoted() -> Result<()> {
    support::bounded(start_with_primary_down_body()).await
}

async fn start_with_primary_down_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let state = tempfile::tempdir()?;
    let proxy = proxy_in(&c, state.path(), |_| {})?;
    assert_eq!(write_through(&proxy, 1).await?, c.node(0).port());
    drop(proxy);
    c.node(0).kill9()?;
    let proxy = proxy_in(&c, state.path(), |_| {})?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(
        (ev["failed"].as_str(), ev["promoted"].as_str()),
        (Some("node0"), Some("node1")),
        "{ev}"
    );
    assert_eq!(write_through(&proxy, 2).await?, c.node(1).port());
    let s = proxy.status()?;
    assert_eq!(s["record"]["primary"], "node1", "{s}");
    // The first start recorded node0 (1); the failover: promoting (2), switched (3), closed (4).
    assert_eq!(s["record"]["term"], 4, "{s}");
    Ok(())
}

#[tokio::test]
async fn an_unreadable_cluster_record_stops_start_up_with_a_clear_error() -> Result<()> {
    let state = tempfile::tempdir()?;
    let file = state.path().join(dbproxy::record::FILE_NAME);
    std::fs::write(&file, "{\"format\": 1, \"term\": 4, \"primary\": \"node1\"")?;
    let port = testkit::free_port()?;
    let conf = state.path().join("dbproxy.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\
             [[nodes]]\nport = {port}\n",
            state.path().display()
        ),
    )?;
    let run = |conf: &std::path::Path| -> Result<(Option<i32>, String)> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbproxy"))
            .arg("--config")
            .arg(conf)
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, stderr) = run(&conf)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("the cluster record {} is unreadable", file.display()))
            && stderr.contains("move it away"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&file)?,
        "{\"format\": 1, \"term\": 4, \"primary\": \"node1\"",
        "left as it was"
    );
    // A state directory that cannot be created fails at start-up too, naming it.
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}/sub\"\n\
             [[nodes]]\nport = {port}\n",
            file.display()
        ),
    )?;
    let (code, stderr) = run(&conf)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the cluster record"), "{stderr}");
    Ok(())
}

/// Waits until the operation an admin POST answered with (`body`) has ended; returns it as
/// `/status` shows it.
fn operation(proxy: &Proxy, body: &str) -> Result<Value> {
    let accepted: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    let id = accepted["operation"]
        .as_u64()
        .with_context(|| format!("no operation id: {body}"))?;
    wait_for(&format!("operation {id} to end"), DEADLINE, || {
        let s = proxy.status()?;
        let op = s["operations"]
            .as_array()
            .and_then(|ops| ops.iter().find(|o| o["id"] == id).cloned())
            .with_context(|| format!("operation {id} in {s}"))?;
        Ok(matches!(op["state"].as_str(), Some("succeeded" | "failed")).then_some(op))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_whose_client_goes_away_at_once_still_completes() -> Result<()> {
    support::bounded(abandoned_switchover_body()).await
}

async fn abandoned_switchover_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let proxy = proxy_for(&c, |_| {})?;
    let writers = Writers::start(&proxy, 2);
    writers.wait_acked_after(Instant::now()).await?;
    // The switchover is refused (409) until the health checks have seen node1 as a healthy
    // standby, and this client would never read that refusal: wait for it first.
    wait_for("node1 seen as a healthy standby", DEADLINE, || {
        let n = node_status(&proxy, 1)?;
        Ok((n["status"] == "up" && n["role"] == "standby").then_some(()))
    })?;
    // The request is sent and the connection closed before any answer.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(proxy.admin)?;
        write!(
            s,
            "POST /nodes/1/promote HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )?;
        s.shutdown(std::net::Shutdown::Both)?;
    }
    let ev = wait_event(&proxy, "switchover", 1)?;
    assert!(ev["error"].is_null(), "{ev}");
    assert_eq!(ev["promoted"], "node1", "{ev}");
    let s = proxy.status()?;
    assert_eq!(s["primary"], 1, "{s}");
    assert_eq!(s["operations"][0]["state"], "succeeded", "{s}");
    assert_eq!(s["record"]["primary"], "node1", "{s}");
    let switched = Instant::now();
    writers.wait_acked_after(switched).await?;
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    assert_none_lost(&c, 1, &acked)?;
    assert_eq!(write_through(&proxy, 1).await?, c.node(1).port());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_switchover_leaves_the_old_primary_writable_and_elected() -> Result<()> {
    support::bounded(failed_switchover_body()).await
}

async fn failed_switchover_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let proxy = proxy_for(&c, |cfg| {
        cfg.failover.nodes.insert(
            "node1".into(),
            PromoteConfig {
                method: PromoteMethod::Exec,
                command: "echo refusing to promote {node}; exit 4".into(),
                ..Default::default()
            },
        );
    })?;
    let writers = Writers::start(&proxy, 2);
    writers.wait_acked_after(Instant::now()).await?;
    let (code, body) = proxy.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    let op = operation(&proxy, &body)?;
    assert_eq!(op["state"], "failed", "{op}");
    assert!(
        op["error"]
            .as_str()
            .unwrap_or_default()
            .contains("refusing to promote node1"),
        "{op}"
    );
    let s = proxy.status()?;
    assert_eq!(s["primary"], 0, "{s}");
    assert_eq!(s["nodes"][0]["fenced"], false, "{s}");
    assert_eq!(s["record"]["primary"], "node0", "{s}");
    // Writable again, directly and through dbproxy; writers carry on there.
    assert_eq!(c.node(0).psql("show default_transaction_read_only")?, "off");
    c.node(0).psql("insert into t (id) values (-1)")?;
    let failed = Instant::now();
    writers.wait_acked(failed, 5).await?;
    assert_eq!(write_through(&proxy, 1).await?, c.node(0).port());
    let (acked, errors) = writers.stop().await;
    assert_clean_errors(&errors);
    assert_none_lost(&c, 0, &acked)?;
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "t");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_during_a_switchover_waits_for_it_to_end() -> Result<()> {
    support::bounded(shutdown_during_switchover_body()).await
}

async fn shutdown_during_switchover_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let state = tempfile::tempdir()?;
    let proxy = proxy_in(&c, state.path(), |_| {})?;
    let (code, body) = proxy.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    // Shut down at once: dbproxy exits only after the switchover ended, with it recorded.
    drop(proxy);
    let r = record_in(state.path())?;
    assert_eq!(r["primary"], "node1", "{r}");
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "f");
    // The next start routes writes by the record.
    let proxy = proxy_in(&c, state.path(), |_| {})?;
    assert_eq!(write_through(&proxy, 1).await?, c.node(1).port());
    Ok(())
}

/// Clients writing unique ids straight to one server (as a client that bypasses dbproxy would),
/// reconnecting after errors; each acknowledged id is kept with the time it was acknowledged.
struct DirectWriters {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(i64, std::time::SystemTime)>>>,
    errors: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DirectWriters {
    fn start(conn: String, n: usize) -> DirectWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let next = Arc::new(AtomicI64::new(5_000_000));
        let tasks = (0..n)
            .map(|_| {
                let (stop, acked, errors, next, conn) = (
                    stop.clone(),
                    acked.clone(),
                    errors.clone(),
                    next.clone(),
                    conn.clone(),
                );
                tokio::spawn(async move {
                    let conn = format!("{conn} connect_timeout=2");
                    while !stop.load(Ordering::Relaxed) {
                        let client = match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                            Ok((c, driver)) => {
                                tokio::spawn(driver);
                                c
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        while !stop.load(Ordering::Relaxed) {
                            let id = next.fetch_add(1, Ordering::Relaxed);
                            match client.execute("insert into t (id) values ($1)", &[&id]).await {
                                Ok(_) => acked.lock().unwrap().push((id, std::time::SystemTime::now())),
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        DirectWriters {
            stop,
            acked,
            errors,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops them (a writer stuck on a frozen server is abandoned); the acknowledgement times.
    async fn stop(self) -> Vec<std::time::SystemTime> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
        }
        let acked = self.acked.lock().unwrap();
        acked.iter().map(|(_, at)| *at).collect()
    }
}

/// Milliseconds since the epoch.
fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_only_dbproxy_sees_leaves_no_acknowledged_write_on_the_old_primary() -> Result<()> {
    support::bounded(partition_body()).await
}

async fn partition_body() -> Result<()> {
    let c = cluster(1, false).await?;
    // STONITH as an exec step: it reaches the node's processes even while the postmaster does not
    // answer dbproxy.
    let fence = "pid=$(head -1 {data_dir}/postmaster.pid); pkill -KILL -P $pid; kill -KILL $pid";
    let data_dir = c.node(0).data_dir().display().to_string();
    let proxy = proxy_for(&c, |cfg| {
        cfg.health.timeout = 1.0;
        cfg.failover.fence.method = PromoteMethod::Exec;
        cfg.failover.fence.command = fence.into();
        cfg.failover.nodes.insert(
            "node0".into(),
            PromoteConfig {
                data_dir,
                ..Default::default()
            },
        );
    })?;
    let through = Writers::start(&proxy, 2);
    through.wait_acked_after(Instant::now()).await?;
    let direct = DirectWriters::start(c.node(0).conn_string(), 3);
    wait_for("direct writes on node0", DEADLINE, || {
        Ok((direct.acked() >= 20).then_some(()))
    })?;
    // The partition: node0's postmaster stops answering (dbproxy's checks fail), while the
    // sessions the direct writers already hold keep committing on it.
    c.node(0).sigstop()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["promoted"], "node1", "{ev}");
    let promoted_ms = ev["promoted_at"]["ms"].as_u64().context("promoted_at")?;
    let fenced = wait_event(&proxy, "fence", 1)?;
    assert!(fenced["error"].is_null() && fenced["node"] == "node0", "{fenced}");
    through.wait_acked_after(Instant::now()).await?;
    let errors_then = direct.errors.load(Ordering::Relaxed);
    // Until every direct writer has been cut off (their reconnections fail), or one got a write
    // acknowledged after the promotion.
    wait_for("direct writers cut off", DEADLINE, || {
        let late = direct
            .acked
            .lock()
            .unwrap()
            .iter()
            .any(|(_, at)| epoch_ms(*at) >= promoted_ms);
        Ok((late || direct.errors.load(Ordering::Relaxed) >= errors_then + 3).then_some(()))
    })?;
    let acks = direct.stop().await;
    let late: Vec<u64> = acks
        .iter()
        .map(|t| epoch_ms(*t))
        .filter(|&t| t >= promoted_ms)
        .collect();
    assert!(!acks.is_empty());
    assert!(
        late.is_empty(),
        "{} writes acknowledged by the old primary after node1 was promoted",
        late.len()
    );
    let (acked, errors) = through.stop().await;
    assert_clean_errors(&errors);
    assert!(!acked.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_primary_that_answers_again_is_made_read_only() -> Result<()> {
    support::bounded(sql_fence_body()).await
}

async fn sql_fence_body() -> Result<()> {
    let c = cluster(1, false).await?;
    let proxy = proxy_for(&c, |_| {})?;
    c.node(0).kill9()?;
    let ev = wait_event(&proxy, "failover", 1)?;
    assert_eq!(ev["promoted"], "node1", "{ev}");
    // Down, it could not be fenced then (sql needs the node to answer); once back, it is.
    c.node(0).start()?;
    let fenced = wait_event(&proxy, "fence", 1)?;
    assert_eq!(fenced["node"], "node0", "{fenced}");
    assert!(fenced["error"].is_null(), "{fenced}");
    let e = c
        .node(0)
        .psql("insert into t (id) values (1)")
        .expect_err("a direct write on the fenced old primary");
    assert!(format!("{e:#}").contains("read-only transaction"), "{e:#}");
    assert_eq!(write_through(&proxy, 2).await?, c.node(1).port());
    Ok(())
}

/// Waits until `/status` shows the fence step done on node `name` (it ends the node's client
/// sessions, so a test reads the node directly only after it).
fn fenced_on_node(proxy: &Proxy, name: &str) -> Result<Value> {
    wait_for(&format!("{name} fenced on the node"), DEADLINE, || {
        let s = proxy.status()?;
        Ok(s["history"].as_array().and_then(|h| {
            h.iter()
                .find(|e| e["kind"] == "fence" && e["node"] == name && e["error"].is_null())
                .cloned()
        }))
    })
}
