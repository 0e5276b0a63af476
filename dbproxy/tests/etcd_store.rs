//! The cluster record in a real etcd (testkit starts it): a compare-and-swap from a stale term is
//! refused, racing writers from one term leave exactly one winner, the watch delivers every
//! change in order, a guard that is not the leader's lease refuses stores, and an unreachable or
//! frozen etcd is a clear error within the timeout, never a hang or a panic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use dbproxy::etcd_store::EtcdStore;
use dbproxy::record::{ClusterRecord, Pending, PendingKind, RecordError, RecordStore, Step, FORMAT};
use testkit::etcd::EtcdCluster;

const TIMEOUT: Duration = Duration::from_secs(2);

fn record(term: u64, primary: &str) -> ClusterRecord {
    ClusterRecord {
        format: FORMAT,
        term,
        primary: Some(primary.into()),
        timeline: Some(term as u32),
        fenced: [("node0".to_string(), term)].into(),
        operation: None,
    }
}

async fn etcd(n: usize) -> Result<EtcdCluster> {
    tokio::task::spawn_blocking(move || EtcdCluster::start(n)).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_swap_from_a_stale_term_is_refused() -> Result<()> {
    let etcd = etcd(1).await?;
    let a = EtcdStore::connect(&etcd.endpoints(), "/t1", TIMEOUT).await?;
    let b = EtcdStore::connect(&etcd.endpoints(), "/t1", TIMEOUT).await?;
    assert_eq!(a.load().await?, None);
    a.store(0, &record(1, "node1")).await?;
    let e = b.store(0, &record(1, "node2")).await.unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::Conflict {
                expected: 0,
                found: 1
            }
        ),
        "{e}"
    );
    assert_eq!(b.load().await?, Some(record(1, "node1")));
    b.store(1, &record(2, "node2")).await?;
    let e = a.store(1, &record(2, "node1")).await.unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::Conflict {
                expected: 1,
                found: 2
            }
        ),
        "{e}"
    );
    assert_eq!(a.load().await?.unwrap().primary.as_deref(), Some("node2"));

    // Ten writers racing from the same term: exactly one wins.
    let store = Arc::new(a);
    let racers: Vec<_> = (0..10)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.store(2, &record(3, &format!("racer{i}"))).await })
        })
        .collect();
    let mut won = 0;
    for r in racers {
        match r.await? {
            Ok(()) => won += 1,
            Err(RecordError::Conflict {
                expected: 2,
                found: 3,
            }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won, 1, "exactly one compare-and-swap from term 2 succeeds");
    assert_eq!(store.load().await?.unwrap().term, 3);

    // A promotion under way is kept with the step it reached.
    let mut pending = record(4, "racer0");
    pending.operation = Some(Pending {
        kind: PendingKind::Switchover,
        from: "racer0".into(),
        to: "node1".into(),
        step: Step::Switched,
    });
    store.store(3, &pending).await?;
    assert_eq!(store.load().await?, Some(pending));

    // A record that is not one is a clear error naming etcd, not a panic.
    let mut c = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    c.put("/t1/record", "{\"term\": ", None).await?;
    let e = store.load().await.unwrap_err().to_string();
    assert!(e.contains("is unreadable") && e.contains("/t1/record"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_delivers_every_newer_record_and_survives_an_etcd_restart() -> Result<()> {
    let etcd = etcd(1).await?;
    let writer = EtcdStore::connect(&etcd.endpoints(), "/t2", TIMEOUT).await?;
    writer.store(0, &record(1, "node0")).await?;
    let follower = Arc::new(EtcdStore::connect(&etcd.endpoints(), "/t2", TIMEOUT).await?);
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let shutdown = common::Shutdown::new();
    let task = tokio::spawn({
        let (f, s) = (follower.clone(), shutdown.clone());
        async move { f.follow(&tx, &s).await }
    });
    let next = |rx: &mut tokio::sync::watch::Receiver<Option<ClusterRecord>>, term: u64| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                rx.wait_for(|r| r.as_ref().is_some_and(|r| r.term >= term)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no record of term {term} within 20 s"))?
            .map_err(|_| anyhow::anyhow!("the watch ended"))
            .map(|r| r.clone().unwrap())
        }
    };
    assert_eq!(
        next(&mut rx, 1).await?,
        record(1, "node0"),
        "the current record first"
    );
    writer.store(1, &record(2, "node1")).await?;
    assert_eq!(next(&mut rx, 2).await?, record(2, "node1"));
    writer.store(2, &record(3, "node2")).await?;
    assert_eq!(next(&mut rx, 3).await?, record(3, "node2"));

    // etcd restarts; a change made meanwhile arrives once the watch is back.
    etcd.member(0).stop()?;
    etcd.member(0).start()?;
    writer.store(3, &record(4, "node0")).await?;
    assert_eq!(next(&mut rx, 4).await?, record(4, "node0"));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_that_is_not_the_leaders_lease_refuses_stores() -> Result<()> {
    let etcd = etcd(1).await?;
    let store = EtcdStore::connect(&etcd.endpoints(), "/t3", TIMEOUT).await?;
    store.set_guard("/t3/leader", None);
    let e = store.store(0, &record(1, "node0")).await.unwrap_err();
    assert!(matches!(e, RecordError::NotLeader), "{e}");
    // Someone else's lease holds the leader key.
    let mut c = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    let theirs = c.lease_grant(30, None).await?.id();
    let mine = c.lease_grant(30, None).await?.id();
    let opts = etcd_client::PutOptions::new().with_lease(theirs);
    c.put("/t3/leader", "other", Some(opts)).await?;
    store.set_guard("/t3/leader", Some(mine));
    let e = store.store(0, &record(1, "node0")).await.unwrap_err();
    assert!(matches!(e, RecordError::NotLeader), "{e}");
    assert_eq!(store.load().await?, None, "nothing was written");
    store.set_guard("/t3/leader", Some(theirs));
    store.store(0, &record(1, "node0")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_frozen_etcd_is_a_clear_error_within_the_timeout() -> Result<()> {
    // Nobody listens on this port.
    let port = testkit::free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let store = EtcdStore::connect(std::slice::from_ref(&url), "/t4", TIMEOUT).await?;
    let t = Instant::now();
    let e = store.load().await.unwrap_err();
    assert!(t.elapsed() < TIMEOUT * 2, "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(
        matches!(e, RecordError::Unavailable { .. })
            && msg.contains("cannot reach the cluster record")
            && msg.contains(&url),
        "{msg}"
    );
    let e = store.store(0, &record(1, "node0")).await.unwrap_err();
    assert!(matches!(e, RecordError::Unavailable { .. }), "{e}");

    // A frozen etcd accepts connections and never answers: the timeout ends the wait.
    let etcd = etcd(1).await?;
    let store = EtcdStore::connect(&etcd.endpoints(), "/t4", TIMEOUT).await?;
    store.store(0, &record(1, "node0")).await?;
    etcd.member(0).sigstop()?;
    let t = Instant::now();
    let e = store.store(1, &record(2, "node1")).await.unwrap_err();
    assert!(t.elapsed() < TIMEOUT * 2, "{:?}", t.elapsed());
    assert!(matches!(e, RecordError::Unavailable { .. }), "{e}");
    etcd.member(0).sigcont()?;
    let deadline = Instant::now() + testkit::DEADLINE;
    while store.load().await.is_err() {
        assert!(Instant::now() < deadline, "etcd never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store.load().await?,
        Some(record(1, "node0")),
        "the frozen write did not land"
    );
    Ok(())
}
