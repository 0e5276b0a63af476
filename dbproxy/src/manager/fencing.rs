//! The failover manager's fencing of nodes themselves ([`crate::fence`]): when it runs, and
//! lifting the fence of a failed candidate that turned out a harmless standby.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use super::{time_json, Manager};
use crate::cluster::Role;
use crate::failover::FailoverEvent;
use crate::fence;

impl Manager {
    /// Runs the `failover.fence` step on node `i` and records it in the history; whether it
    /// succeeded.
    pub(super) async fn fence_node(&self, i: usize) -> bool {
        let node = self.node_ref(i);
        let container = self.config.promote_for(&node.name).container_of(&node.name);
        let started = SystemTime::now();
        let r = fence::fence(&node, &container, &self.config.fence, &self.cred()).await;
        let (outcome, result, error) = match &r {
            Ok(out) => {
                tracing::warn!(node = %node.name, output = %out, "fenced the node itself");
                ("ok", Some(out.clone()), None)
            }
            Err(e) => {
                tracing::error!(node = %node.name, error = %e, "fencing the node itself failed; retried once it answers");
                ("failed", None, Some(e.to_string()))
            }
        };
        self.fence_state
            .lock()
            .expect("fence state poisoned")
            .mark(i, r.is_ok());
        self.record(
            "fence",
            outcome,
            json!({
                "kind": "fence",
                "node": node.name,
                "started": time_json(Some(started)),
                "finished": time_json(Some(SystemTime::now())),
                "result": result,
                "error": error,
            }),
        );
        r.is_ok()
    }

    /// Starts the fence step, in a task of its own, on every fenced node that answers as a
    /// primary again and was not fenced since it last stopped answering (an old primary back from
    /// a crash or a partition, a candidate whose failed promotion took effect after all).
    pub(super) fn fence_returned(self: &Arc<Self>) {
        let c = &self.cluster;
        for i in 0..c.nodes.len() {
            let s = c.status(i);
            let claims = s.reachable && s.role == Role::Primary && c.is_fenced(i) && c.elected() != Some(i);
            let due = {
                let mut st = self.fence_state.lock().expect("fence state poisoned");
                st.due(i, s.reachable, claims)
            };
            if due {
                let me = self.clone();
                self.op_tasks.spawn(async move {
                    me.fence_node(i).await;
                });
            }
        }
    }

    /// After a failover: candidates fenced because their promotion failed, which now stream from
    /// the new primary, are standbys again and get reads.
    pub(super) async fn unfence_followers(&self, ev: &FailoverEvent) {
        if ev.resumed_at.is_none() {
            return;
        }
        for (name, r) in &ev.followers {
            let failed_candidate = ev.failed_attempts.iter().any(|(n, _)| n == name);
            let Some(i) = self.index_of(name) else { continue };
            if !(r.is_ok() && failed_candidate && self.cluster.is_fenced(i)) {
                continue;
            }
            match self
                .commit(|r, _| {
                    r.fenced.remove(name);
                })
                .await
            {
                Ok(()) => {
                    tracing::info!(node = %name, "streams from the new primary: fence lifted");
                    self.cluster.unfence(i);
                }
                Err(e) => tracing::error!(node = %name, error = %e, "cannot record lifting a fence"),
            }
        }
    }
}
