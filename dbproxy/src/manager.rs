//! The failover manager: finds the real primary at start-up, replaces it when the health checks
//! mark it down, and carries out the operator's requests to re-attach a fenced node or to switch
//! over to a standby. One operation runs at a time; each is recorded in the `/status` history, the
//! log and the metrics.
//!
//! Every change of the elected primary or of a fence is first written to the durable cluster
//! record ([`crate::record`]), then made to the routing; start-up reads the record before it
//! trusts what the nodes say about themselves.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::Shutdown;
use prometheus::{IntCounterVec, Opts, Registry};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Role};
use crate::config::{secs, Config};
use crate::failover::{
    self, Credentials, FailoverConfig, FailoverEvent, NodeRef, Placeholders, PromoteMethod, Topology,
};
use crate::operations::{OpKind, Operations};
use crate::record::{ClusterRecord, RecordError, RecordStore};
use futures_util::future::BoxFuture;
use tokio_util::task::TaskTracker;

/// What a start-up probe saw of a node: whether it is a primary, and its newest timeline;
/// `None` when it did not answer.
type Seen = Option<(bool, Option<u32>)>;

/// How many events `/status` keeps.
const HISTORY: usize = 50;

/// Drives failover, re-attachment and switchover for one cluster.
pub struct Manager {
    cluster: Arc<Cluster>,
    config: FailoverConfig,
    /// One operation at a time.
    op: tokio::sync::Mutex<()>,
    history: Mutex<VecDeque<Value>>,
    events: IntCounterVec,
    /// Where the cluster record is kept.
    store: Arc<dyn RecordStore>,
    /// The record as last stored (term 0: none yet).
    record: Mutex<ClusterRecord>,
    /// Operator requests accepted, with their progress and outcome.
    pub operations: Operations,
    /// The tasks running them.
    op_tasks: TaskTracker,
    /// Cancelled when dbproxy shuts down: an attach stops; a switchover runs to its end.
    closing: Shutdown,
}

impl Topology for Manager {
    fn nodes(&self) -> Vec<NodeRef> {
        self.cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(id, n)| NodeRef {
                id,
                name: n.config.name.clone(),
                host: n.config.host.clone(),
                port: n.config.port,
                data_dir: n.config.data_dir.clone(),
            })
            .collect()
    }

    fn standby_states(&self, failed: usize) -> Vec<(usize, bool, u64, bool)> {
        let c = &self.cluster;
        (0..c.nodes.len())
            .filter(|&i| i != failed && !c.is_fenced(i))
            .filter_map(|i| {
                let s = c.status(i);
                (s.role == Role::Standby).then(|| {
                    let sync = matches!(s.sync_state.as_str(), "sync" | "quorum");
                    (i, s.healthy, s.lsn.unwrap_or(0), sync)
                })
            })
            .collect()
    }

    fn switch_primary(&self, new_primary: usize, old_primary: usize) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.switch(new_primary, old_primary)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Milliseconds since the epoch, for JSON.
fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn time_json(t: Option<SystemTime>) -> Value {
    match t {
        Some(t) => json!({
            "at": common::time::Civil::from(t).iso_seconds(),
            "ms": epoch_ms(t),
        }),
        None => Value::Null,
    }
}

/// An event as `/status` shows it.
pub fn event_json(kind: &str, e: &FailoverEvent) -> Value {
    let ms = |a: Option<SystemTime>, b: Option<SystemTime>| match (a, b) {
        (Some(a), Some(b)) => b.duration_since(a).ok().map(|d| d.as_millis() as u64),
        _ => None,
    };
    json!({
        "kind": kind,
        "failed": e.failed,
        "promoted": e.promoted,
        "detected": time_json(Some(e.detected_at)),
        "promoted_at": time_json(e.promoted_at),
        "resumed": time_json(e.resumed_at),
        "detection_to_promotion_ms": ms(Some(e.detected_at), e.promoted_at),
        "detection_to_resumption_ms": ms(Some(e.detected_at), e.resumed_at),
        "failed_attempts": e.failed_attempts.iter()
            .map(|(n, why)| json!({"node": n, "error": why})).collect::<Vec<_>>(),
        "followers": e.followers.iter()
            .map(|(n, r)| json!({"node": n, "ok": r.is_ok(), "error": r.as_ref().err()}))
            .collect::<Vec<_>>(),
        "cleared_synchronous_standby_names": e.cleared_synchronous,
        "error": e.error,
    })
}

