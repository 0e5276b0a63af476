//! Administration: pgpool-II's `SHOW POOL_NODES`, `POOL_VERSION`, `POOL_HEALTH_CHECK_STATS` and
//! `POOL_BACKEND_STATS` (answered on the main port with pgpool-II's columns), PgBouncer's `SHOW
//! POOLS`, `CLIENTS` and `SERVERS` (rows from `pool::show`) and the admin HTTP routes (`/status`; `/metrics` and `/healthz` come from `common`).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use common::admin::{json, text, AdminRoutes, ResponseFuture};
use hyper::{Method, StatusCode};

use crate::cluster::Cluster;
use crate::manager::{Manager, OpError};
use crate::operations::OpKind;
use crate::pool::{show, Pools};
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

/// pgpool-II's SHOW POOL_HEALTH_CHECK_STATS columns, in its order.
pub const HEALTH_CHECK_STATS_COLUMNS: [&str; 20] = [
    "node_id",
    "hostname",
    "port",
    "status",
    "role",
    "last_status_change",
    "total_count",
    "success_count",
    "fail_count",
    "skip_count",
    "retry_count",
    "average_retry_count",
    "max_retry_count",
    "max_duration",
    "min_duration",
    "average_duration",
    "last_health_check",
    "last_successful_health_check",
    "last_skip_health_check",
    "last_failed_health_check",
];

/// pgpool-II's SHOW POOL_BACKEND_STATS columns, in its order.
pub const BACKEND_STATS_COLUMNS: [&str; 14] = [
    "node_id",
    "hostname",
    "port",
    "status",
    "role",
    "select_cnt",
    "insert_cnt",
    "update_cnt",
    "delete_cnt",
    "ddl_cnt",
    "other_cnt",
    "panic_cnt",
    "fatal_cnt",
    "error_cnt",
];

/// The pgpool SHOW commands dbproxy answers itself on the main port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// `SHOW POOL_NODES`.
    PoolNodes,
    /// `SHOW POOL_VERSION`.
    PoolVersion,
    /// `SHOW POOL_HEALTH_CHECK_STATS`.
    PoolHealthCheckStats,
    /// `SHOW POOL_BACKEND_STATS`.
    PoolBackendStats,
    /// PgBouncer's `SHOW POOLS`.
    Pools,
    /// PgBouncer's `SHOW CLIENTS`.
    Clients,
    /// PgBouncer's `SHOW SERVERS`.
    Servers,
}

/// Which pgpool SHOW command `sql` is (any case, optional semicolon), if any.
pub fn show(sql: &str) -> Option<Show> {
    // Asked of every simple Query: most are ruled out by their first word alone.
    let head = sql.trim_start().as_bytes();
    if head.len() < 10 || !head[..4].eq_ignore_ascii_case(b"show") || !head[4].is_ascii_whitespace() {
        return None;
    }
    let s = sql.trim().trim_end_matches(';').trim_end();
    let mut words = s.split_ascii_whitespace().skip(1);
    let (Some(name), None) = (words.next(), words.next()) else {
        return None;
    };
    [
        ("pool_nodes", Show::PoolNodes),
        ("pool_version", Show::PoolVersion),
        ("pool_health_check_stats", Show::PoolHealthCheckStats),
        ("pool_backend_stats", Show::PoolBackendStats),
        ("pools", Show::Pools),
        ("clients", Show::Clients),
        ("servers", Show::Servers),
    ]
    .into_iter()
    .find(|(n, _)| name.eq_ignore_ascii_case(n))
    .map(|(_, k)| k)
}

/// Appends the full answer to `kind` (without ReadyForQuery); `lb_node` is the node this
/// session balances reads to.
pub fn encode_show(kind: Show, cluster: &Cluster, pools: &Pools, lb_node: Option<usize>, out: &mut BytesMut) {
    let n = match kind {
        Show::PoolNodes => encode_rows(&POOL_NODES_COLUMNS, &pool_nodes(cluster, lb_node), out),
        Show::PoolVersion => encode_rows(&["pool_version"], &[[pool_version()]], out),
        Show::PoolHealthCheckStats => {
            encode_rows(&HEALTH_CHECK_STATS_COLUMNS, &health_check_stats(cluster), out)
        }
        Show::PoolBackendStats => encode_rows(&BACKEND_STATS_COLUMNS, &backend_stats(cluster), out),
        Show::Pools => encode_rows(&show::POOLS_COLUMNS, &pools.pools_rows(), out),
        Show::Clients => encode_rows(&show::CONNECTIONS_COLUMNS, &pools.clients_rows(), out),
        Show::Servers => encode_rows(&show::CONNECTIONS_COLUMNS, &pools.servers_rows(), out),
    };
    simple::encode_command_complete(&format!("SELECT {n}"), out);
}

