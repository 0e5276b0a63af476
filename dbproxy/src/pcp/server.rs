//! The PCP listener: one task per operator connection, at most [`MAX_CONNECTIONS`] at once. A
//! connection must log in (md5 with a salt, against pcp.conf) before anything else, within
//! [`LOGIN_TIMEOUT`]; every read and write is bounded by a timeout and a frame by
//! [`protocol::MAX_FRAME`]; a malformed or
//! unauthorised request gets pgpool's FATAL error and the connection is closed, a request that
//! cannot be carried out gets an ERROR and the connection stays.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::BytesMut;
use common::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::protocol::{self, NodeInfo, Request};
use super::PcpUsers;
use crate::cluster::Cluster;
use crate::manager::Manager;
use crate::operations::OpKind;

/// Operator connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a connection may stay silent, and a write may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connection has to log in, however it trickles its bytes.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the PCP commands act on.
pub struct Pcp {
    /// The node table.
    pub cluster: Arc<Cluster>,
    /// Attach and switchover, as operations the manager owns (a PCP client waits for the
    /// outcome; one that goes away cancels nothing).
    pub manager: Arc<Manager>,
    /// The logins of pcp.conf.
    pub users: PcpUsers,
}

/// Where a connection's login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    /// Nothing sent yet.
    Start,
    /// A salt was sent; the login must use it.
    Salted([u8; 4]),
    /// Logged in.
    Done,
}

