//! Each node's WAL replay position, cached for causal reads. The health checks store what they
//! see; between checks, one refresher task per node asks the node itself
//! (`pg_last_wal_replay_lsn()`) while sessions wait for a newer position than the cache holds.
//! A session never queries a standby for its position: however many sessions wait, at most one
//! such query at a time runs per node, and none while nobody waits.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Shutdown;
use tokio::sync::{watch, Notify};

use crate::cluster::{parse_lsn, Cluster};
use crate::config::secs;

/// Pause between two polls of a node still behind the position a session waits for (replay on
/// a streaming standby typically catches up within a millisecond or two of a commit).
const POLL_PAUSE: Duration = Duration::from_millis(1);

/// Pause after a failed poll before the next one (the health checks judge the node meanwhile).
const FAILED_PAUSE: Duration = Duration::from_millis(100);

/// WAL page size (`XLOG_BLCKSZ`, PostgreSQL's default build).
const WAL_PAGE: u64 = 8192;

/// The end of the WAL content at insert position `lsn`. Right after a page header (24 bytes,
/// or 40 at a segment's start) the insert position counts the header of a page that holds no
/// record yet, while a standby's replay position stops at the end of the last record, the page
/// boundary: it would never reach the insert position until more WAL comes. No record ends
/// between the boundary and the header's end (a record is at least 24 bytes long, and a
/// record's continuation ending at offset 40 started before the boundary), so a standby that
/// replayed up to the boundary has replayed everything the insert position covers.
pub fn content_end(lsn: u64) -> u64 {
    match lsn % WAL_PAGE {
        24 | 40 => lsn - lsn % WAL_PAGE,
        _ => lsn,
    }
}

/// One node's cached replay position and the sessions waiting for a newer one.
#[derive(Debug)]
pub struct ReplayPosition {
    /// The last position learnt (0: unknown).
    known: AtomicU64,
    /// The highest position a waiting session needs.
    wanted: AtomicU64,
    /// How many sessions wait.
    waiting: AtomicUsize,
    /// Wakes the refresher.
    wake: Notify,
    /// Tells waiting sessions of each position learnt.
    seen: watch::Sender<u64>,
}

impl Default for ReplayPosition {
    fn default() -> Self {
        ReplayPosition {
            known: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
            seen: watch::Sender::new(0),
        }
    }
}

/// Counts a waiting session while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReplayPosition {
    /// The last position learnt (0: unknown).
    pub fn known(&self) -> u64 {
        self.known.load(Ordering::Acquire)
    }

    /// Whether the node is known to have replayed up to `lsn`.
    pub fn reached(&self, lsn: u64) -> bool {
        self.known() >= lsn
    }

    /// A health check learnt `lsn` (`None`: unknown). Stored as is, lower or not: every value
    /// stored was true once, and a node rebuilt or re-attached may be behind its old position.
    pub fn checked(&self, lsn: Option<u64>) {
        let lsn = lsn.unwrap_or(0);
        self.known.store(lsn, Ordering::Release);
        self.seen.send_replace(lsn);
    }

    /// The refresher learnt `lsn` from the node.
    fn observed(&self, lsn: u64) {
        let before = self.known.fetch_max(lsn, Ordering::AcqRel);
        if lsn > before {
            self.seen.send_replace(lsn);
        }
    }

    /// Waits at most `wait` for the node to have replayed `lsn`, asking the refresher for a
    /// newer position; true when it has.
    pub async fn wait_for(&self, lsn: u64, wait: Duration) -> bool {
        if self.reached(lsn) {
            return true;
        }
        if wait.is_zero() {
            return false;
        }
        let mut seen = self.seen.subscribe();
        self.wanted.fetch_max(lsn, Ordering::AcqRel);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        self.wake.notify_one();
        let reached = matches!(
            tokio::time::timeout(wait, seen.wait_for(|&v| v >= lsn)).await,
            Ok(Ok(_))
        );
        reached
    }

    /// Whether a session waits for a position the cache does not hold.
    fn wanted_now(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0 && self.wanted.load(Ordering::Acquire) > self.known()
    }
}

/// Why one poll failed.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("not a standby (no replay position)")]
    NoPosition,
}

/// Asks the node its replay position on `client` (connected first when needed, with the
/// node's `tls.backend` mode, as the health checks connect).
async fn poll(
    client: &mut Option<tokio_postgres::Client>,
    cluster: &Cluster,
    node: &crate::config::NodeConfig,
    conn_string: &str,
) -> Result<u64, PollError> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let config: tokio_postgres::Config = conn_string.parse()?;
        let tls = &cluster.backend_tls;
        let c = tls
            .connect_postgres(tls.mode_for(node), &node.host, node.port, &config)
            .await
            .map_err(|e| PollError::Connect(e.to_string()))?;
        *client = Some(c);
    }
    let c = client.as_ref().expect("connected above");
    let row = c.query_one("select pg_last_wal_replay_lsn()::text", &[]).await?;
    let lsn: Option<String> = row.get(0);
    lsn.as_deref().and_then(parse_lsn).ok_or(PollError::NoPosition)
}

/// Runs node `i`'s refresher until `shutdown`: while sessions wait for a position the cache
/// does not hold, polls the node (one query at a time, on one kept connection, with the
/// health checks' user, database and timeout).
pub async fn run(cluster: Arc<Cluster>, i: usize, shutdown: Shutdown) {
    let node = &cluster.nodes[i];
    let slot = &node.replay;
    let settings = cluster.watch_health();
    let mut client = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = slot.wake.notified() => {}
        }
        while slot.wanted_now() {
            let (conn_string, timeout) = {
                let config = settings.borrow();
                (
                    crate::health::conn_string(&node.config, &config, "dbproxy-replay"),
                    secs(config.timeout),
                )
            };
            let result =
                match tokio::time::timeout(timeout, poll(&mut client, &cluster, &node.config, &conn_string))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(PollError::Timeout),
                };
            let pause = match result {
                Ok(lsn) => {
                    slot.observed(lsn);
                    POLL_PAUSE
                }
                Err(e) => {
                    tracing::debug!(node = %node.config.name, error = %e, "replay position poll failed");
                    client = None;
                    FAILED_PAUSE
                }
            };
            if slot.wanted_now() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_header_is_not_content() {
        assert_eq!(content_end(0x3018018), 0x3018000, "a short page header");
        assert_eq!(content_end(0x4000028), 0x4000000, "a segment's long header");
        assert_eq!(content_end(0x3018000), 0x3018000);
        assert_eq!(content_end(0x3018030), 0x3018030);
        assert_eq!(content_end(0x30181A0), 0x30181A0);
    }

    #[tokio::test]
    async fn waits_end_when_the_position_is_learnt_or_the_wait_is_over() {
        let p = Arc::new(ReplayPosition::default());
        p.checked(Some(100));
        assert!(p.wait_for(100, Duration::ZERO).await);
        assert!(!p.wait_for(101, Duration::ZERO).await);
        assert!(!p.wait_for(101, Duration::from_millis(5)).await);
        assert!(!p.wanted_now(), "nobody waits any more");
        let q = p.clone();
        let waiter = tokio::spawn(async move { q.wait_for(150, Duration::from_secs(10)).await });
        while !p.wanted_now() {
            tokio::task::yield_now().await;
        }
        p.observed(120);
        assert!(p.wanted_now());
        p.observed(150);
        assert!(waiter.await.unwrap());
        // A health check may lower it (a rebuilt node); the refresher never does.
        p.checked(Some(90));
        assert_eq!(p.known(), 90);
        p.observed(80);
        assert_eq!(p.known(), 90);
    }
}
