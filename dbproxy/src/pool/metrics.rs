//! The pools' Prometheus metrics (`dbproxy_pool_*`), per node: idle, active and waiting now
//! (counted from the pool state when `/metrics` is read, by a collector of their own, so that
//! checkouts and checkins never count them), pinned clients, checkouts and timeouts (counters
//! resolved once per node, at its first use, so that a checkout costs no label lookup).

use std::sync::{Arc, Mutex, OnceLock, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::cluster::Cluster;

use super::{ServerState, State};

/// One node's counters and its pinned gauge.
struct NodeMetrics {
    reused: IntCounter,
    new: IntCounter,
    timeouts: IntCounter,
    pinned: IntGauge,
}

pub(super) struct PoolMetrics {
    checkouts: IntCounterVec,
    timeouts: IntCounterVec,
    pinned: IntGaugeVec,
    /// By node index: a node never moves in `cluster.nodes`, and a reload may append some.
    nodes: Box<[OnceLock<NodeMetrics>]>,
}

fn register<T: Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::warn!(error = %e, "cannot register metric");
    }
    c
}

fn gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["node"]).expect("valid metric")
}

/// `dbproxy_pool_idle`, `_active` and `_waiting`, counted from the pool state at each read.
#[derive(Clone)]
struct Occupancy {
    state: Weak<Mutex<State>>,
    cluster: Arc<Cluster>,
    idle: IntGaugeVec,
    active: IntGaugeVec,
    waiting: IntGaugeVec,
}

impl Collector for Occupancy {
    fn desc(&self) -> Vec<&Desc> {
        [&self.idle, &self.active, &self.waiting]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let n = self.cluster.nodes.len();
        let (mut idle, mut active, mut waiting) = (vec![0i64; n], vec![0i64; n], vec![0i64; n]);
        if let Some(state) = self.state.upgrade() {
            let st = state.lock().unwrap_or_else(|e| e.into_inner());
            for p in st.pools.values().filter(|p| p.key.node < n) {
                waiting[p.key.node] += p.waiting as i64;
            }
            for s in st.servers.values().filter(|s| s.key.node < n) {
                match s.state {
                    ServerState::Idle => idle[s.key.node] += 1,
                    _ => active[s.key.node] += 1,
                }
            }
        }
        for (i, node) in self.cluster.nodes.iter().enumerate().take(n) {
            let name = &node.config.name;
            self.idle.with_label_values(&[name]).set(idle[i]);
            self.active.with_label_values(&[name]).set(active[i]);
            self.waiting.with_label_values(&[name]).set(waiting[i]);
        }
        [&self.idle, &self.active, &self.waiting]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

impl PoolMetrics {
    pub(super) fn new(r: &Registry, cluster: &Arc<Cluster>, state: Weak<Mutex<State>>) -> PoolMetrics {
        register(
            r,
            Occupancy {
                state,
                cluster: cluster.clone(),
                idle: gauge("dbproxy_pool_idle", "Idle pooled server connections, by node"),
                active: gauge(
                    "dbproxy_pool_active",
                    "Pooled server connections in use, logging in or being reset, by node",
                ),
                waiting: gauge(
                    "dbproxy_pool_waiting",
                    "Clients waiting for a server connection of a full pool, by node",
                ),
            },
        );
        let pinned = register(
            r,
            gauge(
                "dbproxy_pool_pinned",
                "Clients pinned to their server connection until they leave (a temporary table, LISTEN, a session advisory lock, ...), by node",
            ),
        );
        let checkouts = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "dbproxy_pool_checkouts_total",
                    "Server connections handed to clients, by node and whether an idle one was reused (no login) or a new one opened",
                ),
                &["node", "result"],
            )
            .expect("valid metric"),
        );
        let timeouts = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "dbproxy_pool_timeouts_total",
                    "Clients refused with 53300 after pool.checkout_timeout, by node",
                ),
                &["node"],
            )
            .expect("valid metric"),
        );
        PoolMetrics {
            checkouts,
            timeouts,
            pinned,
            nodes: (0..cluster.nodes.capacity()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Node `node`'s counters, resolved at their first use.
    fn node(&self, cluster: &Cluster, node: usize) -> Option<&NodeMetrics> {
        let slot = self.nodes.get(node)?;
        if let Some(m) = slot.get() {
            return Some(m);
        }
        let name = &cluster.nodes.get(node)?.config.name;
        Some(slot.get_or_init(|| NodeMetrics {
            reused: self.checkouts.with_label_values(&[name, "reused"]),
            new: self.checkouts.with_label_values(&[name, "new"]),
            timeouts: self.timeouts.with_label_values(&[name]),
            pinned: self.pinned.with_label_values(&[name]),
        }))
    }

    pub(super) fn checkout(&self, cluster: &Cluster, node: usize, reused: bool) {
        if let Some(m) = self.node(cluster, node) {
            if reused { &m.reused } else { &m.new }.inc();
        }
    }

    pub(super) fn pinned(&self, cluster: &Cluster, node: usize) {
        if let Some(m) = self.node(cluster, node) {
            m.pinned.inc();
        }
    }

    pub(super) fn unpinned(&self, cluster: &Cluster, node: usize) {
        if let Some(m) = self.node(cluster, node) {
            m.pinned.dec();
        }
    }

    pub(super) fn timeout(&self, cluster: &Cluster, node: usize) {
        if let Some(m) = self.node(cluster, node) {
            m.timeouts.inc();
        }
    }
}