/// Whether the connection goes on after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// Serves PCP on `listener` until `shutdown`; waits for open connections to end.
pub async fn serve(listener: TcpListener, pcp: Arc<Pcp>, shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tasks = TaskTracker::new();
    tracing::info!(addr = ?listener.local_addr().ok(), "PCP listening");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "PCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("too many PCP connections; closing a new one");
            continue;
        };
        let (pcp, shutdown) = (pcp.clone(), shutdown.clone());
        tasks.spawn(async move {
            connection(stream, &pcp, &shutdown).await;
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn connection(mut stream: TcpStream, pcp: &Pcp, shutdown: &Shutdown) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(protocol::MAX_FRAME);
    let mut out = BytesMut::new();
    let mut login = Login::Start;
    let login_by = Instant::now() + LOGIN_TIMEOUT;
    loop {
        // The frame is parsed where it lies; it leaves the buffer once answered.
        let (flow, used) = match protocol::frame(&buf) {
            Err(e) => {
                protocol::encode_error("FATAL", "invalid PCP packet", &e.to_string(), &mut out);
                (Flow::Close, 0)
            }
            Ok(Some(f)) => match Request::parse(f.tag, f.body) {
                Ok(req) => (pcp.answer(req, &mut login, &mut out).await, f.len),
                Err(e) => {
                    protocol::encode_error("FATAL", "invalid PCP packet", &e.to_string(), &mut out);
                    (Flow::Close, f.len)
                }
            },
            Ok(None) => {
                let limit = if login == Login::Done {
                    IO_TIMEOUT
                } else {
                    login_by.saturating_duration_since(Instant::now())
                };
                let read = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = tokio::time::timeout(limit, stream.read_buf(&mut buf)) => r,
                };
                match read {
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => return,
                }
            }
        };
        let _ = buf.split_to(used);
        if !out.is_empty() {
            let w = tokio::time::timeout(IO_TIMEOUT, stream.write_all(&out)).await;
            out.clear();
            if !matches!(w, Ok(Ok(()))) {
                return;
            }
        }
        if flow == Flow::Close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

impl Pcp {
    /// Answers one request into `out`.
    async fn answer(&self, req: Request<'_>, login: &mut Login, out: &mut BytesMut) -> Flow {
        match (req, *login) {
            (Request::Salt, _) => {
                let salt: [u8; 4] = rand::random();
                *login = Login::Salted(salt);
                protocol::encode_salt(salt, out);
                Flow::Continue
            }
            (Request::Login { user, hash }, Login::Salted(salt)) => {
                let ok = self
                    .users
                    .md5_of(user)
                    .is_some_and(|stored| protocol::login_matches(stored, user, salt, hash));
                if ok {
                    *login = Login::Done;
                    protocol::encode_auth_ok(out);
                    Flow::Continue
                } else {
                    tracing::warn!(user, "PCP login refused");
                    protocol::encode_error(
                        "FATAL",
                        &format!("authentication failed for user \"{user}\""),
                        "username and/or password does not match",
                        out,
                    );
                    Flow::Close
                }
            }
            (Request::Disconnect, _) => Flow::Close,
            (_, Login::Start | Login::Salted(_)) => {
                protocol::encode_error(
                    "FATAL",
                    "authentication failed for new PCP connection",
                    "connection not authorized",
                    out,
                );
                Flow::Close
            }
            (req, Login::Done) => {
                self.command(req, out).await;
                Flow::Continue
            }
        }
    }

    /// A node id the table has, or an ERROR naming `what` in `out`.
    /// `detail` words the unknown id as pgpool-II does for that command (it is not the same
    /// sentence for every command, and scripts match on it).
    fn node(&self, id: i64, what: &str, detail: fn(i64) -> String, out: &mut BytesMut) -> Option<usize> {
        let n = self.cluster.nodes.len();
        match usize::try_from(id) {
            Ok(i) if i < n => Some(i),
            _ => {
                protocol::encode_error("ERROR", what, &detail(id), out);
                None
            }
        }
    }

    /// Carries out a logged-in request.
    async fn command(&self, req: Request<'_>, out: &mut BytesMut) {
        match req {
            Request::NodeCount => protocol::encode_node_count(self.cluster.nodes.len(), out),
            Request::NodeInfo(id) => {
                let all = id == -1;
                if let Some(i) = if all { Some(0) } else { self.node(id, "informing node info failed", |id| format!("invalid node ID : {id}"), out) } {
                    let infos = node_infos(&self.cluster);
                    let pick = if all { &infos[..] } else { &infos[i..=i] };
                    protocol::encode_node_info(pick, out);
                }
            }
            Request::HealthCheckStats(id) => {
                if let Some(i) = self.node(id, "informing health check stats info failed", invalid_id, out) {
                    let rows = crate::admin::health_check_stats(&self.cluster);
                    protocol::encode_health_check_stats(&rows[i], out);
                }
            }
            Request::ProcCount => protocol::encode_proc_count(&[std::process::id()], out),
            Request::Attach(id) => {
                if let Some(i) = self.node(id, "attaching node failed", invalid_id, out) {
                    match self.manager.run_op(OpKind::Attach, i).await {
                        Ok(msg) => {
                            tracing::info!(node = i, "PCP attach: {msg}");
                            protocol::encode_complete(b'c', out);
                        }
                        Err(e) => protocol::encode_error("ERROR", "attaching node failed", &e.to_string(), out),
                    }
                }
            }
            Request::Detach(id) => {
                if let Some(i) = self.node(id, "detaching node failed", invalid_id, out) {
                    if self.cluster.elected() == Some(i) {
                        protocol::encode_error(
                            "ERROR",
                            "detaching the primary is not supported",
                            "it would fail over while the primary still runs; switch over with pcp_promote_node -s -n <standby>",
                            out,
                        );
                    } else {
                        tracing::warn!(node = i, "PCP detach: the node gets no traffic until attached");
                        self.cluster.fence(i);
                        protocol::encode_complete(b'd', out);
                    }
                }
            }
            Request::Promote { id, switchover } => {
                if let Some(i) = self.node(id, "could not process promote request", |id| format!("node id {id} is not valid"), out) {
                    if self.cluster.elected() == Some(i) {
                        // pgpool-II says FATAL here, though the connection stays usable.
                        protocol::encode_error(
                            "FATAL",
                            "invalid promote request",
                            &format!("specified node is already primary node, can't promote node id {i}"),
                            out,
                        );
                        return;
                    }
                    tracing::warn!(node = i, switchover, "PCP promote: switching over");
                    match self.manager.run_op(OpKind::Switchover, i).await {
                        Ok(_) => protocol::encode_complete(b'd', out),
                        Err(e) => protocol::encode_error("ERROR", "promoting node failed", &e.to_string(), out),
                    }
                }
            }
            Request::Unsupported(tag) => protocol::encode_error(
                "ERROR",
                &format!("PCP request '{}' is not supported by dbproxy", tag as char),
                "dbproxy answers node count, node info, health check stats, process count, attach, detach and promote",
                out,
            ),
            Request::Salt | Request::Login { .. } | Request::Disconnect => {
                protocol::encode_error("ERROR", "already authenticated", "log in once per connection", out)
            }
        }
    }
}

/// Every node as `pcp_node_info` reports it, from the same rows as SHOW POOL_NODES.
/// The detail of an unknown node id for the commands whose pgpool-II wording is this one.
fn invalid_id(id: i64) -> String {
    format!("invalid node ID {id}")
}

pub fn node_infos(cluster: &Cluster) -> Vec<NodeInfo> {
    crate::admin::pool_nodes(cluster, None)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let changed = cluster.status(i).last_change;
            NodeInfo {
                host: r[1].clone(),
                port: cluster.nodes[i].config.port,
                status: if r[3] == "up" { 2 } else { 3 },
                pg_status: r[4].clone(),
                weight: r[5].parse().unwrap_or(0.0),
                primary: r[6] == "primary",
                pg_role: r[7].clone(),
                delay: r[10].parse().unwrap_or(0),
                replication_state: r[11].clone(),
                sync_state: r[12].clone(),
                status_changed: changed
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            }
        })
        .collect()
}
