//! Promotions recorded step by step ([`crate::record::Pending`]), so that whoever acts next — the
//! new leader after the old one died or lost etcd, or this instance after a restart — finishes
//! or rolls back a promotion left half-done:
//!
//! - `promoting`, and the candidate answers as a primary: it was promoted; the record is switched
//!   to it (the old primary fenced) and the other standbys re-pointed at it;
//! - `promoting`, and the candidate is still in recovery: nothing happened; the operation is
//!   dropped (a switchover's old primary is made writable again) and the usual rules go on from
//!   the record (a lost primary is failed over again);
//! - `promoting`, and the candidate does not answer: it may have been promoted, so it is fenced
//!   in the record before the operation is dropped (never two primaries);
//! - `switched`: the record already names the new primary; the other standbys are re-pointed.

use std::time::SystemTime;

use serde_json::json;

use super::{event_json, Manager};
use crate::failover::{self, FailoverEvent, Topology};
use crate::record::{Pending, PendingKind, RecordError, Step};

impl Manager {
    /// Records that `to` is about to be promoted in place of `from`, before the promotion starts.
    pub(super) async fn begin_promotion(
        &self,
        kind: PendingKind,
        from: usize,
        to: usize,
    ) -> Result<(), RecordError> {
        let (from, to) = (self.name_of(from), self.name_of(to));
        self.commit(|r, _| {
            r.operation = Some(Pending {
                kind,
                from,
                to,
                step: Step::Promoting,
            })
        })
        .await?;
        crate::fault::reached("promoting");
        Ok(())
    }

    /// Records that no promotion is under way any more (it ended, either way).
    pub(super) async fn end_promotion(&self) -> Result<(), RecordError> {
        if self.cluster_record().operation.is_none() {
            return Ok(());
        }
        self.commit(|r, _| r.operation = None).await
    }

    /// Finishes or rolls back the promotion the record says is under way (see the module
    /// documentation); nothing when none is. An error leaves it recorded, to be tried again.
    pub(super) async fn resolve_pending(&self) -> Result<(), RecordError> {
        if self.cluster_record().operation.is_none() {
            return Ok(());
        }
        // An operation of this instance may be the one under way: wait for it to end first.
        let _op = self.op.lock().await;
        let Some(op) = self.cluster_record().operation else {
            return Ok(());
        };
        let kind = match op.kind {
            PendingKind::Failover => "failover",
            PendingKind::Switchover => "switchover",
        };
        let (Some(from), Some(to)) = (self.index_of(&op.from), self.index_of(&op.to)) else {
            tracing::error!(from = %op.from, to = %op.to, "the promotion under way names a node that is not configured: dropped");
            return self.end_promotion().await;
        };
        tracing::warn!(
            kind, from = %op.from, to = %op.to, step = op.step.as_str(),
            "a promotion was left half-done: resolving it"
        );
        let cred = self.cred();
        let mut ev = FailoverEvent::new(op.from.clone(), SystemTime::now());
        if op.step == Step::Promoting {
            let probe = tokio::time::timeout(
                cred.connect_timeout * 2,
                failover::node_timeline(&self.node_ref(to), &cred),
            )
            .await
            .ok()
            .and_then(Result::ok);
            match probe {
                Some((true, _)) => {
                    tracing::warn!(node = %op.to, "it was promoted: finishing the switch to it");
                    self.switch(to, from).await?;
                    ev.promoted = Some(op.to.clone());
                    ev.promoted_at = Some(SystemTime::now());
                    ev.resumed_at = ev.promoted_at;
                }
                answer => {
                    if answer.is_none() {
                        tracing::error!(node = %op.to, "it does not answer and may have been promoted: fenced");
                        self.commit(|r, term| {
                            r.fenced.entry(op.to.clone()).or_insert(term);
                        })
                        .await?;
                        self.cluster.fence(to);
                    } else {
                        tracing::warn!(node = %op.to, "it was not promoted: rolling back");
                    }
                    if op.kind == PendingKind::Switchover {
                        if let Err(e) = failover::unquiesce(&self.node_ref(from), &cred).await {
                            tracing::error!(node = %op.from, error = %e, "cannot make the old primary writable again");
                        }
                    }
                    self.end_promotion().await?;
                    ev.error = Some(format!(
                        "rolled back: {} was {} when this instance took over",
                        op.to,
                        if answer.is_none() {
                            "unreachable (fenced)"
                        } else {
                            "not promoted"
                        }
                    ));
                    self.record(kind, "rolled_back", resolved_json(kind, &op, &ev));
                    return Ok(());
                }
            }
        }
        // Switched: the record names `to`; the other standbys follow it.
        ev.promoted = Some(op.to.clone());
        let followers: Vec<usize> = self
            .standby_states(from)
            .into_iter()
            .map(|s| s.0)
            .filter(|&i| i != to)
            .collect();
        failover::settle(&self.nodes(), to, &followers, &self.config, &cred, &mut ev, None).await;
        self.end_promotion().await?;
        tracing::warn!(kind, from = %op.from, to = %op.to, "the promotion left half-done is finished");
        self.record(kind, "finished", resolved_json(kind, &op, &ev));
        Ok(())
    }
}

/// The `/status` history entry for a promotion resolved by this instance.
fn resolved_json(kind: &str, op: &Pending, ev: &FailoverEvent) -> serde_json::Value {
    let mut v = event_json(kind, ev);
    v["resolved"] = json!({"from": op.from, "to": op.to, "step": op.step.as_str()});
    v
}
