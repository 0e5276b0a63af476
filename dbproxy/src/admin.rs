//! Administration: the `SHOW POOL_NODES` rows (answered on the main port with pgpool-II's
//! columns) and the admin HTTP routes (`/status`; `/metrics` and `/healthz` come from `common`).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use common::admin::{json, text, AdminRoutes, ResponseFuture};
use hyper::{Method, StatusCode};

use crate::cluster::Cluster;
use crate::manager::{Manager, OpError};
use crate::operations::OpKind;
use crate::protocol::simple;

/// pgpool-II's SHOW POOL_NODES columns, in its order.
pub const POOL_NODES_COLUMNS: [&str; 14] = [
    "node_id",
    "hostname",
    "port",
    "status",
    "pg_status",
    "lb_weight",
    "role",
    "pg_role",
    "select_cnt",
    "load_balance_node",
    "replication_delay",
    "replication_state",
    "replication_sync_state",
    "last_status_change",
];

/// Whether `sql` is `SHOW POOL_NODES` (any case, optional semicolon).
pub fn is_show_pool_nodes(sql: &str) -> bool {
    // Asked of every simple Query: most are ruled out by their first word alone.
    let head = sql.trim_start().as_bytes();
    if head.len() < 15 || !head[..4].eq_ignore_ascii_case(b"show") {
        return false;
    }
    let s = sql.trim().trim_end_matches(';').trim_end();
    let mut words = s.split_ascii_whitespace();
    matches!(
        (words.next(), words.next(), words.next()),
        (Some(a), Some(b), None) if a.eq_ignore_ascii_case("show") && b.eq_ignore_ascii_case("pool_nodes")
    )
}

/// One row per node; `lb_node` is the node this session balances reads to.
pub fn pool_nodes(cluster: &Cluster, lb_node: Option<usize>) -> Vec<[String; 14]> {
    let total: u64 = cluster.nodes.iter().map(|n| n.weight() as u64).sum();
    let primary = cluster.primary();
    (0..cluster.nodes.len())
        .map(|i| {
            let n = &cluster.nodes[i];
            let s = cluster.status(i);
            let weight = if total == 0 {
                0.0
            } else {
                n.weight() as f64 / total as f64
            };
            let role = if i == primary { "primary" } else { s.role.as_str() };
            [
                i.to_string(),
                n.config.host.clone(),
                n.config.port.to_string(),
                // A fenced node is detached, as pgpool shows a node after failover: down.
                if s.healthy && !cluster.is_fenced(i) {
                    "up"
                } else {
                    "down"
                }
                .to_string(),
                if s.reachable { "up" } else { "down" }.to_string(),
                format!("{weight:.6}"),
                role.to_string(),
                s.role.as_str().to_string(),
                n.select_cnt
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
                (lb_node == Some(i)).to_string(),
                cluster.lag_bytes(i).unwrap_or(0).to_string(),
                s.replication_state.clone(),
                s.sync_state.clone(),
                timestamp(s.last_change),
            ]
        })
        .collect()
}

/// Appends the full SHOW POOL_NODES response (without ReadyForQuery).
pub fn encode_pool_nodes(cluster: &Cluster, lb_node: Option<usize>, out: &mut BytesMut) {
    simple::encode_row_description(&POOL_NODES_COLUMNS, out);
    let rows = pool_nodes(cluster, lb_node);
    for r in &rows {
        simple::encode_data_row(r, out);
    }
    simple::encode_command_complete(&format!("SELECT {}", rows.len()), out);
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, as pgpool prints it.
pub fn timestamp(t: SystemTime) -> String {
    common::time::Civil::from(t).iso_seconds()
}

/// The admin routes dbproxy adds: `GET /status`, `POST /nodes/{id}/attach` and
/// `POST /nodes/{id}/promote`.
pub struct Routes {
    /// The node table.
    pub cluster: Arc<Cluster>,
    /// Failover, re-attachment and switchover.
    pub manager: Arc<Manager>,
    /// The token POST endpoints require (`admin_token`); `None` leaves them open.
    pub token: Option<String>,
}

/// The `/status` document.
pub fn status_json(cluster: &Cluster, manager: &Manager) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = pool_nodes(cluster, None)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut m: serde_json::Map<String, serde_json::Value> = POOL_NODES_COLUMNS
                .iter()
                .zip(r)
                .filter(|(k, _)| **k != "load_balance_node")
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                .collect();
            m.insert("name".into(), cluster.nodes[i].config.name.clone().into());
            m.insert("fenced".into(), cluster.is_fenced(i).into());
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::json!({
        "primary": cluster.elected(),
        "record": manager.record_json(),
        "operations": manager.operations.json(),
        "nodes": nodes,
        "history": manager.history(),
    })
}

/// `/nodes/{id}/{action}` → (id, action).
fn node_action(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("/nodes/")?;
    let (id, action) = rest.split_once('/')?;
    Some((id.parse().ok()?, action))
}

impl AdminRoutes for Routes {
    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn route(&self, method: &Method, path: &str, _body: Bytes) -> Option<ResponseFuture> {
        if path == "/status" {
            if method != Method::GET {
                return Some(Box::pin(async {
                    text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
                }));
            }
            let body = status_json(&self.cluster, &self.manager);
            return Some(Box::pin(async move { json(StatusCode::OK, &body) }));
        }
        let (id, action) = node_action(path)?;
        if !matches!(action, "attach" | "promote") {
            return None;
        }
        if method != Method::POST {
            return Some(Box::pin(async {
                text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
            }));
        }
        if id >= self.cluster.nodes.len() {
            let msg = format!("no node {id}\n");
            return Some(Box::pin(async move { text(StatusCode::NOT_FOUND, msg) }));
        }
        // The manager owns the operation: the answer is its id, at once; `/status` follows it.
        let kind = if action == "promote" {
            OpKind::Switchover
        } else {
            OpKind::Attach
        };
        let r = self.manager.start(kind, id);
        Some(Box::pin(async move {
            match r {
                Ok(op) => json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"operation": op, "kind": kind.as_str(), "node": id, "status": "/status"}),
                ),
                Err(e @ OpError::Conflict(_)) => text(StatusCode::CONFLICT, format!("{e}\n")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn show_pool_nodes_spellings() {
        assert!(is_show_pool_nodes("SHOW POOL_NODES"));
        assert!(is_show_pool_nodes("  show   pool_nodes ;"));
        assert!(!is_show_pool_nodes("show pool_nodes x"));
        assert!(!is_show_pool_nodes("show search_path"));
    }

    #[test]
    fn node_actions() {
        assert_eq!(node_action("/nodes/2/attach"), Some((2, "attach")));
        assert_eq!(node_action("/nodes/x/attach"), None);
        assert_eq!(node_action("/status"), None);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01 00:00:00");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(timestamp(t), "2023-11-14 22:13:20");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400); // leap day
        assert_eq!(timestamp(t), "2000-02-29 00:00:00");
    }
}
