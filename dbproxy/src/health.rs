//! One checker task per node: connect with tokio-postgres, ask the node's role, WAL position and
//! replay delay, and feed pass/fail to a `common::HealthState`, which alone decides when the node
//! flips. A node that is down keeps being checked, so it comes back once it answers again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{HealthState, Shutdown, Thresholds, Transition};

use crate::cluster::{parse_lsn, Cluster, Role};
use crate::config::{secs, HealthConfig};

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Connecting or querying failed.
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The probe took longer than the timeout.
    #[error("timed out")]
    Timeout,
    /// Connecting, TLS or the login failed.
    #[error("{0}")]
    Link(String),
    /// The node answered something unexpected.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// What one successful probe learned.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The node's role.
    pub role: Role,
    /// Current WAL position (primary) or replay position (standby).
    pub lsn: Option<u64>,
    /// Replay delay in milliseconds while WAL is pending (0 on a primary or a caught-up standby).
    pub lag_ms: u64,
    /// For a primary: (application_name, state, sync_state) of each streaming standby.
    pub replication: Vec<(String, String, String)>,
}

const PROBE_SQL: &str = "select pg_is_in_recovery(), \
    (case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)::text, \
    coalesce((case when not pg_is_in_recovery() \
        or pg_last_wal_receive_lsn() is not distinct from pg_last_wal_replay_lsn() then 0 \
        else extract(epoch from now() - pg_last_xact_replay_timestamp()) * 1000 end)::bigint, 0)";

/// A checker's connection (one per probe).
struct Checker {
    conn_string: String,
    /// TLS to the servers, and the mode for this node (`tls.backend`, or the node's `tls`).
    tls: crate::backend_tls::BackendTls,
    mode: crate::config::BackendTlsMode,
    host: String,
    port: u16,
    client: Option<tokio_postgres::Client>,
}

impl Checker {
    async fn probe(&mut self) -> Result<Probe, ProbeError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let config: tokio_postgres::Config = self.conn_string.parse()?;
            let client = self
                .tls
                .connect_postgres(self.mode, &self.host, self.port, &config)
                .await
                .map_err(|e| ProbeError::Link(e.to_string()))?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let row = client.query_one(PROBE_SQL, &[]).await?;
        let in_recovery: bool = row.get(0);
        let lsn: Option<String> = row.get(1);
        let lag_ms: i64 = row.get(2);
        let role = if in_recovery { Role::Standby } else { Role::Primary };
        let mut replication = Vec::new();
        if role == Role::Primary {
            for r in client
                .query(
                    "select application_name, coalesce(state, ''), coalesce(sync_state, '') from pg_stat_replication",
                    &[],
                )
                .await?
            {
                replication.push((r.get(0), r.get(1), r.get(2)));
            }
        }
        Ok(Probe {
            role,
            lsn: lsn.as_deref().and_then(parse_lsn),
            lag_ms: lag_ms.max(0) as u64,
            replication,
        })
    }
}

/// The connection string a checker of `node` (or its replay-position refresher, by
/// `application_name`) uses with `config`.
pub(crate) fn conn_string(
    node: &crate::config::NodeConfig,
    config: &HealthConfig,
    application_name: &str,
) -> String {
    let mut s = format!(
        "host={} port={} user={} dbname={} application_name={} connect_timeout={}",
        node.host,
        node.port,
        quote(&config.user),
        quote(&config.database),
        application_name,
        config.timeout.ceil().max(1.0) as u64
    );
    if !config.password.is_empty() {
        s.push_str(&format!(" password={}", quote(&config.password)));
    }
    s
}

fn thresholds(config: &HealthConfig) -> Thresholds {
    Thresholds {
        rise: config.rise,
        fall: config.fall,
    }
}

