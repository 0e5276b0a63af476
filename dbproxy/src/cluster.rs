//! The node table: each node's configured address and weight, and what the health checker last
//! learned (role, health, WAL position, lag), plus standby selection. Selection does no I/O and
//! locks are never held across an await. A reload may change weights, lag limits and health
//! settings live, and append nodes; a node never moves or leaves the table, so an index stays valid.
//!
//! It also holds the one routing decision failover changes: which node is the *elected* primary.
//! Writes go only there. A node that was primary and lost the role, or claims to be primary without
//! having been elected, is *fenced*: never routed to again until it is re-attached. Every change of
//! the elected primary or of a fence bumps a generation that sessions watch.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use tokio::sync::{watch, Notify};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::config::{Config, HealthConfig, NodeConfig};

/// What a node says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes (`pg_is_in_recovery()` is false).
    Primary,
    /// In recovery, replaying the primary's WAL.
    Standby,
}

impl Role {
    /// The name pgpool shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }
}

/// What the health checker last learned about a node.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// The role the node reported (or was assumed to have before the first check).
    pub role: Role,
    /// Whether the rise/fall thresholds consider it up.
    pub healthy: bool,
    /// Whether the last probe reached it.
    pub reachable: bool,
    /// Its WAL position: current on a primary, replayed on a standby.
    pub lsn: Option<u64>,
    /// Milliseconds since the last replayed transaction while WAL is pending (standbys).
    pub lag_ms: u64,
    /// pg_stat_replication.state on the primary for this node.
    pub replication_state: String,
    /// pg_stat_replication.sync_state on the primary for this node.
    pub sync_state: String,
    /// When `healthy` last changed.
    pub last_change: SystemTime,
}

/// One configured node and its live status.
#[derive(Debug)]
pub struct Node {
    /// Its config entry as it was when the node was added (its weight may have changed since:
    /// see [`Node::weight`]).
    pub config: NodeConfig,
    /// Load-balancing weight among standbys (0: never balanced to); changed by reloads.
    weight: AtomicU32,
    /// Live status.
    pub status: Mutex<NodeStatus>,
    /// Statements routed to it (pgpool's select_cnt counts reads; this counts reads too).
    pub select_cnt: AtomicU64,
    /// Never routed to (a lost or false primary) until re-attached.
    fenced: AtomicBool,
    /// Wakes the node's health checker for a check now (a data-path error was seen).
    pub reprobe: Notify,
    /// Its health-check statistics (pgpool's SHOW POOL_HEALTH_CHECK_STATS).
    pub checks: crate::health_stats::HealthStats,
    /// Its WAL replay position as last learnt, for causal reads.
    pub replay: crate::replay_position::ReplayPosition,
    queries: [IntCounter; 2],
    healthy_gauge: IntGauge,
    lag_gauge: IntGauge,
    primary_gauge: IntGauge,
}

impl Node {
    /// Counts one statement run here in role `role`.
    pub fn count_query(&self, role: Role) {
        self.queries[role as usize].inc();
    }

    /// The load-balancing weight in force.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }
}

/// How many nodes the table holds at most (pgpool-II's limit, MAX_NUM_BACKENDS), unless the
/// configuration at start-up has more.
pub const MAX_NODES: usize = 128;

/// The nodes in config order. Slots are filled in order and never moved or emptied, so a `&Node`
/// stays valid while a reload appends nodes behind it; indexing works as on a `Vec`.
#[derive(Debug)]
pub struct Nodes {
    slots: Box<[OnceLock<Node>]>,
    len: AtomicUsize,
}

impl Nodes {
    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether there is none (only before a configuration was loaded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many nodes the table can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Node `i`, if it exists.
    pub fn get(&self, i: usize) -> Option<&Node> {
        if i < self.len() {
            self.slots[i].get()
        } else {
            None
        }
    }

    /// The nodes in order.
    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.slots[..self.len()].iter().filter_map(OnceLock::get)
    }

    /// Appends a node (the caller serialises appends); `None` when the table is full.
    fn push(&self, node: Node) -> Option<usize> {
        let i = self.len();
        self.slots.get(i)?.set(node).ok()?;
        self.len.store(i + 1, Ordering::Release);
        Some(i)
    }
}