fn encode_rows<const N: usize>(columns: &[&str; N], rows: &[[String; N]], out: &mut BytesMut) -> usize {
    simple::encode_row_description(columns, out);
    for r in rows {
        simple::encode_data_row(r, out);
    }
    rows.len()
}

/// What SHOW POOL_VERSION answers: dbproxy's version, and the pgpool-II release whose
/// interface it follows.
pub fn pool_version() -> String {
    format!("dbproxy {} (pgpool-II 4.3 interface)", env!("CARGO_PKG_VERSION"))
}

/// A node's status as pgpool names it: `up`, or `down` for an unhealthy or detached (fenced) node
/// (pgpool shows a node it detached after a failover as down).
fn status_name(cluster: &Cluster, i: usize) -> &'static str {
    if cluster.status(i).healthy && !cluster.is_fenced(i) {
        "up"
    } else {
        "down"
    }
}

/// The role pgpool shows: the elected primary is `primary`, every other node `standby`.
fn role_name(cluster: &Cluster, i: usize) -> &'static str {
    if i == cluster.primary() {
        "primary"
    } else {
        "standby"
    }
}

/// One SHOW POOL_HEALTH_CHECK_STATS row per node (also what `pcp_health_check_stats` sends).
pub fn health_check_stats(cluster: &Cluster) -> Vec<[String; 20]> {
    let when = |t: Option<SystemTime>| t.map(timestamp).unwrap_or_default();
    (0..cluster.nodes.len())
        .map(|i| {
            let n = &cluster.nodes[i];
            let c = n.checks.snapshot();
            [
                i.to_string(),
                n.config.host.clone(),
                n.config.port.to_string(),
                status_name(cluster, i).to_string(),
                role_name(cluster, i).to_string(),
                timestamp(cluster.status(i).last_change),
                c.total.to_string(),
                c.success.to_string(),
                c.fail.to_string(),
                c.skip.to_string(),
                c.retry.to_string(),
                format!("{:.6}", c.average_retry()),
                c.max_retry.to_string(),
                c.max_ms.to_string(),
                c.min_ms.to_string(),
                format!("{:.6}", c.average_ms()),
                when(c.last),
                when(c.last_success),
                when(c.last_skip),
                when(c.last_fail),
            ]
        })
        .collect()
}

/// One SHOW POOL_BACKEND_STATS row per node. dbproxy counts statements per node, not per kind:
/// they are all reported as `select_cnt` (as in SHOW POOL_NODES); the per-kind and per-error
/// columns stay 0.
pub fn backend_stats(cluster: &Cluster) -> Vec<[String; 14]> {
    (0..cluster.nodes.len())
        .map(|i| {
            let n = &cluster.nodes[i];
            let zero = || "0".to_string();
            [
                i.to_string(),
                n.config.host.clone(),
                n.config.port.to_string(),
                status_name(cluster, i).to_string(),
                role_name(cluster, i).to_string(),
                n.select_cnt
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
                zero(),
                zero(),
                zero(),
                zero(),
                zero(),
                zero(),
                zero(),
                zero(),
            ]
        })
        .collect()
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
                status_name(cluster, i).to_string(),
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
    fn show_spellings() {
        assert_eq!(show("SHOW POOL_NODES"), Some(Show::PoolNodes));
        assert_eq!(show("  show   pool_nodes ;"), Some(Show::PoolNodes));
        assert_eq!(show("show pool_version"), Some(Show::PoolVersion));
        assert_eq!(
            show("Show Pool_Health_Check_Stats;"),
            Some(Show::PoolHealthCheckStats)
        );
        assert_eq!(show("SHOW\tPOOL_BACKEND_STATS"), Some(Show::PoolBackendStats));
        assert_eq!(show("show pool_nodes x"), None);
        assert_eq!(show("show search_path"), None);
        assert_eq!(show("showpool_nodes"), None);
        assert_eq!(show("select 'show pool_nodes'"), None);
        assert_eq!(show("show pool_processes"), None);
        assert_eq!(show("SHOW POOLS;"), Some(Show::Pools));
        assert_eq!(show("show clients"), Some(Show::Clients));
        assert_eq!(show("show Servers"), Some(Show::Servers));
        assert_eq!(show("show pool"), None);
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