fn interval_for(config: &HealthConfig) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(secs(config.period));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// Runs the checker of node `i` until `shutdown`, with the cluster's health settings; new
/// settings (a reload) apply from the next check, which then runs at once.
pub async fn run(cluster: Arc<Cluster>, i: usize, shutdown: Shutdown) {
    let node = &cluster.nodes[i].config;
    let mut settings = cluster.watch_health();
    let mut config = settings.borrow_and_update().clone();
    let mut checker = Checker {
        conn_string: conn_string(node, &config, "dbproxy-health"),
        tls: cluster.backend_tls.clone(),
        mode: cluster.backend_tls.mode_for(node),
        host: node.host.clone(),
        port: node.port,
        client: None,
    };
    // Nodes configured at start are assumed up until checked; one added by a reload is down
    // until its first passing checks.
    let mut state = HealthState::new(thresholds(&config), cluster.status(i).healthy);
    let mut ticker = interval_for(&config);
    let mut claimed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            _ = cluster.nodes[i].reprobe.notified() => {
                tracing::debug!(node = %cluster.nodes[i].config.name, "data-path error: checking now");
                ticker.reset();
            }
            Ok(()) = settings.changed() => {
                config = settings.borrow_and_update().clone();
                checker.conn_string = conn_string(node, &config, "dbproxy-health");
                state.set_thresholds(thresholds(&config));
                ticker = interval_for(&config);
                continue;
            }
        }
        let timeout = secs(config.timeout);
        let mut result = Err(ProbeError::Timeout);
        let started = std::time::Instant::now();
        let mut retries = 0;
        for attempt in 0..=config.max_retries {
            retries = attempt;
            if attempt > 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(secs(config.retry_delay)) => {}
                }
            }
            result = match tokio::time::timeout(timeout, checker.probe()).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout),
            };
            // Every probe opens a fresh connection, as a client would: a postmaster that no
            // longer accepts sessions (frozen, out of slots) fails the check even though
            // connections opened before still answer.
            checker.client = None;
            if result.is_ok() {
                break;
            }
        }
        let name = &cluster.nodes[i].config.name;
        let checks = &cluster.nodes[i].checks;
        checks.record(
            result.is_ok(),
            retries,
            started.elapsed(),
            std::time::SystemTime::now(),
        );
        let transition = state.observe(result.is_ok());
        let healthy = state.is_healthy();
        match &transition {
            Some(Transition::Up) => tracing::info!(node = %name, "node is up"),
            Some(Transition::Down) => {
                tracing::warn!(node = %name, "node is down");
                cluster.update(i, |s| s.healthy = false);
                if cluster.elected() == Some(i) {
                    cluster.primary_down.notify_one();
                }
            }
            None => {}
        }
        if let Ok(p) = &result {
            // Only the elected node may be primary. One that claims the role otherwise (an old
            // primary restarted after a failover, a standby promoted behind dbproxy's back) is
            // fenced and reported; not while a failover promotes a candidate.
            let busy = cluster.busy.load(Ordering::Acquire);
            if p.role == Role::Primary && cluster.elected() != Some(i) {
                if cluster.is_fenced(i) {
                    if !claimed {
                        tracing::error!(node = %name, "a fenced node claims to be primary; it gets no \
                                        traffic (rejoin it as a standby, then POST /nodes/{i}/attach)");
                        claimed = true;
                    }
                } else if busy {
                    // The candidate a failover is promoting: settled when the failover ends.
                } else if cluster.elected().is_none() {
                    // The failover manager decides, by the cluster record, and records it first.
                    cluster.primary_down.notify_one();
                } else {
                    tracing::error!(node = %name, "node claims to be primary without being elected: fenced");
                    cluster.fence(i);
                    claimed = true;
                }
            } else {
                claimed = false;
            }
        }
        match result {
            Ok(p) => {
                cluster.update(i, |s| {
                    s.role = p.role;
                    s.healthy = healthy;
                    s.reachable = true;
                    s.lsn = p.lsn;
                    s.lag_ms = p.lag_ms;
                });
                cluster.nodes[i].replay.checked(p.lsn);
                if p.role == Role::Primary {
                    for (j, n) in cluster.nodes.iter().enumerate() {
                        if j == i {
                            continue;
                        }
                        let rep = p.replication.iter().find(|(app, _, _)| *app == n.config.name);
                        cluster.update(j, |s| match rep {
                            Some((_, state, sync)) => {
                                s.replication_state = state.clone();
                                s.sync_state = sync.clone();
                            }
                            None => {
                                s.replication_state.clear();
                                s.sync_state.clear();
                            }
                        });
                    }
                } else if let Some(lag) = cluster.lag_bytes(i) {
                    cluster.set_lag_gauge(i, lag);
                }
            }
            Err(e) => {
                tracing::debug!(node = %name, error = %e, "health probe failed");
                cluster.update(i, |s| {
                    s.healthy = healthy;
                    s.reachable = false;
                });
            }
        }
    }
}

/// Quotes a libpq key/value connection string value.
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// How long one health probe may take in total.
pub fn probe_budget(config: &HealthConfig) -> Duration {
    secs(config.timeout) * (config.max_retries + 1) + secs(config.retry_delay) * config.max_retries
}
