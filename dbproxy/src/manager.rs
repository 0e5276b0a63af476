//! The failover manager: finds the real primary at start-up, replaces it when the health checks
//! mark it down, and carries out the operator's requests to re-attach a fenced node or to switch
//! over to a standby. One operation runs at a time; each is recorded in the `/status` history, the
//! log and the metrics.

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
}

impl Topology for Cluster {
    fn nodes(&self) -> Vec<NodeRef> {
        self.nodes
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
        (0..self.nodes.len())
            .filter(|&i| i != failed && !self.is_fenced(i))
            .filter_map(|i| {
                let s = self.status(i);
                (s.role == Role::Standby).then(|| {
                    let sync = matches!(s.sync_state.as_str(), "sync" | "quorum");
                    (i, s.healthy, s.lsn.unwrap_or(0), sync)
                })
            })
            .collect()
    }

    fn switch_primary(&self, new_primary: usize, old_primary: usize) {
        Cluster::switch_primary(self, new_primary, old_primary);
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
    /// A manager for `cluster` with `config`'s failover and health settings.
    pub fn new(cluster: Arc<Cluster>, config: &Config, registry: &Registry) -> Manager {
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

    /// Finds the primary from the nodes themselves: among the nodes not in recovery, the one on
    /// the newest timeline wins (ties go to config order); every other node claiming to be primary
    /// is fenced. A standby that has seen a newer timeline than every primary means the real
    /// primary is missing: nothing is elected then, and the health checks elect the first node
    /// that reports primary later.
    pub async fn discover(&self) -> Option<usize> {
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
                None => tracing::warn!(node = %self.cluster.nodes[*i].config.name, "unreachable at start-up"),
            }
        }
        let best = primaries
            .iter()
            .copied()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((p, tl)) = best else {
            tracing::warn!("no node reports itself primary at start-up; writes wait until one does");
            return None;
        };
        if newest_standby > tl {
            tracing::error!(
                node = %self.cluster.nodes[p].config.name, timeline = tl, standby_timeline = newest_standby,
                "the only primary found is on an older timeline than a standby: it is a stale primary; fenced"
            );
            self.cluster.fence(p);
            return None;
        }
        for &(i, t) in &primaries {
            if i != p {
                tracing::error!(
                    node = %self.cluster.nodes[i].config.name, timeline = t, primary = %self.cluster.nodes[p].config.name,
                    "a second node claims to be primary: fenced"
                );
                self.cluster.fence(i);
            }
        }
        tracing::info!(node = %self.cluster.nodes[p].config.name, timeline = tl, "primary found");
        self.cluster.elect(p);
        Some(p)
    }

    /// Watches for the elected primary going down and fails over; also re-attaches fenced nodes
    /// when `rejoin.automatic` is set. Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut retry_after: Option<Instant> = None;
        let mut rejoin_tried: Vec<Option<Instant>> = Vec::new();
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
                if let Some(p) = self.cluster.elected() {
                    if !self.cluster.status(p).healthy {
                        let ev = self.failover(p).await;
                        // A failover that found no candidate is retried, not in a tight loop.
                        retry_after = ev
                            .error
                            .is_some()
                            .then(|| Instant::now() + period.max(Duration::from_secs(5)));
                    }
                }
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
        let ev = failover::fail_over(&*self.cluster, failed, &self.config, &cred, detected_at).await;
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

    /// Brings fenced node `id` back as a standby: runs the rejoin command (if configured), waits
    /// until the node streams from the elected primary, then routes reads to it again.
    pub async fn attach(&self, id: usize) -> Result<String, OpError> {
        let _op = self.op.lock().await;
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
        if let Err(e) = failover::wait_following(&node, &primary, &self.cred(), left).await {
            self.record_attach(&name, started, Some(e.to_string()));
            return Err(OpError::Failed(e.to_string()));
        }
        self.cluster.update(id, |s| s.role = Role::Standby);
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
        let _op = self.op.lock().await;
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
        let old = self.node_ref(p);
        let target = self.node_ref(id);
        let mut ev = FailoverEvent::new(old.name.clone(), SystemTime::now());
        tracing::warn!(from = %old.name, to = %name, "switchover: holding writes");
        cluster.busy.store(true, Ordering::Release);
        cluster.unelect();
        let timeout = secs(self.config.switchover_timeout);
        let cred = self.cred();
        let result = async {
            let lsn = failover::quiesce(&old, &cred).await?;
            failover::wait_replayed(&target, lsn, &cred, timeout).await?;
            let pcfg = self.config.promote_for(&name);
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
        cluster.switch_primary(id, p);
        ev.resumed_at = Some(SystemTime::now());
        let nodes = cluster.nodes();
        let followers: Vec<usize> = cluster
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