impl std::ops::Index<usize> for Nodes {
    type Output = Node;

    fn index(&self, i: usize) -> &Node {
        self.get(i).expect("node index out of range")
    }
}

/// Routing decisions, counted by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A sure read sent to a standby.
    Standby,
    /// A write or an unsure statement.
    PrimaryWrite,
    /// Inside an explicit transaction held by the primary.
    PrimaryTransaction,
    /// The session is pinned (temp tables, LISTEN, advisory locks, write stickiness).
    PrimaryPinned,
    /// No standby qualified.
    PrimaryFallback,
    /// A standby refused with 25006 and the statement was replayed on the primary.
    Replay,
}

/// Process-wide metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Open client connections.
    pub connections: IntGauge,
    /// Accepted client connections.
    pub connections_total: IntCounter,
    /// SCRAM client keys derived from configured passwords (PBKDF2 runs), for backend logins.
    pub scram_key_derivations: IntCounter,
    decisions: [IntCounter; 6],
    errors: IntCounterVec,
}

impl Metrics {
    /// Counts a routing decision.
    pub fn decision(&self, d: Decision) {
        self.decisions[d as usize].inc();
    }

    /// Counts an error of `kind` (protocol, auth, backend, timeout, limit).
    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }
}

/// Every node plus selection state.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes in config order (their index is pgpool's node_id).
    pub nodes: Nodes,
    /// TLS to the nodes (`[tls]`'s `backend*` keys, fixed at start).
    pub backend_tls: crate::backend_tls::BackendTls,
    /// Metrics shared by sessions.
    pub metrics: Metrics,
    /// `limits.max_message_memory` and what client messages hold of it (every configuration
    /// generation shares it; a reload changes its limit).
    pub message_budget: Arc<crate::memory::Budget>,
    /// Smooth weighted round robin state, one value per node; its lock also serialises appends.
    wrr: Mutex<Vec<i64>>,
    max_lag_bytes: AtomicU64,
    max_lag_ms: AtomicU64,
    /// The health-check settings in force (health checkers and the failover manager watch them).
    health: watch::Sender<HealthConfig>,
    node_metrics: NodeMetrics,
    /// The elected primary's index, or [`NONE`].
    elected: AtomicUsize,
    /// Bumped on every change of the elected primary or of a fence.
    generation: watch::Sender<u64>,
    /// A failover or switchover is running: health checks do not fence the node being promoted.
    pub busy: AtomicBool,
    /// Wakes the failover manager: the elected primary was marked down, or a node reports
    /// primary while none is elected.
    pub primary_down: Notify,
    fenced_gauge: IntGaugeVec,
}

/// No elected primary.
const NONE: usize = usize::MAX;

/// The per-node metric families, kept to label nodes added by a reload.
#[derive(Debug)]
struct NodeMetrics {
    queries: IntCounterVec,
    healthy: IntGaugeVec,
    lag: IntGaugeVec,
    primary: IntGaugeVec,
}

impl NodeMetrics {
    /// Node `config`'s entry, with `healthy` assumed until its first check and `role` assumed.
    fn node(&self, config: &NodeConfig, role: Role, healthy: bool) -> Node {
        let n = config;
        let node = Node {
            config: n.clone(),
            weight: AtomicU32::new(n.weight),
            status: Mutex::new(NodeStatus {
                role,
                healthy,
                reachable: healthy,
                lsn: None,
                lag_ms: 0,
                replication_state: String::new(),
                sync_state: String::new(),
                last_change: SystemTime::now(),
            }),
            select_cnt: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            reprobe: Notify::new(),
            checks: Default::default(),
            replay: Default::default(),
            queries: [
                self.queries.with_label_values(&[&n.name, "primary"]),
                self.queries.with_label_values(&[&n.name, "standby"]),
            ],
            healthy_gauge: self.healthy.with_label_values(&[&n.name]),
            lag_gauge: self.lag.with_label_values(&[&n.name]),
            primary_gauge: self.primary.with_label_values(&[&n.name]),
        };
        node.healthy_gauge.set(healthy as i64);
        node.primary_gauge.set((role == Role::Primary) as i64);
        node
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::warn!(error = %e, "cannot register metric");
    }
    c
}

