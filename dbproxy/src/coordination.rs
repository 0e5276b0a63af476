//! Several dbproxy instances for one cluster, coordinated through etcd (as Patroni does; no
//! consensus of our own). They share the cluster record ([`crate::etcd_store`]) and one leader
//! key, `{prefix}/leader`, bound to the holder's etcd lease: only the holder runs failover,
//! switchover, fencing and rejoin; the others follow the record and switch their routing when it
//! changes. Each instance also publishes its health view of the nodes at
//! `{prefix}/health/{name}`, bound to its lease, for `failover_quorum` and the dashboard.
//!
//! The leader renews its lease every third of the TTL and counts itself leader only until two
//! thirds of the TTL after the last renewal it *sent* that etcd confirmed: a leader cut off from
//! etcd stops acting well before etcd lets the lease run out and another instance takes over.
//! An instance that loses etcd keeps routing to the recorded primary and never promotes; it says
//! so in `/status`, the log and `/metrics` (`dbproxy_etcd_reachable`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{ConfigError, Shutdown};
use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchStream};
use prometheus::{IntCounter, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::etcd_store::EtcdStore;
use crate::record::ClusterRecord;

/// `coordination`: several dbproxy instances sharing the cluster record and a leader lease in
/// etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinationConfig {
    /// etcd client URLs (`http://host:2379`); empty keeps the single-instance behaviour with the
    /// record in `state_dir`. Changing it needs a restart.
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd: the record is `{prefix}/record`, the leader key
    /// `{prefix}/leader`, health views `{prefix}/health/{name}`. Every instance of one cluster
    /// uses the same prefix.
    pub prefix: String,
    /// Seconds the leader lease lives without renewal (whole seconds, at least 2): how long a dead
    /// leader keeps the others from taking over.
    pub lease_ttl: u64,
    /// This instance's name in etcd (the leader key's value, its health view's key); empty means
    /// `{hostname}-{pid}`. Must differ between instances.
    pub name: String,
    /// Fail the primary over only when a majority of the instances' published health views see
    /// it down too (the leader's own view always counts).
    pub failover_quorum: bool,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        CoordinationConfig {
            etcd: Vec::new(),
            prefix: "/ha-stack/dbproxy".into(),
            lease_ttl: 10,
            name: String::new(),
            failover_quorum: false,
        }
    }
}

impl CoordinationConfig {
    /// Checks the keys, naming the one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, u) in self.etcd.iter().enumerate() {
            let rest = u.strip_prefix("http://").unwrap_or("");
            if rest.is_empty() || rest.contains('/') {
                return Err(ConfigError::invalid(
                    format!("coordination.etcd.{i}"),
                    format!("`{u}` is not an http://host:port URL"),
                ));
            }
        }
        let p = &self.prefix;
        if !p.starts_with('/') || p.ends_with('/') || p.len() < 2 {
            return Err(ConfigError::invalid(
                "coordination.prefix",
                format!("`{p}` must start with `/` and not end with one"),
            ));
        }
        if !(2..=3600).contains(&self.lease_ttl) {
            return Err(ConfigError::invalid(
                "coordination.lease_ttl",
                "must be between 2 and 3600 seconds",
            ));
        }
        if self.name.contains('/') {
            return Err(ConfigError::invalid("coordination.name", "must not contain `/`"));
        }
        Ok(())
    }

    /// The instance name: `name`, or `{hostname}-{pid}`.
    pub fn instance_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "dbproxy".into());
        format!("{host}-{}", std::process::id())
    }
}

/// What this instance knows of etcd and the lease.
#[derive(Debug)]
struct State {
    /// Until when this instance may act as the leader (`None`: it is not the leader).
    leader_until: Option<Instant>,
    /// The leader key's holder as last read.
    leader: Option<String>,
    /// Whether the last exchange with etcd succeeded.
    reachable: bool,
    /// Since when `reachable` has its value.
    since: SystemTime,
    /// The last error talking to etcd.
    error: Option<String>,
    /// The etcd lease this instance holds (0: none).
    lease: i64,
}

/// This instance's part in the coordination: the lease, leadership, the health view.
pub struct Coordinator {
    name: String,
    client: Client,
    store: Arc<EtcdStore>,
    ttl: Duration,
    leader_key: String,
    health_prefix: String,
    quorum: bool,
    cluster: Arc<Cluster>,
    state: Mutex<State>,
    /// The newest cluster record etcd holds, as the watch sees it.
    pub records: watch::Sender<Option<ClusterRecord>>,
    leader_gauge: IntGauge,
    reachable_gauge: IntGauge,
    lost_total: IntCounter,
    quorum_refused: IntCounter,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("name", &self.name)
            .field("leader_key", &self.leader_key)
            .finish_non_exhaustive()
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    if let Err(e) = registry.register(Box::new(m.clone())) {
        tracing::warn!(error = %e, "cannot register metric");
    }
    m
}

