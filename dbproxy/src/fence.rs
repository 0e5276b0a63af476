//! Fencing done to the node itself, not only in dbproxy's routing: after a failover the old
//! primary must take no write from anyone, including clients that reach it directly. The
//! `failover.fence` step is `sql` (end its client sessions and make it read-only: a best effort,
//! since a client may still ask for a read-write transaction), or `exec` / `ssh` (a command such as
//! `pg_ctl stop -m immediate` or a STONITH script), each bounded by a timeout.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::failover::{self, Credentials, FailoverError, NodeRef, Placeholders, PromoteMethod};

/// The `[failover.fence]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FenceConfig {
    /// `sql` (default): terminate the node's client sessions and set `default_transaction_read_only`
    /// (ALTER SYSTEM, so it survives a restart), once the node answers; `exec` or `ssh`: run
    /// `command`, right away (it may reach a node dbproxy cannot, e.g. to kill a frozen server).
    pub method: PromoteMethod,
    /// The command for `exec` and `ssh`: `{node}`, `{node_id}`, `{host}`, `{port}`, `{data_dir}`,
    /// `{container}` and pgpool-II's `%d %h %p %D` name the node being fenced.
    pub command: String,
    /// `user@host` for `ssh` (default: the node's host).
    pub ssh_target: String,
    /// Private key file for `ssh`.
    pub ssh_key: String,
    /// Seconds the step may take.
    pub timeout: f64,
}

impl Default for FenceConfig {
    fn default() -> Self {
        FenceConfig {
            method: PromoteMethod::Sql,
            command: String::new(),
            ssh_target: String::new(),
            ssh_key: String::new(),
            timeout: 10.0,
        }
    }
}

impl FenceConfig {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<(), common::ConfigError> {
        if !(self.timeout > 0.0 && self.timeout <= 3600.0) {
            return Err(common::ConfigError::invalid(
                "failover.fence.timeout",
                "must be a positive number of seconds (at most 3600)",
            ));
        }
        if self.method != PromoteMethod::Sql && self.command.trim().is_empty() {
            return Err(common::ConfigError::invalid(
                "failover.fence.command",
                "exec and ssh fencing need a command",
            ));
        }
        Ok(())
    }

    /// Whether the step reaches the node out of band (a command), so it is worth running even
    /// while the node does not answer dbproxy.
    pub fn out_of_band(&self) -> bool {
        self.method != PromoteMethod::Sql
    }
}

/// How long after a failed fence step it is tried again on the same node.
const RETRY: Duration = Duration::from_secs(5);

/// Per node: whether the fence step ran since the node last stopped answering, and when it was
/// last tried.
#[derive(Debug, Default)]
pub struct Attempts {
    nodes: Vec<(bool, Option<Instant>)>,
}

impl Attempts {
    /// Whether to run the step on node `i` now, given whether it answers and whether it claims
    /// to be primary while fenced; marks it tried when so.
    pub fn due(&mut self, i: usize, reachable: bool, claims: bool) -> bool {
        if self.nodes.len() <= i {
            self.nodes.resize(i + 1, (false, None));
        }
        let (done, tried) = &mut self.nodes[i];
        if !reachable {
            // Whatever ran before, a node that comes back is fenced again.
            *done = false;
            return false;
        }
        if !claims || *done || tried.is_some_and(|t| t.elapsed() < RETRY) {
            return false;
        }
        *tried = Some(Instant::now());
        true
    }

    /// The step on node `i` ended (`ok`: it is fenced until it stops answering).
    pub fn mark(&mut self, i: usize, ok: bool) {
        if self.nodes.len() <= i {
            self.nodes.resize(i + 1, (false, None));
        }
        self.nodes[i].0 = ok;
        self.nodes[i].1 = Some(Instant::now());
    }
}

/// Fences `node` with `cfg`; `container` fills `{container}`. Returns what the step did.
pub async fn fence(
    node: &NodeRef,
    container: &str,
    cfg: &FenceConfig,
    cred: &Credentials,
) -> Result<String, FailoverError> {
    let timeout = Duration::from_secs_f64(cfg.timeout);
    match cfg.method {
        PromoteMethod::Sql => {
            let step = failover::quiesce(node, cred);
            tokio::time::timeout(timeout, step)
                .await
                .map_err(|_| FailoverError::Timeout {
                    node: node.name.clone(),
                    what: "its sessions to end and it to turn read-only".into(),
                    after: timeout,
                })??;
            Ok("client sessions ended; default_transaction_read_only = on".into())
        }
        PromoteMethod::Exec | PromoteMethod::Ssh => {
            let placeholders = Placeholders {
                subject: node.clone(),
                failed: node.clone(),
                new_primary: node.clone(),
                old_primary: node.clone(),
                container: container.to_string(),
            };
            let rendered = failover::render(&cfg.command, &placeholders);
            let line = if cfg.method == PromoteMethod::Ssh {
                failover::ssh_line(&cfg.ssh_target, &cfg.ssh_key, &node.host, &rendered, timeout)
            } else {
                rendered
            };
            failover::run_command(&node.name, &line, timeout).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_fenced_again_after_it_stopped_answering() {
        let mut a = Attempts::default();
        assert!(!a.due(1, true, false), "not claiming primary");
        assert!(a.due(1, true, true));
        assert!(!a.due(1, true, true), "running or just tried");
        a.mark(1, true);
        assert!(!a.due(1, true, true), "done");
        assert!(!a.due(1, false, true));
        // Back from a restart: fenced again (not before the retry delay since the last try).
        a.nodes[1].1 = None;
        assert!(a.due(1, true, true));
        a.mark(1, false);
        assert!(!a.due(1, true, true), "a failed step waits before the next try");
    }

    #[test]
    fn validation_names_keys() {
        FenceConfig::default().validate().unwrap();
        let c = FenceConfig {
            method: PromoteMethod::Exec,
            ..FenceConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("failover.fence.command"));
        let c = FenceConfig {
            timeout: 0.0,
            ..FenceConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("failover.fence.timeout"));
    }

    #[tokio::test]
    async fn an_exec_fence_renders_the_node_and_times_out() {
        let node = NodeRef {
            id: 2,
            name: "n2".into(),
            host: "h2".into(),
            port: 5434,
            data_dir: "/d/2".into(),
            tls: None,
        };
        let cred = Credentials {
            user: "postgres".into(),
            password: String::new(),
            database: "postgres".into(),
            connect_timeout: Duration::from_secs(1),
            tls: Default::default(),
        };
        let cfg = FenceConfig {
            method: PromoteMethod::Exec,
            command: "echo stop {node} {host}:{port} {data_dir} {container} %d".into(),
            ..FenceConfig::default()
        };
        let out = fence(&node, "c2", &cfg, &cred).await.unwrap();
        assert_eq!(out, "stop n2 h2:5434 /d/2 c2 2");
        let cfg = FenceConfig {
            method: PromoteMethod::Exec,
            command: "sleep 5".into(),
            timeout: 0.2,
            ..FenceConfig::default()
        };
        let e = fence(&node, "c2", &cfg, &cred).await.unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
    }
}