impl Cluster {
    /// How to reach node `i` (its address and TLS settings).
    pub fn target(&self, i: usize) -> crate::backend::Target<'_> {
        crate::backend::Target::new(&self.nodes[i].config, &self.backend_tls)
    }

    /// Builds the table from `config`: node 0 is assumed primary and the others standbys until
    /// the first health check says otherwise; every node starts healthy.
    pub fn new(config: &Config, registry: &Registry) -> Cluster {
        let queries = register(
            registry,
            IntCounterVec::new(
                Opts::new("dbproxy_queries_total", "Statements routed, by node and role"),
                &["node", "role"],
            )
            .expect("valid metric"),
        );
        let healthy = register(
            registry,
            IntGaugeVec::new(
                Opts::new("dbproxy_node_healthy", "1 when the node is up"),
                &["node"],
            )
            .expect("valid metric"),
        );
        let lag = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "dbproxy_node_lag_bytes",
                    "WAL bytes a standby is behind the primary",
                ),
                &["node"],
            )
            .expect("valid metric"),
        );
        let primary = register(
            registry,
            IntGaugeVec::new(
                Opts::new("dbproxy_node_primary", "1 when the node is the primary"),
                &["node"],
            )
            .expect("valid metric"),
        );
        let decisions = register(
            registry,
            IntCounterVec::new(
                Opts::new("dbproxy_routing_decisions_total", "Routing decisions by reason"),
                &["decision"],
            )
            .expect("valid metric"),
        );
        let errors = register(
            registry,
            IntCounterVec::new(Opts::new("dbproxy_errors_total", "Errors by kind"), &["kind"])
                .expect("valid metric"),
        );
        let connections = register(
            registry,
            IntGauge::new("dbproxy_connections", "Open client connections").expect("valid metric"),
        );
        let scram_key_derivations = register(registry, crate::auth::derivations_counter());
        let message_memory = register(
            registry,
            IntGauge::new(
                "dbproxy_message_memory_bytes",
                "Bytes charged to limits.max_message_memory by client messages larger than 1 MiB",
            )
            .expect("valid metric"),
        );
        let connections_total = register(
            registry,
            IntCounter::new("dbproxy_connections_total", "Accepted client connections")
                .expect("valid metric"),
        );
        let fenced_gauge = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "dbproxy_node_fenced",
                    "1 when the node is fenced (never routed to)",
                ),
                &["node"],
            )
            .expect("valid metric"),
        );
        let node_metrics = NodeMetrics {
            queries,
            healthy,
            lag,
            primary,
        };
        let nodes = Nodes {
            slots: (0..MAX_NODES.max(config.nodes.len()))
                .map(|_| OnceLock::new())
                .collect(),
            len: AtomicUsize::new(0),
        };
        for (i, n) in config.nodes.iter().enumerate() {
            let role = if i == 0 { Role::Primary } else { Role::Standby };
            nodes.push(node_metrics.node(n, role, true));
        }
        let d = |name: &str| decisions.with_label_values(&[name]);
        let backend_tls = crate::backend_tls::BackendTls::new(&config.tls).unwrap_or_else(|e| {
            // Validation read the CA file a moment ago: fail closed if it went away since.
            tracing::error!(error = %e, "tls.backend_ca_file: encrypted server connections will fail");
            crate::backend_tls::BackendTls::broken(&config.tls, e.to_string())
        });
        Cluster {
            backend_tls,
            message_budget: Arc::new(crate::memory::Budget::new(
                config.limits.max_message_memory,
                message_memory,
            )),
            wrr: Mutex::new(vec![0; nodes.len()]),
            nodes,
            health: watch::Sender::new(config.health.clone()),
            node_metrics,
            metrics: Metrics {
                connections,
                connections_total,
                scram_key_derivations,
                decisions: [
                    d("standby"),
                    d("primary_write"),
                    d("primary_transaction"),
                    d("primary_pinned"),
                    d("primary_fallback"),
                    d("replay_25006"),
                ],
                errors,
            },
            max_lag_bytes: AtomicU64::new(config.routing.max_replica_lag_bytes),
            max_lag_ms: AtomicU64::new(config.routing.max_replica_lag_ms),
            elected: AtomicUsize::new(NONE),
            generation: watch::Sender::new(0),
            busy: AtomicBool::new(false),
            primary_down: Notify::new(),
            fenced_gauge,
        }
    }

    /// Appends a node (a reload added it): a standby, down until its first passing health
    /// checks; `None` when the table is full.
    pub fn add_node(&self, config: &NodeConfig) -> Option<usize> {
        let mut wrr = self.wrr.lock().expect("wrr poisoned");
        let node = self.node_metrics.node(config, Role::Standby, false);
        wrr.push(0);
        let i = self.nodes.push(node);
        if i.is_none() {
            wrr.pop();
        }
        i
    }

    /// Sets node `i`'s load-balancing weight.
    pub fn set_weight(&self, i: usize, weight: u32) {
        self.nodes[i].weight.store(weight, Ordering::Relaxed);
    }

    /// The health-check settings in force.
    pub fn health(&self) -> HealthConfig {
        self.health.borrow().clone()
    }

    /// A receiver that sees every change of the health-check settings.
    pub fn watch_health(&self) -> watch::Receiver<HealthConfig> {
        self.health.subscribe()
    }

    /// Puts new health-check settings in force (the checkers pick them up at once).
    pub fn set_health(&self, health: &HealthConfig) {
        self.health.send_if_modified(|h| {
            let changed = h != health;
            if changed {
                *h = health.clone();
            }
            changed
        });
    }

    /// Sets the replication-lag limits beyond which a standby gets no reads (0: none).
    pub fn set_lag_limits(&self, bytes: u64, ms: u64) {
        self.max_lag_bytes.store(bytes, Ordering::Relaxed);
        self.max_lag_ms.store(ms, Ordering::Relaxed);
    }

    /// The elected primary, if there is one (none before discovery, during a switchover, or
    /// after a failover that found no candidate).
    pub fn elected(&self) -> Option<usize> {
        let e = self.elected.load(Ordering::Acquire);
        (e != NONE).then_some(e)
    }

    /// Makes `i` the primary writes go to (it is unfenced and its role set to primary).
    pub fn elect(&self, i: usize) {
        self.nodes[i].fenced.store(false, Ordering::Release);
        self.fenced_gauge
            .with_label_values(&[&self.nodes[i].config.name])
            .set(0);
        self.update(i, |s| s.role = Role::Primary);
        self.elected.store(i, Ordering::Release);
        self.bump();
    }

    /// Stops routing writes anywhere until the next [`Cluster::elect`] (sessions wait).
    pub fn unelect(&self) {
        self.elected.store(NONE, Ordering::Release);
        self.bump();
    }

    /// Fences node `i`: it gets no traffic until re-attached.
    pub fn fence(&self, i: usize) {
        self.nodes[i].fenced.store(true, Ordering::Release);
        self.fenced_gauge
            .with_label_values(&[&self.nodes[i].config.name])
            .set(1);
        let _ = self
            .elected
            .compare_exchange(i, NONE, Ordering::AcqRel, Ordering::Acquire);
        self.bump();
    }

    /// Lifts node `i`'s fence (it rejoined as a standby).
    pub fn unfence(&self, i: usize) {
        self.nodes[i].fenced.store(false, Ordering::Release);
        self.fenced_gauge
            .with_label_values(&[&self.nodes[i].config.name])
            .set(0);
        self.bump();
    }

    /// Whether node `i` is fenced.
    pub fn is_fenced(&self, i: usize) -> bool {
        self.nodes[i].fenced.load(Ordering::Acquire)
    }

    /// Routes writes to `new` and fences `old`, as one step: no moment exists in which both or
    /// neither would take writes from a session that checks the generation.
    pub fn switch_primary(&self, new: usize, old: usize) {
        self.nodes[old].fenced.store(true, Ordering::Release);
        self.fenced_gauge
            .with_label_values(&[&self.nodes[old].config.name])
            .set(1);
        self.nodes[new].fenced.store(false, Ordering::Release);
        self.update(new, |s| s.role = Role::Primary);
        self.elected.store(new, Ordering::Release);
        self.bump();
    }

    /// A receiver that sees every change of the elected primary or of a fence.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// A data-path error on node `i`: its health checker checks it now rather than next period.
    pub fn suspect(&self, i: usize) {
        self.nodes[i].reprobe.notify_one();
    }

    /// A copy of node `i`'s status.
    pub fn status(&self, i: usize) -> NodeStatus {
        self.nodes[i].status.lock().expect("status poisoned").clone()
    }

    /// Records what a probe of node `i` learned (healthy is the thresholded state).
    pub fn update(&self, i: usize, f: impl FnOnce(&mut NodeStatus)) {
        let node = &self.nodes[i];
        let mut s = node.status.lock().expect("status poisoned");
        let was = s.healthy;
        f(&mut s);
        if s.healthy != was {
            s.last_change = SystemTime::now();
        }
        node.healthy_gauge.set(s.healthy as i64);
        node.primary_gauge.set((s.role == Role::Primary) as i64);
    }

    /// The node shown as primary: the elected one; while there is none, the first unfenced node
    /// reporting primary (healthy first), else node 0. Sessions route writes only to
    /// [`Cluster::elected`].
    pub fn primary(&self) -> usize {
        if let Some(e) = self.elected() {
            return e;
        }
        let mut first = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if self.is_fenced(i) {
                continue;
            }
            let s = n.status.lock().expect("status poisoned");
            if s.role == Role::Primary {
                if s.healthy {
                    return i;
                }
                first.get_or_insert(i);
            }
        }
        first.unwrap_or(0)
    }

    /// How far standby `i` is behind the primary, in bytes, if both positions are known.
    pub fn lag_bytes(&self, i: usize) -> Option<u64> {
        let p = self.primary();
        let primary_lsn = self.nodes[p].status.lock().expect("status poisoned").lsn?;
        let s = self.nodes[i].status.lock().expect("status poisoned");
        if s.role != Role::Standby {
            return None;
        }
        Some(primary_lsn.saturating_sub(s.lsn?))
    }

    /// Whether standby `i` may take reads now: a healthy standby with weight, within the lag limits.
    pub fn eligible(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        if n.weight() == 0 || self.is_fenced(i) || self.elected() == Some(i) {
            return false;
        }
        let max_lag_ms = self.max_lag_ms.load(Ordering::Relaxed);
        let max_lag_bytes = self.max_lag_bytes.load(Ordering::Relaxed);
        let (ok, lag_ms) = {
            let s = n.status.lock().expect("status poisoned");
            (s.healthy && s.role == Role::Standby, s.lag_ms)
        };
        if !ok || (max_lag_ms > 0 && lag_ms > max_lag_ms) {
            return false;
        }
        if max_lag_bytes > 0 {
            let lag = self.lag_bytes(i).unwrap_or(0);
            n.lag_gauge.set(lag as i64);
            if lag > max_lag_bytes {
                return false;
            }
        }
        true
    }

    /// Whether standby `i` has replayed WAL up to `lsn`, as last learnt (its health check, or
    /// its replay-position refresher).
    pub fn replayed(&self, i: usize, lsn: u64) -> bool {
        self.nodes[i].replay.reached(lsn)
    }

    /// Picks a standby for a new session connection by smooth weighted round robin among the
    /// eligible ones that have replayed up to `min_lsn` (when given); `None` when none qualifies.
    pub fn pick_standby(&self, min_lsn: Option<u64>) -> Option<usize> {
        let candidates: Vec<(usize, u32)> = (0..self.nodes.len())
            .filter(|&i| self.eligible(i) && min_lsn.is_none_or(|l| self.replayed(i, l)))
            .map(|i| (i, self.nodes[i].weight()))
            .collect();
        let mut cur = self.wrr.lock().expect("wrr poisoned");
        smooth_wrr(&mut cur, &candidates)
    }

    /// Sets the lag gauge of node `i`.
    pub fn set_lag_gauge(&self, i: usize, lag: u64) {
        self.nodes[i].lag_gauge.set(lag as i64);
    }

    /// Counts a statement routed to node `i`.
    pub fn count(&self, i: usize, role: Role) {
        let n = &self.nodes[i];
        n.count_query(role);
        n.select_cnt.fetch_add(1, Ordering::Relaxed);
    }
}

