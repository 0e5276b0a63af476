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
use crate::failover::{self, Credentials, FailoverConfig, FailoverEvent, NodeRef, Placeholders, Topology};
use crate::fence;
use crate::rejoin::RejoinMethod;

mod fencing;
mod pending;
mod record;
mod rejoin;
use crate::operations::{OpKind, Operations};
use crate::record::{ClusterRecord, PendingKind, RecordStore, Step};
use futures_util::future::BoxFuture;
use tokio_util::task::TaskTracker;

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
    /// Which fenced nodes had the fence step run on them.
    fence_state: Mutex<fence::Attempts>,
    /// With several instances (etcd): this one's coordinator; only the leader acts.
    coord: std::sync::OnceLock<Arc<crate::coordination::Coordinator>>,
    /// Cancelled (and replaced) when a failover starts: rejoins under way or queued give way.
    rejoins: Mutex<tokio_util::sync::CancellationToken>,
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
                tls: n.config.tls,
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

    fn fence_candidate(&self, id: usize) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let name = self.name_of(id);
            self.commit(|r, term| {
                r.fenced.entry(name).or_insert(term);
            })
            .await
            .map_err(|e| e.to_string())?;
            self.cluster.fence(id);
            Ok(())
        })
    }

    fn promoting(&self, id: usize, failed: usize) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.begin_promotion(PendingKind::Failover, failed, id)
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
        "fenced": time_json(e.fenced_at),
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
            fence_state: Mutex::new(fence::Attempts::default()),
            coord: std::sync::OnceLock::new(),
            rejoins: Mutex::new(tokio_util::sync::CancellationToken::new()),
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
        self.check_leader()?;
        let (_, name) = match kind {
            OpKind::Switchover => self.check_switchover(id)?,
            OpKind::Attach | OpKind::Rejoin => self.check_attach(id)?,
        };
        let op = self.operations.accept(kind, &name);
        tracing::info!(operation = op, kind = kind.as_str(), node = %name, "operation accepted");
        let me = self.clone();
        let give_way = self.rejoin_token();
        self.op_tasks.spawn(async move {
            let outcome = match kind {
                OpKind::Switchover => me.switchover_steps(id, Some(op)).await.map(|v| v.to_string()),
                OpKind::Attach | OpKind::Rejoin => tokio::select! {
                    r = me.attach_steps(id, Some(op)) => r,
                    _ = me.closing.cancelled() => Err(OpError::Failed("dbproxy shut down".into())),
                    _ = give_way.cancelled() => Err(OpError::Failed(
                        "stopped: the primary was lost and a failover comes first".into())),
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

    /// How failover steps log into nodes: as the health checks do, with their settings in
    /// force (a reload changes them).
    fn cred(&self) -> Credentials {
        let h = self.cluster.health();
        Credentials {
            user: h.user,
            password: h.password,
            database: h.database,
            connect_timeout: secs(h.timeout),
            tls: self.cluster.backend_tls.clone(),
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
            tls: n.tls,
        })
    }

    /// Watches for the elected primary going down and fails over; elects the node that may be
    /// primary while none is; also re-attaches fenced nodes when `rejoin.automatic` is set. Fails
    /// over from `lost` (the recorded primary, lost at start-up) first. Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown, lost: Option<usize>) {
        let mut retry_after: Option<Instant> = None;
        let mut rejoining: Vec<Option<(u64, Instant)>> = Vec::new();
        if let Some(p) = lost.filter(|_| self.config.enabled && self.may_act()) {
            if self.failover(p).await.error.is_some() {
                retry_after = Some(Instant::now() + Duration::from_secs(5));
            }
        }
        loop {
            let period = secs(self.cluster.health().period);
            // A reload may have added nodes.
            rejoining.resize(self.cluster.nodes.len(), None);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.cluster.primary_down.notified() => {}
                _ = tokio::time::sleep(period) => {}
            }
            if !self.may_act() {
                // A follower only follows the record (see `follow_record`).
                continue;
            }
            // A promotion a previous leader left half-done comes first: until it is resolved,
            // nothing else may be decided from the record.
            if let Err(e) = self.resolve_pending().await {
                tracing::error!(error = %e, "cannot resolve the promotion under way; retrying");
                continue;
            }
            if self.config.enabled && retry_after.is_none_or(|t| Instant::now() >= t) {
                if let Some(p) = self.lost_primary() {
                    if !self.quorum_sees_down(p).await {
                        continue;
                    }
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
            self.fence_returned();
            if self.config.rejoin.automatic {
                self.auto_rejoin(&mut rejoining);
            }
        }
    }

    /// Replaces the lost primary `failed` (see [`failover::fail_over`]).
    pub async fn failover(&self, failed: usize) -> FailoverEvent {
        self.cancel_rejoins();
        let _op = self.op.lock().await;
        let name = self.cluster.nodes[failed].config.name.clone();
        let detected_at = self.cluster.status(failed).last_change;
        tracing::warn!(node = %name, "primary is down: failing over");
        self.cluster.busy.store(true, Ordering::Release);
        // Sessions still holding a connection to the lost primary are cut now, before routing
        // switches; the node itself is fenced right away when the step can reach it.
        let (was_fenced, was_elected) = (
            self.cluster.is_fenced(failed),
            self.cluster.elected() == Some(failed),
        );
        let fenced_at = SystemTime::now();
        self.cluster.fence(failed);
        if self.config.fence.out_of_band() || self.cluster.status(failed).reachable {
            self.fence_node(failed).await;
        }
        let cred = self.cred();
        let mut ev = failover::fail_over(self, failed, &self.config, &cred, detected_at).await;
        ev.fenced_at = Some(fenced_at);
        // Done or given up: the promotion is no longer under way (unless the record cannot be
        // written, and then whoever leads next resolves it).
        if let Err(e) = self.end_promotion().await {
            tracing::error!(error = %e, "cannot record the end of the failover");
        }
        if ev.resumed_at.is_none() && !was_fenced {
            // Routing did not switch: the lost primary stays the one to come back to.
            self.cluster.unfence(failed);
            if was_elected {
                self.cluster.elect(failed);
            }
        }
        self.unfence_followers(&ev).await;
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
        self.attach_locked(id, op).await
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
            self.begin_promotion(PendingKind::Switchover, p, id)
                .await
                .map_err(|e| format!("cannot record the promotion of {name}: {e}"))?;
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
            if cluster.is_fenced(id) {
                // Promoted but not recorded: the record keeps the promotion under way, for
                // whoever leads next (or a restart) to finish.
            } else if let Err(e) = self.end_promotion().await {
                tracing::error!(error = %e, "cannot record the end of the switchover");
            }
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
        failover::settle(&nodes, id, &followers, &self.config, &cred, &mut ev, None).await;
        if let Err(e) = self.end_promotion().await {
            tracing::error!(error = %e, "cannot record the end of the switchover");
        }
        cluster.busy.store(false, Ordering::Release);
        tracing::warn!(from = %old.name, to = %name, "switchover complete; the old primary is fenced until it rejoins");
        let mut v = event_json("switchover", &ev);
        self.record("switchover", "ok", v.clone());
        let r = &self.config.rejoin;
        if r.method == RejoinMethod::Rewind || (r.automatic && r.method != RejoinMethod::Sql) {
            // Redundancy is kept: the old primary becomes a standby of the new one.
            v["rejoin"] = self.rejoin_old_primary(p, op).await;
        }
        Ok(v)
    }
}

// ---- Several instances coordinated through etcd (see `crate::coordination`) ----

impl Manager {
    /// Makes this manager one of several instances: from now on it acts (fails over, switches
    /// over, fences, rejoins, writes the record) only while `coord` holds the leader lease.
    pub fn set_coordinator(&self, coord: Arc<crate::coordination::Coordinator>) {
        let _ = self.coord.set(coord);
    }

    /// Whether this instance may act: it is alone, or it holds the leader lease now.
    fn may_act(&self) -> bool {
        self.coord.get().is_none_or(|c| c.is_leader())
    }

    /// [`OpError::Conflict`] naming the leader when this instance may not act.
    fn check_leader(&self) -> Result<(), OpError> {
        match self.coord.get() {
            Some(c) if !c.is_leader() => Err(OpError::Conflict(format!(
                "this dbproxy ({}) does not hold the leader lease; ask the leader ({})",
                c.name(),
                c.leader().unwrap_or_else(|| "unknown".into())
            ))),
            _ => Ok(()),
        }
    }

    /// With `failover_quorum`: whether a majority of instances see node `p` down too.
    async fn quorum_sees_down(&self, p: usize) -> bool {
        match self.coord.get() {
            Some(c) => c.quorum_sees_down(&self.name_of(p)).await,
            None => true,
        }
    }

    /// A record another instance (the leader) wrote: routes by it when it is newer than the one
    /// this instance has.
    pub fn follow_record(&self, r: &ClusterRecord) {
        if r.term <= self.cluster_record().term {
            return;
        }
        tracing::info!(term = r.term, primary = ?r.primary, fenced = ?r.fenced, "the cluster record changed: routing by it");
        self.apply_record(r);
    }

    /// Takes `r` as the record and routes by it: its fences, its primary (none: writes wait).
    pub fn apply_record(&self, r: &ClusterRecord) {
        *self.record.lock().expect("record poisoned") = r.clone();
        let c = &self.cluster;
        // While a promotion is in doubt no node takes writes: neither the one being replaced
        // nor the one being promoted.
        let in_doubt = r.operation.as_ref().is_some_and(|o| o.step == Step::Promoting);
        let primary = r
            .primary
            .as_deref()
            .and_then(|n| self.index_of(n))
            .filter(|_| !in_doubt);
        for i in 0..c.nodes.len() {
            let fenced = r.fenced.contains_key(&self.name_of(i));
            if fenced && !c.is_fenced(i) {
                c.fence(i);
            } else if !fenced && c.is_fenced(i) && Some(i) != primary {
                c.unfence(i);
            }
        }
        match primary {
            Some(p) if c.elected() != Some(p) => c.elect(p),
            Some(_) => {}
            None => c.unelect(),
        }
    }
}
