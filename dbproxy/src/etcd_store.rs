//! The cluster record in etcd, for several dbproxy instances sharing one cluster: kept as JSON at
//! `{prefix}/record`, changed only by a transaction that compares the key's `mod_revision` with
//! the one the stored term was read at (create-revision 0 for the first record), so two writers
//! can never both succeed from the same term. With a leader guard (see [`crate::coordination`]),
//! the same transaction also requires the leader key to still be bound to this instance's lease:
//! a leader whose lease ran out cannot write even if it does not know yet, and an instance that
//! is not the leader cannot write at all.
//!
//! [`EtcdStore::follow`] watches the key and hands every newer record to the instance, which
//! switches its routing to it. Every request carries a timeout: an unreachable etcd is an error
//! ([`RecordError::Unavailable`]), never a hang.

use std::sync::Mutex;
use std::time::Duration;

use common::Shutdown;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, Txn, TxnOp, WatchOptions};
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::record::{decode, ClusterRecord, RecordError, RecordStore, FORMAT};

/// The record in etcd.
pub struct EtcdStore {
    client: Client,
    key: String,
    endpoints: String,
    timeout: Duration,
    /// With coordination: the leader key, and the lease it must be bound to for a store to
    /// succeed (`None`: this instance is not the leader, so no store succeeds).
    guard: Mutex<Option<(String, Option<i64>)>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("key", &self.key)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// The client options every coordination request uses: `timeout` for connecting and for each
/// request. No HTTP/2 keep-alive pings: etcd answers pings more frequent than its
/// `--grpc-keepalive-min-time` (5 s) by closing the connection, and every request has a timeout.
pub fn connect_options(timeout: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
}

impl EtcdStore {
    /// A store at `{prefix}/record` on the etcd cluster at `endpoints`. Connecting is lazy: an
    /// unreachable etcd shows in the first request.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, RecordError> {
        let location = format!("{}{prefix}/record", endpoints.join(","));
        let client = Client::connect(endpoints, Some(connect_options(timeout)))
            .await
            .map_err(|e| RecordError::Unavailable {
                location: location.clone(),
                reason: e.to_string(),
            })?;
        Ok(EtcdStore {
            client,
            key: format!("{prefix}/record"),
            endpoints: endpoints.join(","),
            timeout,
            guard: Mutex::new(None),
        })
    }

    /// The etcd client, shared with the leader lease.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// From now on a store also needs the leader key `key` to be bound to `lease`, this
    /// instance's lease while it leads (`None`: no store succeeds).
    pub fn set_guard(&self, key: &str, lease: Option<i64>) {
        *self.guard.lock().expect("guard poisoned") = Some((key.to_string(), lease));
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> RecordError {
        RecordError::Unavailable {
            location: self.location(),
            reason: reason.to_string(),
        }
    }

    /// Runs one etcd request with the store's timeout.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RecordError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Err(_) => Err(self.unavailable(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// The stored record with its `mod_revision`, and the store's revision at the read.
    async fn read(&self) -> Result<(Option<(ClusterRecord, i64)>, i64), RecordError> {
        let mut c = self.client.clone();
        let resp = self.call(c.get(self.key.as_str(), None)).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        match resp.kvs().first() {
            None => Ok((None, revision)),
            Some(kv) => Ok((
                Some((
                    decode(kv.value(), std::path::Path::new(&self.location()))?,
                    kv.mod_revision(),
                )),
                revision,
            )),
        }
    }

    /// Watches the record until `shutdown`, sending every record newer (by term) than the one in
    /// `records`; after an error (etcd unreachable, the watch cancelled) it reads the record again
    /// and watches anew, so no change is missed.
    pub async fn follow(&self, records: &watch::Sender<Option<ClusterRecord>>, shutdown: &Shutdown) {
        let offer = |r: ClusterRecord| {
            records.send_if_modified(|cur| {
                let newer = cur.as_ref().is_none_or(|c| r.term > c.term);
                if newer {
                    *cur = Some(r);
                }
                newer
            });
        };
        loop {
            let watched = async {
                let (current, revision) = self.read().await?;
                if let Some((r, _)) = current {
                    offer(r);
                }
                let mut c = self.client.clone();
                let opts = WatchOptions::new().with_start_revision(revision + 1);
                let mut stream = self.call(c.watch(self.key.as_str(), Some(opts))).await?;
                loop {
                    let Some(resp) = stream.message().await.map_err(|e| self.unavailable(e))? else {
                        return Err(self.unavailable("the watch ended"));
                    };
                    if resp.canceled() {
                        return Err(
                            self.unavailable(format!("the watch was cancelled: {}", resp.cancel_reason()))
                        );
                    }
                    for ev in resp.events() {
                        if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                            match decode(kv.value(), std::path::Path::new(&self.location())) {
                                Ok(r) => offer(r),
                                Err(e) => {
                                    tracing::error!(error = %e, "ignoring an unreadable cluster record")
                                }
                            }
                        }
                    }
                }
            };
            let e: RecordError = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = watched => match r { Err(e) => e, Ok(()) => continue },
            };
            tracing::warn!(error = %e, "watching the cluster record failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

impl RecordStore for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, RecordError>> {
        Box::pin(async move { Ok(self.read().await?.0.map(|(r, _)| r)) })
    }

    fn store<'a>(&'a self, expected: u64, next: &'a ClusterRecord) -> BoxFuture<'a, Result<(), RecordError>> {
        Box::pin(async move {
            let (current, _) = self.read().await?;
            let found = current.as_ref().map_or(0, |(r, _)| r.term);
            if found != expected {
                return Err(RecordError::Conflict { expected, found });
            }
            let mut next = next.clone();
            next.format = FORMAT;
            let body = serde_json::to_vec(&next).expect("a record serialises");
            let key = self.key.as_str();
            let mut when = vec![match &current {
                Some((_, rev)) => Compare::mod_revision(key, CompareOp::Equal, *rev),
                None => Compare::create_revision(key, CompareOp::Equal, 0),
            }];
            let guard = self.guard.lock().expect("guard poisoned").clone();
            match guard {
                None => {}
                Some((_, None)) => return Err(RecordError::NotLeader),
                Some((k, Some(lease))) => when.push(Compare::lease(k, CompareOp::Equal, lease)),
            }
            let txn = Txn::new().when(when).and_then([TxnOp::put(key, body, None)]);
            let mut c = self.client.clone();
            if self.call(c.txn(txn)).await?.succeeded() {
                return Ok(());
            }
            // Either the record moved on, or the leader key is no longer ours.
            let found = self.read().await?.0.map_or(0, |(r, _)| r.term);
            if found != expected {
                return Err(RecordError::Conflict { expected, found });
            }
            Err(RecordError::NotLeader)
        })
    }

    fn location(&self) -> String {
        format!("etcd {} key {}", self.endpoints, self.key)
    }
}