/// Smooth weighted round robin (nginx's): every candidate gains its weight, the largest wins and
/// pays back the total. `current` holds one running value per node index.
pub fn smooth_wrr(current: &mut [i64], candidates: &[(usize, u32)]) -> Option<usize> {
    let total: i64 = candidates.iter().map(|&(_, w)| w as i64).sum();
    if total == 0 {
        return None;
    }
    let mut best: Option<usize> = None;
    for &(i, w) in candidates {
        current[i] += w as i64;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// Parses an LSN (`16/B374D848`) into a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_order() {
        let mut cur = vec![0; 4];
        let picks: Vec<usize> = (0..7)
            .map(|_| smooth_wrr(&mut cur, &[(1, 5), (2, 1), (3, 1)]).unwrap())
            .collect();
        assert_eq!(picks, vec![1, 1, 2, 1, 3, 1, 1]);
        assert_eq!(smooth_wrr(&mut cur, &[]), None);
        assert_eq!(smooth_wrr(&mut cur, &[(1, 0)]), None);
    }

    #[test]
    fn lsn() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("x"), None);
    }

    fn cluster(weights: &[u32]) -> Cluster {
        let config = Config {
            nodes: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| NodeConfig {
                    name: format!("n{i}"),
                    weight: w,
                    ..NodeConfig::default()
                })
                .collect(),
            ..Config::default()
        };
        Cluster::new(&config, &Registry::new())
    }

    #[test]
    fn eligibility_follows_health_weight_and_role() {
        let c = cluster(&[1, 1, 0, 1]);
        assert_eq!(c.primary(), 0);
        assert!(!c.eligible(0), "the primary is not a standby");
        assert!(c.eligible(1));
        assert!(!c.eligible(2), "weight 0 is never balanced to");
        c.update(3, |s| s.healthy = false);
        let picks: Vec<_> = (0..3).map(|_| c.pick_standby(None)).collect();
        assert_eq!(picks, vec![Some(1); 3]);
        c.update(1, |s| s.healthy = false);
        assert_eq!(c.pick_standby(None), None);
    }

    #[test]
    fn switching_fences_the_old_primary_and_bumps_the_generation() {
        let c = cluster(&[1, 1, 1]);
        assert_eq!(c.elected(), None);
        let rx = c.subscribe();
        c.elect(0);
        assert_eq!(c.elected(), Some(0));
        c.switch_primary(1, 0);
        assert_eq!(c.elected(), Some(1));
        assert_eq!(c.primary(), 1);
        assert!(c.is_fenced(0));
        assert!(!c.eligible(0), "a fenced node takes no reads");
        assert!(!c.eligible(1), "the primary is not a standby");
        assert!(c.eligible(2));
        assert_eq!(*rx.borrow(), 2);
        c.fence(1);
        assert_eq!(c.elected(), None, "fencing the primary unelects it");
        c.unfence(0);
        assert!(!c.is_fenced(0));
    }

    #[test]
    fn weights_change_and_nodes_are_added_live() {
        let c = cluster(&[1, 1]);
        let held = &c.nodes[1];
        assert_eq!(c.pick_standby(None), Some(1));
        c.set_weight(1, 0);
        assert_eq!(c.pick_standby(None), None, "weight 0 is never balanced to");
        let added = NodeConfig {
            name: "n2".into(),
            ..NodeConfig::default()
        };
        assert_eq!(c.add_node(&added), Some(2));
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(held.config.name, "n1", "references stay valid");
        assert!(!c.eligible(2), "an added node is down until checked");
        c.update(2, |s| s.healthy = true);
        assert_eq!(c.pick_standby(None), Some(2));
        let names: Vec<&str> = c.nodes.iter().map(|n| n.config.name.as_str()).collect();
        assert_eq!(names, ["n0", "n1", "n2"]);
        assert!(c.nodes.get(3).is_none());
        while c.nodes.len() < c.nodes.capacity() {
            assert!(c.add_node(&added).is_some());
        }
        assert_eq!(c.add_node(&added), None, "a full table refuses more");
    }

    #[test]
    fn lag_limit_skips_a_standby() {
        let mut config = Config {
            nodes: vec![NodeConfig::default(), NodeConfig::default()],
            ..Config::default()
        };
        config.routing.max_replica_lag_bytes = 100;
        let c = Cluster::new(&config, &Registry::new());
        c.update(0, |s| s.lsn = Some(1000));
        c.update(1, |s| s.lsn = Some(950));
        assert!(c.eligible(1));
        c.update(1, |s| s.lsn = Some(800));
        assert!(!c.eligible(1));
    }
}
