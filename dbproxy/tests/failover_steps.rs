//! The failover building blocks against real PostgreSQL clusters: promotion by `sql` and `exec`
//! (with a failing first candidate), re-pointing a standby, clearing an inherited
//! `synchronous_standby_names`, and telling a promoted primary from a restarted old one by timeline.

use std::sync::Arc;
use std::time::Duration;

use dbproxy::failover::{self, Credentials, NodeRef, Placeholders, PromoteConfig, PromoteMethod};
use testkit::{PgCluster, PgNode};

fn node_ref(id: usize, n: &PgNode) -> NodeRef {
    NodeRef {
        id,
        name: n.name().to_string(),
        host: "127.0.0.1".into(),
        port: n.port(),
        data_dir: n.data_dir().display().to_string(),
        tls: None,
    }
}

fn cred() -> Credentials {
    Credentials {
        user: "postgres".into(),
        password: String::new(),
        database: "postgres".into(),
        connect_timeout: Duration::from_secs(3),
        tls: Default::default(),
    }
}

/// `pg_ctl promote` refuses to run as root; the command runs it as `postgres` then.
fn pg_ctl_promote() -> String {
    let pg_ctl = testkit::pg_bindir().unwrap().join("pg_ctl");
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let as_pg = if root { "runuser -u postgres -- " } else { "" };
    format!("{as_pg}{} promote -D {{data_dir}}", pg_ctl.display())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Starts a cluster off the async threads.
async fn start_cluster(standbys: usize, synchronous: bool) -> Arc<PgCluster> {
    Arc::new(
        blocking(move || {
            PgCluster::builder()
                .standbys(standbys)
                .synchronous(synchronous)
                .start()
                .unwrap()
        })
        .await,
    )
}

/// A row written on node `from` (now a primary) is replayed by node `to`, which now holds 2 rows of `t`.
async fn assert_streams(cluster: &Arc<PgCluster>, from: usize, to: usize) {
    let c = cluster.clone();
    blocking(move || {
        c.node(from).psql("insert into t values (2)").unwrap();
        let lsn = c.node(from).current_lsn().unwrap();
        c.node(to).wait_replayed(&lsn).unwrap();
        assert_eq!(c.node(to).psql("select count(*) from t").unwrap(), "2");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_promotion_and_timelines_tell_the_new_primary_from_the_old() {
    let cluster = start_cluster(1, false).await;
    let old = node_ref(0, cluster.node(0));
    let new = node_ref(1, cluster.node(1));
    assert_eq!(failover::primary_timeline(&old, &cred()).await.unwrap(), Some(1));
    assert_eq!(
        failover::primary_timeline(&new, &cred()).await.unwrap(),
        None,
        "a standby has no write timeline"
    );

    let c = cluster.clone();
    blocking(move || c.node(0).kill9().unwrap()).await;
    let p = Placeholders {
        subject: new.clone(),
        failed: old.clone(),
        new_primary: new.clone(),
        old_primary: old.clone(),
        ..Default::default()
    };
    let outcome = failover::promote(
        &new,
        &PromoteConfig::default(),
        &p,
        &cred(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(outcome.output.is_empty());
    let c = cluster.clone();
    blocking(move || c.node(1).psql("create table after_failover (x int)").unwrap()).await;
    assert_eq!(failover::primary_timeline(&new, &cred()).await.unwrap(), Some(2));

    // The old primary restarted on its own still believes it is primary, on the old timeline:
    // this is how start-up tells a false primary from the real one.
    let c = cluster.clone();
    blocking(move || c.node(0).start().unwrap()).await;
    assert_eq!(failover::primary_timeline(&old, &cred()).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_candidate_moves_on_and_the_other_standby_follows() {
    let cluster = start_cluster(2, false).await;
    let c = cluster.clone();
    blocking(move || {
        c.primary()
            .psql("create table t (x int); insert into t values (1)")
            .unwrap();
        c.wait_replicated().unwrap();
        c.node(0).kill9().unwrap();
    })
    .await;
    let old = node_ref(0, cluster.node(0));
    let first = node_ref(1, cluster.node(1));
    let second = node_ref(2, cluster.node(2));

    let broken = PromoteConfig {
        method: PromoteMethod::Exec,
        command: "echo cannot reach {node}; exit 7".into(),
        ..Default::default()
    };
    let working = PromoteConfig {
        method: PromoteMethod::Exec,
        command: pg_ctl_promote(),
        ..Default::default()
    };
    let mut promoted = None;
    for (target, cfg) in [(&first, &broken), (&second, &working)] {
        let p = Placeholders {
            subject: target.clone(),
            failed: old.clone(),
            new_primary: target.clone(),
            old_primary: old.clone(),
            ..Default::default()
        };
        match failover::promote(target, cfg, &p, &cred(), Duration::from_secs(30)).await {
            Ok(_) => {
                promoted = Some(target.clone());
                break;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("cannot reach node1") && msg.contains("exit status: 7"),
                    "{msg}"
                );
            }
        }
    }
    let new = promoted.expect("the second candidate was promoted");
    assert_eq!(new.name, "node2");

    failover::repoint(&first, &new, &cred()).await.unwrap();
    failover::wait_streaming(&new, "node1", &cred(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_streams(&cluster, 2, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inherited_synchronous_setting_is_cleared_so_writes_do_not_hang() {
    let cluster = start_cluster(1, true).await;
    let c = cluster.clone();
    blocking(move || c.node(0).kill9().unwrap()).await;
    let old = node_ref(0, cluster.node(0));
    let new = node_ref(1, cluster.node(1));
    let p = Placeholders {
        subject: new.clone(),
        failed: old.clone(),
        new_primary: new.clone(),
        old_primary: old,
        ..Default::default()
    };
    failover::promote(
        &new,
        &PromoteConfig::default(),
        &p,
        &cred(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();

    // The base backup carried synchronous_standby_names = '*': a commit would wait forever.
    let c = cluster.clone();
    let hung = blocking(move || {
        c.node(1)
            .psql_timeout("create table t (x int)", Duration::from_secs(2))
    })
    .await;
    assert!(
        hung.is_err(),
        "the commit should hang before the setting is cleared"
    );

    assert!(
        failover::settle_synchronous(&new, &cred(), Duration::from_millis(500))
            .await
            .unwrap()
    );
    let c = cluster.clone();
    blocking(move || {
        testkit::wait_for("synchronous_standby_names to be empty", testkit::DEADLINE, || {
            Ok(c.node(1)
                .psql("show synchronous_standby_names")?
                .is_empty()
                .then_some(()))
        })
        .unwrap();
        c.node(1)
            .psql_timeout("create table t2 (x int)", Duration::from_secs(10))
            .unwrap();
    })
    .await;
    // Nothing left to clear the second time.
    assert!(
        !failover::settle_synchronous(&new, &cred(), Duration::from_millis(100))
            .await
            .unwrap()
    );
}

/// The node table of a test: the cluster's nodes, what the primary said about its standbys before
/// it died, and a record of the switch.
struct TestTopology {
    nodes: Vec<NodeRef>,
    sync: Vec<bool>,
    switched: std::sync::Mutex<Option<(usize, usize)>>,
    fenced: std::sync::Mutex<Vec<usize>>,
}

impl failover::Topology for TestTopology {
    fn nodes(&self) -> Vec<NodeRef> {
        self.nodes.clone()
    }
    fn standby_states(&self, failed: usize) -> Vec<(usize, bool, u64, bool)> {
        (0..self.nodes.len())
            .filter(|&i| i != failed)
            .map(|i| (i, true, 0, self.sync[i]))
            .collect()
    }
    fn switch_primary(
        &self,
        new_primary: usize,
        old_primary: usize,
    ) -> futures_util::future::BoxFuture<'_, Result<(), String>> {
        *self.switched.lock().unwrap() = Some((new_primary, old_primary));
        Box::pin(async { Ok(()) })
    }
    fn fence_candidate(&self, id: usize) -> futures_util::future::BoxFuture<'_, Result<(), String>> {
        self.fenced.lock().unwrap().push(id);
        Box::pin(async { Ok(()) })
    }
}

fn topology(cluster: &PgCluster) -> TestTopology {
    let names = cluster
        .primary()
        .psql("select string_agg(application_name, ',') from pg_stat_replication where sync_state = 'sync'");
    let sync_names = names.unwrap_or_default();
    TestTopology {
        nodes: cluster
            .nodes()
            .iter()
            .enumerate()
            .map(|(i, n)| node_ref(i, n))
            .collect(),
        sync: cluster
            .nodes()
            .iter()
            .map(|n| sync_names.split(',').any(|s| s == n.name()))
            .collect(),
        switched: std::sync::Mutex::new(None),
        fenced: std::sync::Mutex::new(Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_over_falls_back_switches_once_and_re_points_the_rest() {
    let cluster = start_cluster(2, false).await;
    let c = cluster.clone();
    blocking(move || {
        c.primary()
            .psql("create table t (x int); insert into t values (1)")
            .unwrap();
        c.wait_replicated().unwrap();
    })
    .await;
    let topo = topology(&cluster);
    let c = cluster.clone();
    blocking(move || c.node(0).kill9().unwrap()).await;

    // node1 ranks first (equal WAL, lower id) but its promotion command fails.
    let mut cfg = failover::FailoverConfig::default();
    cfg.nodes.insert(
        "node1".into(),
        PromoteConfig {
            method: PromoteMethod::Exec,
            command: "exit 1".into(),
            ..Default::default()
        },
    );
    let event = failover::fail_over(&topo, 0, &cfg, &cred(), std::time::SystemTime::now()).await;
    assert_eq!(event.error, None, "{event:?}");
    assert_eq!(event.promoted.as_deref(), Some("node2"));
    assert_eq!(event.failed_attempts.len(), 1);
    assert_eq!(event.failed_attempts[0].0, "node1");
    assert_eq!(*topo.switched.lock().unwrap(), Some((2, 0)));
    assert_eq!(*topo.fenced.lock().unwrap(), [1], "fenced before node2 was tried");
    assert_eq!(event.followers.len(), 1);
    assert_eq!(event.followers[0].0, "node1");
    assert!(event.followers[0].1.is_ok(), "{event:?}");
    assert!(!event.cleared_synchronous);
    assert!(event.detected_at <= event.promoted_at.unwrap() && event.promoted_at <= event.resumed_at);

    assert_streams(&cluster, 2, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn synchronous_fail_over_loses_no_acknowledged_write() {
    let cluster = start_cluster(2, true).await;
    let c = cluster.clone();
    blocking(move || {
        c.primary()
            .psql("create table acked (id int primary key)")
            .unwrap()
    })
    .await;
    let topo = topology(&cluster);
    assert_eq!(
        topo.sync.iter().filter(|s| **s).count(),
        1,
        "one synchronous standby"
    );

    // A writer records every id the primary acknowledged, until the primary dies under it.
    let (client, conn) = tokio_postgres::connect(&cluster.node(0).conn_string(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        for id in 0..i32::MAX {
            match client.execute("insert into acked values ($1)", &[&id]).await {
                Ok(_) => acked.push(id),
                Err(_) => break,
            }
        }
        acked
    });
    let c = cluster.clone();
    blocking(move || {
        testkit::wait_for("some acknowledged writes", testkit::DEADLINE, || {
            Ok((c.node(0).psql("select count(*) from acked")?.parse::<u32>()? >= 200).then_some(()))
        })
        .unwrap();
        c.node(0).kill9().unwrap();
    })
    .await;
    let acked = writer.await.unwrap();
    assert!(acked.len() >= 200);

    let event = failover::fail_over(
        &topo,
        0,
        &failover::FailoverConfig::default(),
        &cred(),
        std::time::SystemTime::now(),
    )
    .await;
    assert_eq!(event.error, None, "{event:?}");
    let promoted = event.promoted.clone().unwrap();
    let sync_name = topo
        .nodes
        .iter()
        .zip(&topo.sync)
        .find(|(_, s)| **s)
        .unwrap()
        .0
        .name
        .clone();
    assert_eq!(
        promoted, sync_name,
        "only the synchronous standby may be promoted"
    );
    let id = topo.nodes.iter().position(|n| n.name == promoted).unwrap();
    let c = cluster.clone();
    let stored = blocking(move || {
        c.node(id)
            .psql("select string_agg(id::text, ',') from acked")
            .unwrap()
    })
    .await;
    let stored: std::collections::HashSet<i32> = stored.split(',').filter_map(|s| s.parse().ok()).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The other standby follows and becomes synchronous, so writes go on without clearing anything.
    assert!(event.followers.iter().all(|(_, r)| r.is_ok()), "{event:?}");
    let c = cluster.clone();
    blocking(move || {
        c.node(id)
            .psql_timeout("insert into acked values (-1)", Duration::from_secs(20))
            .unwrap()
    })
    .await;
}
