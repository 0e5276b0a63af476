//! The pools' Prometheus metrics (`dbproxy_pool_*`), per node: idle, active and waiting now
//! (recomputed from the pool state at each change of a node's pools), pinned clients, checkouts
//! and timeouts.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::cluster::Cluster;

use super::{ServerState, State};

pub(super) struct PoolMetrics {
    idle: IntGaugeVec,
    active: IntGaugeVec,
    waiting: IntGaugeVec,
    pinned: IntGaugeVec,
    checkouts: IntCounterVec,
    timeouts: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::warn!(error = %e, "cannot register metric");
    }
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), &["node"]).expect("valid metric"),
    )
}

impl PoolMetrics {
    pub(super) fn new(r: &Registry) -> PoolMetrics {
        PoolMetrics {
            idle: gauge(r, "dbproxy_pool_idle", "Idle pooled server connections, by node"),
            active: gauge(
                r,
                "dbproxy_pool_active",
                "Pooled server connections in use, logging in or being reset, by node",
            ),
            waiting: gauge(
                r,
                "dbproxy_pool_waiting",
                "Clients waiting for a server connection of a full pool, by node",
            ),
            pinned: gauge(
                r,
                "dbproxy_pool_pinned",
                "Clients pinned to their server connection until they leave (a temporary table, LISTEN, a session advisory lock, ...), by node",
            ),
            checkouts: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dbproxy_pool_checkouts_total",
                        "Server connections handed to clients, by node and whether an idle one was reused (no login) or a new one opened",
                    ),
                    &["node", "result"],
                )
                .expect("valid metric"),
            ),
            timeouts: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dbproxy_pool_timeouts_total",
                        "Clients refused with 53300 after pool.checkout_timeout, by node",
                    ),
                    &["node"],
                )
                .expect("valid metric"),
            ),
        }
    }

    /// Recomputes node `node`'s gauges from `st`.
    pub(super) fn refresh(&self, st: &State, node: usize, cluster: &Cluster) {
        let (mut idle, mut busy, mut waiting) = (0i64, 0i64, 0i64);
        for p in st.pools.values().filter(|p| p.key.node == node) {
            waiting += p.waiting as i64;
        }
        for s in st.servers.values().filter(|s| s.key.node == node) {
            match s.state {
                ServerState::Idle => idle += 1,
                _ => busy += 1,
            }
        }
        let name = &cluster.nodes[node].config.name;
        self.idle.with_label_values(&[name]).set(idle);
        self.active.with_label_values(&[name]).set(busy);
        self.waiting.with_label_values(&[name]).set(waiting);
    }

    pub(super) fn checkout(&self, cluster: &Cluster, node: usize, reused: bool) {
        let name = &cluster.nodes[node].config.name;
        let result = if reused { "reused" } else { "new" };
        self.checkouts.with_label_values(&[name, result]).inc();
    }

    pub(super) fn pinned(&self, cluster: &Cluster, node: usize) {
        self.pinned
            .with_label_values(&[&cluster.nodes[node].config.name])
            .inc();
    }

    pub(super) fn unpinned(&self, cluster: &Cluster, node: usize) {
        self.pinned
            .with_label_values(&[&cluster.nodes[node].config.name])
            .dec();
    }

    pub(super) fn timeout(&self, cluster: &Cluster, node: usize) {
        self.timeouts
            .with_label_values(&[&cluster.nodes[node].config.name])
            .inc();
    }
}