/// Why an operator request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request does not make sense in the current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// It was tried and failed (HTTP 500).
    #[error("{0}")]
    Failed(String),
}

impl Manager {
    /// A manager for `cluster` with `config`'s failover and health settings, keeping the cluster
    /// record in `store`, which held `record` at start-up.
    pub fn new(
        cluster: Arc<Cluster>,
        config: &Config,
        registry: &Registry,
        store: Arc<dyn RecordStore>,
        record: Option<ClusterRecord>,
    ) -> Manager {
        let events = IntCounterVec::new(
            Opts::new(
                "dbproxy_failovers_total",
                "Failovers, switchovers and re-attachments, by kind and outcome",
            ),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        if let Err(e) = registry.register(Box::new(events.clone())) {
            tracing::warn!(error = %e, "cannot register metric");
        }
        Manager {
            cluster,
            config: config.failover.clone(),
            op: tokio::sync::Mutex::new(()),
            history: Mutex::new(VecDeque::new()),
            events,
            store,
            record: Mutex::new(record.unwrap_or_default()),
            operations: Operations::default(),
            op_tasks: TaskTracker::new(),
            closing: Shutdown::new(),
        }
    }

    /// Accepts a switchover to, or an attach of, node `id` as an operation this manager owns and
    /// returns its id at once; [`OpError::Conflict`] when it cannot start now. The operation runs in
    /// its own task: nobody waiting for it, or going away, cancels it. A switchover runs to its end
    /// even at shutdown (it ends with a primary elected, the new one or the old); an attach stops
    /// then (the node stays fenced).
    pub fn start(self: &Arc<Self>, kind: OpKind, id: usize) -> Result<u64, OpError> {
        if self.closing.is_cancelled() {
            return Err(OpError::Conflict("dbproxy is shutting down".into()));
        }
        let (_, name) = match kind {
            OpKind::Switchover => self.check_switchover(id)?,
            OpKind::Attach => self.check_attach(id)?,
        };
        let op = self.operations.accept(kind, &name);
        tracing::info!(operation = op, kind = kind.as_str(), node = %name, "operation accepted");
        let me = self.clone();
        self.op_tasks.spawn(async move {
            let outcome = match kind {
                OpKind::Switchover => me.switchover_steps(id, Some(op)).await.map(|v| v.to_string()),
                OpKind::Attach => tokio::select! {
                    r = me.attach_steps(id, Some(op)) => r,
                    _ = me.closing.cancelled() => Err(OpError::Failed("dbproxy shut down".into())),
                },
            };
            if let Err(e) = &outcome {
                tracing::warn!(operation = op, error = %e, "operation failed");
            }
            me.operations.finish(op, outcome.map_err(|e| e.to_string()));
        });
        Ok(op)
    }

    /// [`Manager::start`], then waits for the outcome; dropping the wait cancels nothing.
    pub async fn run_op(self: &Arc<Self>, kind: OpKind, id: usize) -> Result<String, OpError> {
        let op = self.start(kind, id)?;
        match self.operations.outcome(op).await {
            Some(r) => r.map_err(OpError::Failed),
            None => Err(OpError::Failed(format!("operation {op} is no longer kept"))),
        }
    }

    /// At shutdown: stops accepting operations, stops attaches, and waits until every running
    /// switchover has ended.
    pub async fn close(&self) {
        self.closing.cancel();
        self.op_tasks.close();
        self.op_tasks.wait().await;
    }

    /// Operation `op` (if any) is at `step`.
    fn step(&self, op: Option<u64>, step: &str) {
        if let Some(op) = op {
            self.operations.step(op, step);
        }
    }

    /// The cluster record as last stored.
    pub fn cluster_record(&self) -> ClusterRecord {
        self.record.lock().expect("record poisoned").clone()
    }

    /// The record and where it is kept, for `/status`.
    pub fn record_json(&self) -> Value {
        let r = self.cluster_record();
        json!({
            "location": self.store.location(),
            "term": r.term,
            "primary": r.primary,
            "timeline": r.timeline,
            "fenced": r.fenced,
        })
    }

    /// Changes the record with `f` (given the new term) and stores it durably, unless `f` changed
    /// nothing. Callers change routing only after this succeeded.
    async fn commit(&self, f: impl FnOnce(&mut ClusterRecord, u64)) -> Result<(), RecordError> {
        let current = self.cluster_record();
        let mut next = current.clone();
        let term = current.term + 1;
        f(&mut next, term);
        if next == current {
            return Ok(());
        }
        next.term = term;
        self.store.store(current.term, &next).await?;
        tracing::info!(
            term, primary = ?next.primary, timeline = ?next.timeline, fenced = ?next.fenced,
            "cluster record written"
        );
        *self.record.lock().expect("record poisoned") = next;
        Ok(())
    }

    /// The index of the node named `name`.
    fn index_of(&self, name: &str) -> Option<usize> {
        self.cluster.nodes.iter().position(|n| n.config.name == name)
    }

    fn name_of(&self, i: usize) -> String {
        self.cluster.nodes[i].config.name.clone()
    }

    /// The primary the record names, as a node index.
    fn recorded_primary(&self) -> Option<usize> {
        self.cluster_record()
            .primary
            .as_deref()
            .and_then(|n| self.index_of(n))
    }

    /// The primary to fail over from: the elected one once it is down; while nothing is elected
    /// and no operation runs, the recorded one while it is not a usable primary (lost at
    /// start-up, or a failover from it failed and is retried).
    fn lost_primary(&self) -> Option<usize> {
        let c = &self.cluster;
        if let Some(p) = c.elected() {
            return (!c.status(p).healthy).then_some(p);
        }
        if c.busy.load(Ordering::Acquire) {
            return None;
        }
        self.recorded_primary().filter(|&p| {
            let s = c.status(p);
            !s.healthy || s.role != Role::Primary || c.is_fenced(p)
        })
    }

    /// Records `new` as the primary with `old` fenced, then switches routing to it in one step.
    async fn switch(&self, new: usize, old: usize) -> Result<(), RecordError> {
        let timeline = failover::primary_timeline(&self.node_ref(new), &self.cred())
            .await
            .ok()
            .flatten();
        let (new_name, old_name) = (self.name_of(new), self.name_of(old));
        self.commit(|r, term| {
            r.primary = Some(new_name.clone());
            r.timeline = timeline;
            r.fenced.remove(&new_name);
            r.fenced.insert(old_name, term);
        })
        .await?;
        self.cluster.switch_primary(new, old);
        Ok(())
    }

    /// Records node `i` as the primary (on `timeline`, if known) with `fence` fenced, then fences
    /// and elects in the routing.
    async fn elect_recorded(
        &self,
        i: usize,
        timeline: Option<u32>,
        fence: &[usize],
    ) -> Result<(), RecordError> {
        let name = self.name_of(i);
        let fenced: Vec<String> = fence.iter().map(|&f| self.name_of(f)).collect();
        self.commit(|r, term| {
            r.primary = Some(name.clone());
            if timeline.is_some() {
                r.timeline = timeline;
            }
            r.fenced.remove(&name);
            for f in fenced {
                r.fenced.entry(f).or_insert(term);
            }
        })
        .await?;
        for &f in fence {
            self.cluster.fence(f);
        }
        self.cluster.elect(i);
        Ok(())
    }

    /// Adds nodes the routing fenced on its own (a false primary the health checks found) to the
    /// record, so a restart keeps them fenced.
    async fn persist_fences(&self) -> Result<(), RecordError> {
        let record = self.cluster_record();
        let missing: Vec<String> = (0..self.cluster.nodes.len())
            .filter(|&i| self.cluster.is_fenced(i))
            .map(|i| self.name_of(i))
            .filter(|n| !record.fenced.contains_key(n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.commit(|r, term| {
            for n in missing {
                r.fenced.insert(n, term);
            }
        })
        .await
    }

    /// While nothing is elected and no operation runs: elects the node that reports primary and
    /// may be elected: the recorded primary once it answers again, or, with no primary recorded
    /// (first start, none found), the first unfenced healthy node that reports primary.
    async fn adopt(&self) -> Result<(), RecordError> {
        let _op = self.op.lock().await;
        let c = &self.cluster;
        if c.elected().is_some() || c.busy.load(Ordering::Acquire) {
            return Ok(());
        }
        let usable = |i: usize| {
            let s = c.status(i);
            !c.is_fenced(i) && s.healthy && s.reachable && s.role == Role::Primary
        };
        let pick = match (self.cluster_record().primary.is_some(), self.recorded_primary()) {
            (true, p) => {
                // Only the recorded primary may come back as the primary; a node that claims the
                // role meanwhile was never elected.
                for i in (0..c.nodes.len()).filter(|&i| Some(i) != p && usable(i)) {
                    tracing::error!(node = %self.name_of(i), "node claims to be primary without being elected: fenced");
                    c.fence(i);
                }
                self.persist_fences().await?;
                p.filter(|&p| usable(p))
            }
            (false, _) => (0..c.nodes.len()).find(|&i| usable(i)),
        };
        let Some(i) = pick else { return Ok(()) };
        let timeline = failover::primary_timeline(&self.node_ref(i), &self.cred())
            .await
            .ok()
            .flatten();
        let recorded = self.cluster_record().timeline.unwrap_or(0);
        if timeline.is_some_and(|t| t < recorded) {
            tracing::error!(node = %self.name_of(i), ?timeline, recorded, "a primary on an older timeline than the record's is not elected: fenced");
            c.fence(i);
            return self.persist_fences().await;
        }
        tracing::info!(node = %self.name_of(i), "elected primary");
        self.elect_recorded(i, timeline, &[]).await
    }

    /// How failover steps log into nodes: as the health checks do, with their settings in
    /// force (a reload changes them).
    fn cred(&self) -> Credentials {
        let h = self.cluster.health();
        Credentials {
            user: h.user,
            password: h.password,
            database: h.database,
            connect_timeout: secs(h.timeout),
        }
    }

    /// The history, newest last.
    pub fn history(&self) -> Vec<Value> {
        self.history
            .lock()
            .expect("history poisoned")
            .iter()
            .cloned()
            .collect()
    }

    fn record(&self, kind: &str, outcome: &str, v: Value) {
        self.events.with_label_values(&[kind, outcome]).inc();
        let mut h = self.history.lock().expect("history poisoned");
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(v);
    }

    fn node_ref(&self, i: usize) -> NodeRef {
        let n = &self.cluster.nodes[i].config;
        self.config.with_data_dir(NodeRef {
            id: i,
            name: n.name.clone(),
            host: n.host.clone(),
            port: n.port,
            data_dir: n.data_dir.clone(),
        })
    }

    /// Decides who is primary at start-up, before the first client is served. The record's
    /// fences hold whatever the nodes say. With a recorded primary: it is elected if it answers as
    /// a primary on at least the recorded timeline; otherwise it is lost and its index is returned,
    /// for [`Manager::run`] to fail over from at once (no node of an older timeline is elected).
    /// With no record (first start): among the nodes not in recovery, the one on the newest
    /// timeline wins (ties go to config order) and every other node claiming to be primary is
    /// fenced; a standby that has seen a newer timeline than every primary means the real primary
    /// is missing, and nothing is elected until a node reports primary. The outcome is recorded
    /// before it is routed by; an error here means the record cannot be written.
    pub async fn discover(&self) -> Result<Option<usize>, RecordError> {
        let record = self.cluster_record();
        for name in record.fenced.keys() {
            match self.index_of(name) {
                Some(i) => self.cluster.fence(i),
                None => {
                    tracing::warn!(node = %name, "the cluster record fences a node that is not configured")
                }
            }
        }
        let probes = (0..self.cluster.nodes.len()).map(|i| {
            let node = self.node_ref(i);
            let cred = self.cred();
            async move {
                let limit = cred.connect_timeout * 2;
                let r = tokio::time::timeout(limit, failover::node_timeline(&node, &cred)).await;
                (i, r.ok().and_then(Result::ok))
            }
        });
        let found = futures_util::future::join_all(probes).await;
        let mut primaries: Vec<(usize, u32)> = Vec::new();
        let mut newest_standby = 0;
        for (i, r) in &found {
            match r {
                Some((true, tl)) => primaries.push((*i, tl.unwrap_or(0))),
                Some((false, tl)) => newest_standby = newest_standby.max(tl.unwrap_or(0)),
                None => tracing::warn!(node = %self.name_of(*i), "unreachable at start-up"),
            }
        }
        if record.primary.is_some() {
            return self.discover_recorded(&record, &found, &primaries).await;
        }
        let best = primaries
            .iter()
            .copied()
            .filter(|&(i, _)| !self.cluster.is_fenced(i))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((p, tl)) = best else {
            tracing::warn!("no node reports itself primary at start-up; writes wait until one does");
            return Ok(None);
        };
        if newest_standby > tl {
            tracing::error!(
                node = %self.name_of(p), timeline = tl, standby_timeline = newest_standby,
                "the only primary found is on an older timeline than a standby: it is a stale primary; fenced"
            );
            self.cluster.fence(p);
            self.persist_fences().await?;
            return Ok(None);
        }
        let others: Vec<usize> = primaries.iter().map(|x| x.0).filter(|&i| i != p).collect();
        for &i in &others {
            tracing::error!(
                node = %self.name_of(i), primary = %self.name_of(p),
                "a second node claims to be primary: fenced"
            );
        }
        tracing::info!(node = %self.name_of(p), timeline = tl, "primary found");
        self.elect_recorded(p, Some(tl), &others).await?;
        Ok(None)
    }

    /// [`Manager::discover`] when the record names a primary.
    async fn discover_recorded(
        &self,
        record: &ClusterRecord,
        found: &[(usize, Seen)],
        primaries: &[(usize, u32)],
    ) -> Result<Option<usize>, RecordError> {
        let name = record.primary.clone().unwrap_or_default();
        let Some(p) = self.index_of(&name) else {
            tracing::error!(node = %name, "the cluster record's primary is not configured; nothing is elected");
            return Ok(None);
        };
        let recorded_tl = record.timeline.unwrap_or(0);
        let others: Vec<usize> = primaries.iter().map(|x| x.0).filter(|&i| i != p).collect();
        for &i in &others {
            if !self.cluster.is_fenced(i) {
                tracing::error!(node = %self.name_of(i), primary = %name, "a node the record does not elect claims to be primary: fenced");
            }
        }
        match found[p].1 {
            Some((true, tl)) if tl.unwrap_or(u32::MAX) >= recorded_tl => {
                tracing::info!(node = %name, timeline = ?tl, term = record.term, "the recorded primary answers as primary");
                self.elect_recorded(p, tl, &others).await?;
                return Ok(None);
            }
            Some((true, tl)) => tracing::error!(
                node = %name, timeline = ?tl, recorded_timeline = recorded_tl,
                "the recorded primary is on an older timeline than recorded: failing over"
            ),
            Some((false, _)) => {
                tracing::error!(node = %name, "the recorded primary is in recovery now: failing over")
            }
            None => {
                tracing::error!(node = %name, "the recorded primary is unreachable: failing over among the standbys");
                // Down from the start, so the health checks begin from there.
                self.cluster.update(p, |s| {
                    s.healthy = false;
                    s.reachable = false;
                });
            }
        }
        for &i in &others {
            self.cluster.fence(i);
        }
        self.persist_fences().await?;
        Ok(Some(p))
    }

    /// Watches for the elected primary going down and fails over; elects the node that may be
    /// primary while none is; also re-attaches fenced nodes when `rejoin.automatic` is set. Fails
    /// over from `lost` (the recorded primary, lost at start-up) first. Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown, lost: Option<usize>) {
        let mut retry_after: Option<Instant> = None;
        let mut rejoin_tried: Vec<Option<Instant>> = Vec::new();
        if let Some(p) = lost.filter(|_| self.config.enabled) {
            if self.failover(p).await.error.is_some() {
                retry_after = Some(Instant::now() + Duration::from_secs(5));
            }
        }
        loop {
            let period = secs(self.cluster.health().period);
            // A reload may have added nodes.
            rejoin_tried.resize(self.cluster.nodes.len(), None);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.cluster.primary_down.notified() => {}
                _ = tokio::time::sleep(period) => {}
            }
            if self.config.enabled && retry_after.is_none_or(|t| Instant::now() >= t) {
                if let Some(p) = self.lost_primary() {
                    let ev = self.failover(p).await;
                    // A failover that found no candidate is retried, not in a tight loop.
                    retry_after = ev
                        .error
                        .is_some()
                        .then(|| Instant::now() + period.max(Duration::from_secs(5)));
                }
            }
            if self.cluster.elected().is_none() {
                if let Err(e) = self.adopt().await {
                    tracing::error!(error = %e, "cannot record the primary; writes wait");
                }
            }
            if let Err(e) = self.persist_fences().await {
                tracing::error!(error = %e, "cannot record a fence");
            }
            if self.config.rejoin.automatic {
                for (i, tried) in rejoin_tried.iter_mut().enumerate() {
                    let due = tried.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                    if due && self.cluster.is_fenced(i) && self.cluster.status(i).reachable {
                        *tried = Some(Instant::now());
                        match self.attach(i).await {
                            Ok(msg) => tracing::info!(node = %self.cluster.nodes[i].config.name, "{msg}"),
                            Err(e) => tracing::warn!(node = %self.cluster.nodes[i].config.name, error = %e,
                                                     "automatic rejoin failed; retrying in 60 s"),
                        }
                    }
                }
            }
        }
    }

    /// Replaces the lost primary `failed` (see [`failover::fail_over`]).
    pub async fn failover(&self, failed: usize) -> FailoverEvent {
        let _op = self.op.lock().await;
        let name = self.cluster.nodes[failed].config.name.clone();
        let detected_at = self.cluster.status(failed).last_change;
        tracing::warn!(node = %name, "primary is down: failing over");
        self.cluster.busy.store(true, Ordering::Release);
        let cred = self.cred();
        let ev = failover::fail_over(self, failed, &self.config, &cred, detected_at).await;
        self.cluster.busy.store(false, Ordering::Release);
        let outcome = if ev.error.is_some() { "failed" } else { "ok" };
        match &ev.promoted {
            Some(new) => tracing::warn!(
                failed = %name, promoted = %new,
                detection_to_resumption_ms = ev.resumed_at.and_then(|r| r.duration_since(ev.detected_at).ok()).map(|d| d.as_millis() as u64),
                "failover complete"
            ),
            None => tracing::error!(failed = %name, error = ?ev.error, "failover failed"),
        }
        self.record("failover", outcome, event_json("failover", &ev));
        ev
    }

    /// Whether node `id` may be re-attached now: (the elected primary, its name).
    fn check_attach(&self, id: usize) -> Result<(usize, String), OpError> {
        let n = self
            .cluster
            .nodes
            .get(id)
            .ok_or_else(|| OpError::Conflict(format!("no node {id}")))?;
        let name = n.config.name.clone();
        let Some(p) = self.cluster.elected() else {
            return Err(OpError::Conflict("there is no primary to rejoin".into()));
        };
        if p == id {
            return Err(OpError::Conflict(format!("{name} is the primary")));
        }
        Ok((p, name))
    }

    /// Brings fenced node `id` back as a standby: runs the rejoin command (if configured), waits
    /// until the node streams from the elected primary, then routes reads to it again.
    pub async fn attach(&self, id: usize) -> Result<String, OpError> {
        self.attach_steps(id, None).await
    }

    /// [`Manager::attach`], reporting its steps to operation `op`.
    async fn attach_steps(&self, id: usize, op: Option<u64>) -> Result<String, OpError> {
        let _op = self.op.lock().await;
        let (p, name) = self.check_attach(id)?;
        let started = SystemTime::now();
        let node = self.node_ref(id);
        let primary = self.node_ref(p);
        let timeout = secs(self.config.rejoin.timeout);
        let deadline = Instant::now() + timeout;
        let r = &self.config.rejoin;
        let mut output = String::new();
        if r.method != PromoteMethod::Sql {
            let placeholders = Placeholders {
                subject: node.clone(),
                failed: node.clone(),
                new_primary: primary.clone(),
                old_primary: primary.clone(),
                container: self.config.promote_for(&name).container_of(&name),
            };
            let rendered = failover::render(&r.command, &placeholders);
            let line = if r.method == PromoteMethod::Ssh {
                failover::ssh_line(&r.ssh_target, &r.ssh_key, &node.host, &rendered, timeout)
            } else {
                rendered
            };
            self.step(op, &format!("running the rejoin command for {name}"));
            match failover::run_command(&name, &line, timeout).await {
                Ok(out) => output = out,
                Err(e) => {
                    self.record_attach(&name, started, Some(e.to_string()));
                    return Err(OpError::Failed(e.to_string()));
                }
            }
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        self.step(op, &format!("waiting for {name} to stream from {}", primary.name));
        if let Err(e) = failover::wait_following(&node, &primary, &self.cred(), left).await {
            self.record_attach(&name, started, Some(e.to_string()));
            return Err(OpError::Failed(e.to_string()));
        }
        self.cluster.update(id, |s| s.role = Role::Standby);
        if let Err(e) = self
            .commit(|r, _| {
                r.fenced.remove(&name);
            })
            .await
        {
            self.record_attach(&name, started, Some(e.to_string()));
            return Err(OpError::Failed(e.to_string()));
        }
        self.cluster.unfence(id);
        self.record_attach(&name, started, None);
        tracing::info!(node = %name, primary = %primary.name, "re-attached as a standby");
        let mut msg = format!("{name} re-attached as a standby of {}", primary.name);
        if !output.is_empty() {
            msg.push('\n');
            msg.push_str(&output);
        }
        Ok(msg)
    }

    fn record_attach(&self, name: &str, started: SystemTime, error: Option<String>) {
        let outcome = if error.is_some() { "failed" } else { "ok" };
        self.record(
            "attach",
            outcome,
            json!({
                "kind": "attach",
                "node": name,
                "started": time_json(Some(started)),
                "finished": time_json(Some(SystemTime::now())),
                "error": error,
            }),
        );
    }

    /// A planned switchover to standby `id` without losing a write: writes are held, the old
    /// primary is made read-only and its client connections closed, the standby catches up to its
    /// last WAL position, is promoted, and writes resume there. The old primary stays fenced
    /// (read-only) until re-attached as a standby.
    pub async fn switchover(&self, id: usize) -> Result<Value, OpError> {
        self.switchover_steps(id, None).await
    }

    /// Whether a switchover to node `id` may start now: (the elected primary, `id`'s name).
    fn check_switchover(&self, id: usize) -> Result<(usize, String), OpError> {
        let cluster = &self.cluster;
        let n = cluster
            .nodes
            .get(id)
            .ok_or_else(|| OpError::Conflict(format!("no node {id}")))?;
        let name = n.config.name.clone();
        let Some(p) = cluster.elected() else {
            return Err(OpError::Conflict("there is no primary to switch from".into()));
        };
        if p == id {
            return Err(OpError::Conflict(format!("{name} is already the primary")));
        }
        let s = cluster.status(id);
        if cluster.is_fenced(id) || !s.healthy || s.role != Role::Standby {
            return Err(OpError::Conflict(format!(
                "{name} is not a healthy, attached standby"
            )));
        }
        if !cluster.status(p).healthy {
            return Err(OpError::Conflict(
                "the primary is down: automatic failover handles that".into(),
            ));
        }
        Ok((p, name))
    }

    /// [`Manager::switchover`], reporting its steps to operation `op`.
    async fn switchover_steps(&self, id: usize, op: Option<u64>) -> Result<Value, OpError> {
        let _op = self.op.lock().await;
        let cluster = &self.cluster;
        let (p, name) = self.check_switchover(id)?;
        let old = self.node_ref(p);
        let target = self.node_ref(id);
        let mut ev = FailoverEvent::new(old.name.clone(), SystemTime::now());
        tracing::warn!(from = %old.name, to = %name, "switchover: holding writes");
        cluster.busy.store(true, Ordering::Release);
        cluster.unelect();
        let timeout = secs(self.config.switchover_timeout);
        let cred = self.cred();
        let result = async {
            self.step(
                op,
                &format!(
                    "holding writes; ending {}'s sessions and making it read-only",
                    old.name
                ),
            );
            let lsn = failover::quiesce(&old, &cred).await.map_err(|e| e.to_string())?;
            self.step(
                op,
                &format!("waiting for {name} to replay the old primary's last WAL"),
            );
            failover::wait_replayed(&target, lsn, &cred, timeout)
                .await
                .map_err(|e| e.to_string())?;
            let pcfg = self.config.promote_for(&name);
            self.step(op, &format!("promoting {name}"));
            let placeholders = Placeholders {
                subject: target.clone(),
                failed: old.clone(),
                new_primary: target.clone(),
                old_primary: old.clone(),
                container: pcfg.container_of(&name),
            };
            failover::promote(
                &target,
                pcfg,
                &placeholders,
                &cred,
                secs(self.config.promote_timeout),
            )
            .await
            .map_err(|e| e.to_string())?;
            if let Err(e) = self.switch(id, p).await {
                // Promoted but not recorded: it must not take writes, and the old primary does.
                cluster.fence(id);
                return Err(format!("{name} was promoted but routing did not switch: {e}"));
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "switchover failed: writes resume on the old primary");
            let undo = failover::unquiesce(&old, &cred).await;
            cluster.elect(p);
            cluster.busy.store(false, Ordering::Release);
            ev.error = Some(match undo {
                Ok(()) => e.to_string(),
                Err(u) => format!("{e}; and making the old primary writable again failed: {u}"),
            });
            self.record("switchover", "failed", event_json("switchover", &ev));
            return Err(OpError::Failed(ev.error.unwrap_or_default()));
        }
        ev.promoted = Some(name.clone());
        ev.promoted_at = Some(SystemTime::now());
        ev.resumed_at = ev.promoted_at;
        self.step(op, "re-pointing the other standbys");
        let nodes = self.nodes();
        let followers: Vec<usize> = self
            .standby_states(p)
            .into_iter()
            .map(|s| s.0)
            .filter(|&i| i != id)
            .collect();
        failover::settle(&nodes, id, &followers, &self.config, &cred, &mut ev).await;
        cluster.busy.store(false, Ordering::Release);
        tracing::warn!(from = %old.name, to = %name, "switchover complete; the old primary is fenced until re-attached");
        let v = event_json("switchover", &ev);
        self.record("switchover", "ok", v.clone());
        Ok(v)
    }
}