impl Coordinator {
    /// The coordinator for `store`'s etcd with `config`, guarding `store`'s writes with the
    /// leader key. Nothing is sent before [`Coordinator::tick`].
    pub fn new(
        config: &CoordinationConfig,
        store: Arc<EtcdStore>,
        cluster: Arc<Cluster>,
        registry: &Registry,
    ) -> Coordinator {
        let name = config.instance_name();
        let leader_key = format!("{}/leader", config.prefix);
        store.set_guard(&leader_key, None);
        let gauge = |n: &str, h: &str| IntGauge::new(n, h).expect("valid metric");
        Coordinator {
            client: store.client(),
            store,
            ttl: Duration::from_secs(config.lease_ttl),
            health_prefix: format!("{}/health/", config.prefix),
            leader_key,
            quorum: config.failover_quorum,
            cluster,
            state: Mutex::new(State {
                leader_until: None,
                leader: None,
                reachable: true,
                since: SystemTime::now(),
                error: None,
                lease: 0,
            }),
            records: watch::Sender::new(None),
            leader_gauge: register(
                registry,
                gauge(
                    "dbproxy_leader",
                    "1 while this instance holds the leader lease and may act",
                ),
            ),
            reachable_gauge: register(
                registry,
                gauge(
                    "dbproxy_etcd_reachable",
                    "1 while the last exchange with etcd succeeded",
                ),
            ),
            lost_total: register(
                registry,
                IntCounter::new(
                    "dbproxy_leader_lost_total",
                    "Times this instance stopped being the leader",
                )
                .expect("valid metric"),
            ),
            quorum_refused: register(
                registry,
                IntCounter::new(
                    "dbproxy_failover_quorum_refused_total",
                    "Times the leader saw the primary down but a majority of instances did not, so it did not fail over",
                )
                .expect("valid metric"),
            ),
            name,
        }
    }

    /// This instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this instance holds the leader lease now, with time to spare.
    pub fn is_leader(&self) -> bool {
        let s = self.state.lock().expect("state poisoned");
        s.leader_until.is_some_and(|t| Instant::now() < t)
    }

    /// The leader as last seen (`None`: none, or etcd unreachable).
    pub fn leader(&self) -> Option<String> {
        self.state.lock().expect("state poisoned").leader.clone()
    }

    /// Whether the last exchange with etcd succeeded.
    pub fn reachable(&self) -> bool {
        self.state.lock().expect("state poisoned").reachable
    }

    /// The coordination state for `/status`.
    pub fn status_json(&self) -> Value {
        let leader = self.is_leader();
        let s = self.state.lock().expect("state poisoned");
        json!({
            "instance": self.name,
            "leader": s.leader,
            "is_leader": leader,
            "etcd_reachable": s.reachable,
            "etcd_since": common::time::Civil::from(s.since).iso_seconds(),
            "etcd_error": s.error,
            "lease_ttl_s": self.ttl.as_secs(),
            "failover_quorum": self.quorum,
            "mode": if leader { "leader" } else if s.reachable { "follower" }
                    else { "etcd unreachable: routing to the recorded primary, never promoting" },
        })
    }

    fn set_reachable(&self, ok: Result<(), String>) {
        let mut s = self.state.lock().expect("state poisoned");
        let now = ok.is_ok();
        if now != s.reachable {
            s.since = SystemTime::now();
            match &ok {
                Ok(()) => tracing::warn!(instance = %self.name, "etcd is reachable again"),
                Err(e) => tracing::error!(
                    instance = %self.name, error = %e,
                    "etcd is unreachable: routing stays on the recorded primary and this instance never promotes"
                ),
            }
        }
        s.reachable = now;
        s.error = ok.err();
        self.reachable_gauge.set(i64::from(now));
    }

