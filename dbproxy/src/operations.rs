//! Operator requests (switchover, attach) as operations the failover manager owns: each gets an
//! id when it is accepted, runs in a task of its own (so a client that goes away cancels nothing),
//! reports its current step while it runs and its outcome when it ends, all shown in `/status`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};
use tokio::sync::watch;

/// How many operations `/status` keeps.
const KEPT: usize = 50;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A planned switchover to a standby (`POST /nodes/{id}/promote`).
    Switchover,
    /// Re-attaching a fenced node as a standby (`POST /nodes/{id}/attach`).
    Attach,
    /// An automatic rejoin of a fenced node (`failover.rejoin.automatic`).
    Rejoin,
}

impl OpKind {
    /// Its name in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Switchover => "switchover",
            OpKind::Attach => "attach",
            OpKind::Rejoin => "rejoin",
        }
    }
}

/// Where an operation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpState {
    /// Accepted, waiting for the operation before it to end.
    Queued,
    /// Running; the step it is at.
    Running(String),
    /// Done; what it did.
    Succeeded(String),
    /// Ended without doing it; why.
    Failed(String),
}

#[derive(Debug, Clone)]
struct Operation {
    id: u64,
    kind: OpKind,
    node: String,
    state: OpState,
    accepted: SystemTime,
    finished: Option<SystemTime>,
}

/// The operations accepted so far (the last [`KEPT`]), and a signal for each ending.
#[derive(Debug)]
pub struct Operations {
    list: Mutex<(u64, VecDeque<Operation>)>,
    ended: watch::Sender<u64>,
}

impl Default for Operations {
    fn default() -> Self {
        Operations {
            list: Mutex::new((0, VecDeque::new())),
            ended: watch::Sender::new(0),
        }
    }
}

impl Operations {
    /// Accepts an operation of `kind` on `node`; returns its id.
    pub fn accept(&self, kind: OpKind, node: &str) -> u64 {
        let mut l = self.list.lock().expect("operations poisoned");
        l.0 += 1;
        let id = l.0;
        if l.1.len() == KEPT {
            l.1.pop_front();
        }
        l.1.push_back(Operation {
            id,
            kind,
            node: node.to_string(),
            state: OpState::Queued,
            accepted: SystemTime::now(),
            finished: None,
        });
        id
    }

    fn set(&self, id: u64, state: OpState) {
        let mut l = self.list.lock().expect("operations poisoned");
        if let Some(op) = l.1.iter_mut().find(|o| o.id == id) {
            if matches!(state, OpState::Succeeded(_) | OpState::Failed(_)) {
                op.finished = Some(SystemTime::now());
            }
            op.state = state;
        }
    }

    /// Operation `id` is at `step` now.
    pub fn step(&self, id: u64, step: &str) {
        tracing::info!(operation = id, "{step}");
        self.set(id, OpState::Running(step.to_string()));
    }

    /// Operation `id` ended with `outcome`.
    pub fn finish(&self, id: u64, outcome: Result<String, String>) {
        self.set(
            id,
            match outcome {
                Ok(m) => OpState::Succeeded(m),
                Err(e) => OpState::Failed(e),
            },
        );
        self.ended.send_modify(|n| *n += 1);
    }

    /// Operation `id`'s state, while it is kept.
    pub fn state(&self, id: u64) -> Option<OpState> {
        let l = self.list.lock().expect("operations poisoned");
        l.1.iter().find(|o| o.id == id).map(|o| o.state.clone())
    }

    /// Waits until operation `id` has ended; its outcome (`None` once it is no longer kept).
    pub async fn outcome(&self, id: u64) -> Option<Result<String, String>> {
        let mut ended = self.ended.subscribe();
        loop {
            match self.state(id)? {
                OpState::Succeeded(m) => return Some(Ok(m)),
                OpState::Failed(e) => return Some(Err(e)),
                _ => {}
            }
            ended.changed().await.ok()?;
        }
    }

    /// The operations as `/status` shows them, oldest first.
    pub fn json(&self) -> Value {
        let l = self.list.lock().expect("operations poisoned");
        let at = |t: SystemTime| common::time::Civil::from(t).iso_seconds();
        Value::Array(
            l.1.iter()
                .map(|o| {
                    let (state, detail) = match &o.state {
                        OpState::Queued => ("queued", None),
                        OpState::Running(s) => ("running", Some(s)),
                        OpState::Succeeded(s) => ("succeeded", Some(s)),
                        OpState::Failed(s) => ("failed", Some(s)),
                    };
                    json!({
                        "id": o.id,
                        "kind": o.kind.as_str(),
                        "node": o.node,
                        "state": state,
                        "step": matches!(o.state, OpState::Running(_)).then_some(detail).flatten(),
                        "result": matches!(o.state, OpState::Succeeded(_)).then_some(detail).flatten(),
                        "error": matches!(o.state, OpState::Failed(_)).then_some(detail).flatten(),
                        "accepted": at(o.accepted),
                        "finished": o.finished.map(at),
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn operations_report_steps_and_outcomes() {
        let ops = Arc::new(Operations::default());
        let a = ops.accept(OpKind::Switchover, "node1");
        let b = ops.accept(OpKind::Attach, "node0");
        assert_eq!((a, b), (1, 2));
        ops.step(a, "promoting node1");
        let j = ops.json();
        assert_eq!(j[0]["state"], "running");
        assert_eq!(j[0]["step"], "promoting node1");
        assert_eq!(j[1]["state"], "queued");
        let waiter = tokio::spawn({
            let ops = ops.clone();
            async move { ops.outcome(b).await }
        });
        ops.finish(a, Ok("switched".into()));
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "another operation ending does not end the wait"
        );
        ops.finish(b, Err("not in recovery".into()));
        assert_eq!(waiter.await.unwrap(), Some(Err("not in recovery".into())));
        let j = ops.json();
        assert_eq!(
            (j[0]["state"].as_str(), j[0]["result"].as_str()),
            (Some("succeeded"), Some("switched"))
        );
        assert_eq!(j[1]["error"], "not in recovery");
        assert!(j[1]["finished"].is_string() && j[1]["step"].is_null());
        assert_eq!(ops.outcome(99).await, None, "an unknown operation");
        for _ in 0..KEPT {
            ops.accept(OpKind::Attach, "node0");
        }
        assert_eq!(ops.json().as_array().unwrap().len(), KEPT, "bounded");
        assert_eq!(ops.state(a), None);
    }
}
