//! The failover manager's rejoins: bringing a fenced node back as a standby of the elected
//! primary (by the built-in rewind, a command, or only a check), the automatic rejoin of fenced
//! nodes, and the old primary's rejoin at the end of a switchover. A node the record fenced is
//! unfenced only once it is verified streaming from the primary.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{Manager, OpError};
use crate::cluster::Role;
use crate::config::secs;
use crate::failover::{self, Placeholders};
use crate::operations::{OpKind, OpState};
use crate::rejoin::{self, RejoinMethod};

impl Manager {
    /// The token rejoins started now give way on.
    pub(super) fn rejoin_token(&self) -> CancellationToken {
        self.rejoins.lock().expect("rejoins poisoned").clone()
    }

    /// Stops every rejoin under way or queued (a failover must not wait behind one).
    pub(super) fn cancel_rejoins(&self) {
        let old = std::mem::replace(
            &mut *self.rejoins.lock().expect("rejoins poisoned"),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// Brings fenced node `id` back as a standby, the operation lock held: the rejoin step
    /// (`rewind`, a command, or none), a wait until the node streams from the elected primary,
    /// then the fence is lifted in the record and in the routing.
    pub(super) async fn attach_locked(&self, id: usize, op: Option<u64>) -> Result<String, OpError> {
        let (p, name) = self.check_attach(id)?;
        let started = SystemTime::now();
        let node = self.node_ref(id);
        let primary = self.node_ref(p);
        let timeout = secs(self.config.rejoin.timeout);
        let deadline = Instant::now() + timeout;
        let r = &self.config.rejoin;
        let failed = |e: String| {
            self.record_attach(&name, started, Some(e.clone()));
            OpError::Failed(e)
        };
        let output = match r.method {
            RejoinMethod::Sql => String::new(),
            RejoinMethod::Rewind => {
                let step = |s: &str| self.step(op, s);
                let settings = r.rewind_settings();
                rejoin::rejoin(&node, &primary, &settings, &self.cred(), timeout, &step)
                    .await
                    .map_err(|e| failed(e.to_string()))?
            }
            RejoinMethod::Exec | RejoinMethod::Ssh => {
                let placeholders = Placeholders {
                    subject: node.clone(),
                    failed: node.clone(),
                    new_primary: primary.clone(),
                    old_primary: primary.clone(),
                    container: self.config.promote_for(&name).container_of(&name),
                };
                let rendered = failover::render(&r.command, &placeholders);
                let line = if r.method == RejoinMethod::Ssh {
                    failover::ssh_line(&r.ssh_target, &r.ssh_key, &node.host, &rendered, timeout)
                } else {
                    rendered
                };
                self.step(op, &format!("running the rejoin command for {name}"));
                failover::run_command(&name, &line, timeout)
                    .await
                    .map_err(|e| failed(e.to_string()))?
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        self.step(op, &format!("waiting for {name} to stream from {}", primary.name));
        failover::wait_following(&node, &primary, &self.cred(), left)
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.cluster.update(id, |s| s.role = Role::Standby);
        // A health check now rather than at its next period: a node unfenced while still
        // counted down is no failover candidate, and a failure right then promotes a standby
        // behind it, which it then cannot follow.
        self.cluster.nodes[id].reprobe.notify_one();
        let until =
            Instant::now() + Duration::from_secs(3).min(deadline.saturating_duration_since(Instant::now()));
        while !self.cluster.status(id).healthy && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.commit(|r, _| {
            r.fenced.remove(&name);
        })
        .await
        .map_err(|e| failed(e.to_string()))?;
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

    /// At the end of a switchover (the operation lock held): the old primary `old` rejoins as a
    /// standby of the new one. What happened, for the switchover's result.
    pub(super) async fn rejoin_old_primary(&self, old: usize, op: Option<u64>) -> Value {
        let give_way = self.rejoin_token();
        let r = tokio::select! {
            r = self.attach_locked(old, op) => r,
            _ = self.closing.cancelled() => Err(OpError::Failed("dbproxy shut down".into())),
            _ = give_way.cancelled() => Err(OpError::Failed(
                "stopped: the primary was lost and a failover comes first".into())),
        };
        match r {
            Ok(m) => json!({"ok": true, "result": m}),
            Err(e) => {
                tracing::error!(node = %self.name_of(old), error = %e, "the old primary did not rejoin; it stays fenced");
                json!({"ok": false, "error": e.to_string()})
            }
        }
    }

    /// Starts a rejoin operation for every fenced node that may rejoin now: with `rewind`, any
    /// fenced node (a stopped one is restarted as a standby); with a command, one that answers.
    /// `rejoining` holds each node's last operation and when it started; a failed one is retried
    /// after `rejoin.retry_interval`.
    pub(super) fn auto_rejoin(self: &Arc<Self>, rejoining: &mut [Option<(u64, Instant)>]) {
        let c = &self.cluster;
        let Some(p) = c.elected() else { return };
        if !c.status(p).healthy || c.busy.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let retry = secs(self.config.rejoin.retry_interval);
        for (i, last) in rejoining.iter_mut().enumerate() {
            if i == p || !c.is_fenced(i) {
                continue;
            }
            if self.config.rejoin.method != RejoinMethod::Rewind && !c.status(i).reachable {
                continue;
            }
            let due = match *last {
                None => true,
                Some((op, at)) => match self.operations.state(op) {
                    Some(OpState::Queued | OpState::Running(_)) => false,
                    Some(OpState::Failed(_)) => at.elapsed() >= retry,
                    // Succeeded, yet fenced again (a later failover): rejoin again.
                    Some(OpState::Succeeded(_)) | None => true,
                },
            };
            if !due {
                continue;
            }
            match self.start(OpKind::Rejoin, i) {
                Ok(op) => *last = Some((op, Instant::now())),
                Err(e) => tracing::debug!(node = %self.name_of(i), error = %e, "no automatic rejoin now"),
            }
        }
    }
}