    /// One exchange with etcd, at most a third of the TTL long: renews (or grants) the lease,
    /// takes the leader key when nobody holds it, publishes the health view. Leadership is
    /// extended only by a confirmed renewal; a failed exchange leaves it to run out.
    pub async fn tick(&self) {
        let sent = Instant::now();
        let limit = self.ttl / 3;
        let r = match tokio::time::timeout(limit, self.exchange()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("etcd did not answer within {limit:?}")),
        };
        let mut s = self.state.lock().expect("state poisoned");
        let was = s.leader_until.is_some_and(|t| Instant::now() < t);
        match &r {
            Ok((leader, ours)) => {
                s.leader = leader.clone();
                s.leader_until = ours.then(|| sent + self.ttl * 2 / 3);
                self.store.set_guard(&self.leader_key, ours.then_some(s.lease));
            }
            Err(_) => {
                if s.leader_until.is_some_and(|t| Instant::now() >= t) {
                    s.leader_until = None;
                }
            }
        }
        let now = s.leader_until.is_some_and(|t| Instant::now() < t);
        drop(s);
        self.leader_gauge.set(i64::from(now));
        if now && !was {
            tracing::warn!(instance = %self.name, "this instance holds the leader lease: it runs failover, switchover, fencing and rejoin");
        } else if was && !now {
            self.lost_total.inc();
            tracing::error!(instance = %self.name, "this instance is no longer the leader: it only follows the cluster record");
        }
        self.set_reachable(r.map(|_| ()));
    }

    /// The etcd side of [`Coordinator::tick`]: the leader key's holder, and whether it is bound
    /// to this instance's lease (a key left by this instance's previous life is not: it runs out).
    async fn exchange(&self) -> Result<(Option<String>, bool), etcd_client::Error> {
        let mut c = self.client.clone();
        let mut lease = self.state.lock().expect("state poisoned").lease;
        let mut alive = false;
        if lease != 0 {
            let renewed = async {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok::<_, etcd_client::Error>(stream.message().await?.is_some_and(|m| m.ttl() > 0))
            };
            alive = match renewed.await {
                Ok(a) => a,
                // The lease ran out while etcd was out of reach: a new one is granted below.
                Err(e) if e.to_string().contains("lease not found") => false,
                Err(e) => return Err(e),
            };
        }
        if !alive {
            lease = c.lease_grant(self.ttl.as_secs() as i64, None).await?.id();
            self.state.lock().expect("state poisoned").lease = lease;
        }
        let key = self.leader_key.as_str();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.name.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = c.txn(txn).await?;
        let (leader, ours) = if resp.succeeded() {
            (Some(self.name.clone()), true)
        } else {
            resp.op_responses()
                .into_iter()
                .find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                        let holder = String::from_utf8_lossy(kv.value()).into_owned();
                        (Some(holder), kv.lease() == lease)
                    }),
                    _ => None,
                })
                .unwrap_or((None, false))
        };
        let view: serde_json::Map<String, Value> = self
            .cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.config.name.clone(), json!(self.cluster.status(i).healthy)))
            .collect();
        let body = json!({"healthy": view, "leader": leader}).to_string();
        c.put(
            format!("{}{}", self.health_prefix, self.name),
            body,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        Ok((leader, ours))
    }

    /// Renews every third of the TTL until `shutdown`, then gives the lease back so another
    /// instance takes over at once. Between renewals it watches the leader key: when the key goes
    /// (the leader's lease ran out or was given back), the next exchange runs at once, so a
    /// follower takes the lease when it expires rather than up to a third of the TTL later.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut vacancies: Option<WatchStream> = None;
        loop {
            if vacancies.is_none() {
                vacancies = self.watch_leader_key().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.ttl / 3) => {}
                still = leader_key_deleted(&mut vacancies) => {
                    if !still {
                        vacancies = None;
                    }
                }
            }
            self.tick().await;
        }
        let lease = {
            let mut s = self.state.lock().expect("state poisoned");
            s.leader_until = None;
            std::mem::take(&mut s.lease)
        };
        self.store.set_guard(&self.leader_key, None);
        self.leader_gauge.set(0);
        if lease != 0 {
            let mut c = self.client.clone();
            let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await;
        }
    }

    /// A watch on the leader key, or `None` when etcd does not answer within a third of the TTL
    /// (the renewals go on without it and it is tried again after the next one).
    async fn watch_leader_key(&self) -> Option<WatchStream> {
        let mut c = self.client.clone();
        let watch = c.watch(self.leader_key.as_str(), None);
        match tokio::time::timeout(self.ttl / 3, watch).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot watch the leader key");
                None
            }
            Err(_) => None,
        }
    }

    /// With `failover_quorum`: whether a majority of the published health views see `node` down
    /// (views that do not know the node do not count for it). Without it: always true. Unreachable
    /// etcd: false (no failover without the quorum's word).
    pub async fn quorum_sees_down(&self, node: &str) -> bool {
        if !self.quorum {
            return true;
        }
        let mut c = self.client.clone();
        let get = c.get(self.health_prefix.as_str(), Some(GetOptions::new().with_prefix()));
        let Ok(Ok(resp)) = tokio::time::timeout(self.ttl / 3, get).await else {
            tracing::warn!(
                node,
                "cannot read the health views: no failover without the quorum"
            );
            return false;
        };
        let views: Vec<Value> = resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        let down = views
            .iter()
            .filter(|v| v["healthy"][node] == Value::Bool(false))
            .count();
        let agree = down * 2 > views.len();
        if !agree {
            self.quorum_refused.inc();
            tracing::warn!(
                node,
                down,
                instances = views.len(),
                "the primary looks down here but not to a majority of instances: no failover"
            );
        }
        agree
    }
}

/// Waits until the leader key is deleted: `true` then, `false` when the watch ended or failed
/// (it is made again); never returns without a watch.
async fn leader_key_deleted(watch: &mut Option<WatchStream>) -> bool {
    let Some(stream) = watch else {
        return std::future::pending().await;
    };
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    return false;
                }
                if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                    return true;
                }
            }
            Ok(None) | Err(_) => return false,
        }
    }
}

/// Where the record is kept, as the configuration says: the file in `state_dir`, or etcd with a
/// [`Coordinator`].
pub struct Opened {
    /// The store.
    pub store: Arc<dyn crate::record::RecordStore>,
    /// The record it held at start-up.
    pub record: Option<ClusterRecord>,
    /// With etcd: this instance's coordinator, after its first exchange.
    pub coordinator: Option<Arc<Coordinator>>,
    etcd: Option<Arc<EtcdStore>>,
}

/// Opens the record store `config` names and reads the record. With etcd, the first exchange
/// (lease, leader key) happens here, so the instance knows whether it leads before it routes.
pub async fn open(
    config: &crate::config::Config,
    cluster: &Arc<Cluster>,
    registry: &Registry,
) -> Result<Opened, crate::record::RecordError> {
    let c = &config.coordination;
    if c.etcd.is_empty() {
        let store = Arc::new(crate::record::FileStore::open(&config.state_dir)?);
        let record = crate::record::RecordStore::load(&*store).await?;
        return Ok(Opened {
            store,
            record,
            coordinator: None,
            etcd: None,
        });
    }
    let timeout = Duration::from_secs(c.lease_ttl) / 3;
    let etcd = Arc::new(EtcdStore::connect(&c.etcd, &c.prefix, timeout).await?);
    let record = crate::record::RecordStore::load(&*etcd).await?;
    let coordinator = Arc::new(Coordinator::new(c, etcd.clone(), cluster.clone(), registry));
    coordinator.tick().await;
    tracing::info!(
        instance = %coordinator.name(), leader = ?coordinator.leader(),
        store = %crate::record::RecordStore::location(&*etcd), "coordinating through etcd"
    );
    Ok(Opened {
        store: etcd.clone(),
        record,
        coordinator: Some(coordinator),
        etcd: Some(etcd),
    })
}

/// Starts the coordination tasks (lease renewal, the record watch, following it) on `tasks`, and
/// decides the primary at start-up: the leader (or a single instance) by
/// [`Manager::discover`](crate::manager::Manager::discover); a follower routes by the record.
pub async fn start(
    opened: &Opened,
    manager: &Arc<crate::manager::Manager>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: &Shutdown,
) -> Result<Option<usize>, crate::record::RecordError> {
    let (Some(coord), Some(etcd)) = (&opened.coordinator, &opened.etcd) else {
        return manager.discover().await;
    };
    manager.set_coordinator(coord.clone());
    tasks.spawn(coord.clone().run(shutdown.clone()));
    tasks.spawn({
        let (etcd, coord, shutdown) = (etcd.clone(), coord.clone(), shutdown.clone());
        async move { etcd.follow(&coord.records, &shutdown).await }
    });
    tasks.spawn({
        let (manager, coord, shutdown) = (manager.clone(), coord.clone(), shutdown.clone());
        async move {
            let mut records = coord.records.subscribe();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = records.changed() => if r.is_err() { return },
                }
                let newest = records.borrow_and_update().clone();
                if let Some(r) = newest {
                    manager.follow_record(&r);
                }
            }
        }
    });
    if coord.is_leader() {
        return manager.discover().await;
    }
    if let Some(r) = &opened.record {
        tracing::info!(leader = ?coord.leader(), primary = ?r.primary, term = r.term, "following the leader: routing by the cluster record");
        manager.apply_record(r);
    }
    Ok(None)
}
