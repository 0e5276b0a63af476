//! The live dashboard's data: lb's and dbproxy's `/status` JSON fetched server-side, merged into one
//! snapshot, and published to every Server-Sent Events subscriber; plus the switchover call to
//! dbproxy's admin API. With several dbproxy instances (coordinated through etcd) each one's
//! `/status` is read: the snapshot lists them with their part in the pair (leader or follower,
//! etcd reachable or not), and the leader's view (else the first reachable one's) is the cluster.
//! Only the instance holding the leader lease accepts a switchover, so with several admin URLs the
//! switchover goes to the one whose `/status` says it leads (see [`Dashboard::switchover`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The largest status or admin response read.
pub const MAX_STATUS_BODY: usize = 1024 * 1024;

/// Why a status fetch or the switchover failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL could not be turned into a request.
    #[error("bad url: {0}")]
    Url(String),
    /// Connecting or sending failed.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No full answer within the bound.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The body was larger than [`MAX_STATUS_BODY`] or broke off.
    #[error("bad body: {0}")]
    Body(String),
    /// The answer was not a 2xx.
    #[error("answered http {0}")]
    Status(u16),
    /// The answer was not JSON.
    #[error("not json: {0}")]
    Json(String),
}

/// One status source as the page sees it.
#[derive(Debug, Clone, serde::Serialize)]
struct Source<'a> {
    url: &'a str,
    reachable: bool,
    error: Option<String>,
    status: Option<serde_json::Value>,
}

impl Source<'_> {
    /// This dbproxy instance as the dashboard lists it: reachable or not, its name, who leads,
    /// and what it knows of etcd (from its `/status`'s `record.coordination`; null fields when it
    /// runs alone).
    fn instance(&self) -> serde_json::Value {
        let c = self
            .status
            .as_ref()
            .and_then(|s| s.pointer("/record/coordination"))
            .filter(|c| c.is_object());
        let field = |k: &str| c.and_then(|c| c.get(k)).cloned().unwrap_or_default();
        serde_json::json!({
            "url": self.url,
            "reachable": self.reachable,
            "error": self.error,
            "instance": field("instance"),
            "leader": field("leader"),
            "is_leader": field("is_leader"),
            "etcd_reachable": field("etcd_reachable"),
            "etcd_since": field("etcd_since"),
            "etcd_error": field("etcd_error"),
            "lease_ttl_s": field("lease_ttl_s"),
            "mode": field("mode"),
            "primary": self.status.as_ref().and_then(|s| s.get("primary")).cloned().unwrap_or_default(),
        })
    }
}

/// The instance whose view of the cluster the page draws: the leader's, else the first reachable
/// one's, else the first.
fn main_view<'s, 'a>(proxies: &'s [Source<'a>]) -> Option<&'s Source<'a>> {
    let leads = |p: &&Source<'_>| {
        p.status
            .as_ref()
            .and_then(|s| s.pointer("/record/coordination/is_leader"))
            .and_then(|l| l.as_bool())
            == Some(true)
    };
    proxies
        .iter()
        .find(leads)
        .or_else(|| proxies.iter().find(|p| p.reachable))
        .or_else(|| proxies.first())
}

/// Fetches status and fans snapshots out to subscribers.
pub struct Dashboard {
    client: Client<HttpConnector, Empty<Bytes>>,
    lb_url: String,
    dbproxy_urls: Vec<String>,
    admin_urls: Vec<String>,
    admin_token: String,
    operator: bool,
    instance: String,
    interval: Duration,
    timeout: Duration,
    tx: watch::Sender<Arc<str>>,
    wake: Notify,
    metrics: Arc<Metrics>,
    events: Mutex<EventLog>,
    /// The last name each dbproxy instance (by status URL) gave, so one that stops answering
    /// keeps its name on the page.
    names: Mutex<BTreeMap<String, String>>,
}

impl Dashboard {
    /// Creates the fetcher; nothing is fetched until [`Dashboard::run`] runs and someone watches.
    pub fn new(config: &crate::Config, instance: String, metrics: Arc<Metrics>) -> Dashboard {
        let timeout = Duration::from_millis(config.status_timeout_ms);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(connector);
        let (tx, _) = watch::channel(Arc::<str>::from(""));
        Dashboard {
            client,
            lb_url: config.lb_status_url.clone(),
            dbproxy_urls: config
                .dbproxy_status_urls()
                .into_iter()
                .map(str::to_string)
                .collect(),
            admin_urls: config
                .dbproxy_admin_urls()
                .into_iter()
                .map(str::to_string)
                .collect(),
            admin_token: config.dbproxy_admin_token.clone(),
            operator: !config.operator_password.is_empty(),
            instance,
            interval: Duration::from_millis(config.dashboard_interval_ms),
            timeout,
            tx,
            wake: Notify::new(),
            metrics,
            events: Mutex::new(EventLog::default()),
            names: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether the switchover is offered (to a logged-in operator): it needs dbproxy's admin URL
    /// and an operator password.
    pub fn switchover_enabled(&self) -> bool {
        !self.admin_urls.is_empty() && self.operator
    }

    /// A receiver of snapshots (JSON text; empty until the first fetch); wakes the fetcher.
    pub fn subscribe(&self) -> watch::Receiver<Arc<str>> {
        let rx = self.tx.subscribe();
        self.wake.notify_one();
        rx
    }

    /// The newest snapshot, fetching one first when none is newer than two intervals.
    pub async fn current(&self) -> Arc<str> {
        let latest = self.tx.borrow().clone();
        if let Some(at) = snapshot_time(&latest) {
            if now_ms().saturating_sub(at) < 2 * self.interval.as_millis() as u64 {
                return latest;
            }
        }
        let fresh = self.fetch_snapshot().await;
        self.tx.send_replace(fresh.clone());
        fresh
    }

    /// Re-fetches every interval while at least one subscriber is connected, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if self.tx.receiver_count() == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.wake.notified() => {}
                }
            }
            let snapshot = self.fetch_snapshot().await;
            self.tx.send_replace(snapshot);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn fetch_snapshot(&self) -> Arc<str> {
        let (lb, proxies) = tokio::join!(
            self.source("lb", &self.lb_url),
            futures_util::future::join_all(self.dbproxy_urls.iter().map(|u| self.source("dbproxy", u)))
        );
        let proxies: Vec<Source<'_>> = proxies.into_iter().flatten().collect();
        let mut instances: Vec<serde_json::Value> = proxies.iter().map(Source::instance).collect();
        {
            // Held for a few map operations, never across an await.
            let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            for i in &mut instances {
                let url = i["url"].as_str().unwrap_or_default().to_string();
                match i["instance"].as_str() {
                    Some(name) => {
                        names.insert(url, name.to_string());
                    }
                    None => {
                        if let Some(name) = names.get(&url) {
                            i["instance"] = name.clone().into();
                        }
                    }
                }
            }
        }
        let db = main_view(&proxies).cloned();
        let at = now_ms();
        let mut summary = Summary::of(lb.as_ref(), db.as_ref());
        summary.leader = instances
            .iter()
            .find_map(|i| i["leader"].as_str().map(str::to_string));
        let events = {
            // Held for a diff and a copy, never across an await.
            let mut log = self.events.lock().unwrap_or_else(|p| p.into_inner());
            log.observe(at, summary);
            log.recent.iter().cloned().collect::<Vec<_>>()
        };
        let v = serde_json::json!({
            "at": at,
            "instance": self.instance,
            "switchover": self.switchover_enabled(),
            "lb": lb,
            "dbproxy": db,
            "dbproxies": instances,
            "events": events,
        });
        Arc::from(v.to_string())
    }

    async fn source<'a>(&self, name: &str, url: &'a str) -> Option<Source<'a>> {
        if url.is_empty() {
            return None;
        }
        Some(match self.get_json(url).await {
            Ok(status) => Source {
                url,
                reachable: true,
                error: None,
                status: Some(status),
            },
            Err(e) => {
                self.metrics.status_errors.with_label_values(&[name]).inc();
                Source {
                    url,
                    reachable: false,
                    error: Some(e.to_string()),
                    status: None,
                }
            }
        })
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, FetchError> {
        let (code, body) = self.call(Method::GET, url, self.timeout).await?;
        if !code.is_success() {
            return Err(FetchError::Status(code.as_u16()));
        }
        serde_json::from_slice(&body).map_err(|e| FetchError::Json(e.to_string()))
    }

    /// One bounded HTTP exchange: connect, send, read at most [`MAX_STATUS_BODY`], all within `limit`.
    async fn call(
        &self,
        method: Method,
        url: &str,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), FetchError> {
        let uri: Uri = url.parse().map_err(|e| FetchError::Url(format!("{url}: {e}")))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(hyper::header::ACCEPT, "application/json");
        if method == Method::POST && !self.admin_token.is_empty() {
            req = req.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.admin_token),
            );
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| FetchError::Url(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| FetchError::Unreachable(error_chain(&e)))?;
            let code = resp.status();
            let body = Limited::new(resp.into_body(), MAX_STATUS_BODY)
                .collect()
                .await
                .map_err(|e| FetchError::Body(e.to_string()))?
                .to_bytes();
            Ok((code, body))
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| FetchError::Timeout(limit))?
    }

    /// Asks dbproxy to promote node `id` (a graceful switchover); returns dbproxy's status and body.
    ///
    /// With one admin URL the request goes there. With several (instances coordinated through
    /// etcd, of which only the lease holder acts) each one's `/status` is read first and the
    /// request goes to the one that says it leads, else to the first reachable one; when that one
    /// answers 409 because it does not hold the lease and names the leader, the request is sent
    /// once more, to the instance of that name.
    pub async fn switchover(&self, id: &str) -> Result<(StatusCode, Bytes), FetchError> {
        let urls = match self.admin_urls.as_slice() {
            [] => return Err(FetchError::Url("no dbproxy admin url configured".into())),
            [only] => return self.promote(only, id).await,
            urls => urls,
        };
        let views: Vec<AdminView> =
            futures_util::future::join_all(urls.iter().map(|u| self.admin_view(u))).await;
        let target = switchover_target(&views);
        tracing::info!(node = %id, admin = %urls[target], "switchover sent to the dbproxy that leads");
        let (code, body) = self.promote(&urls[target], id).await?;
        if code != StatusCode::CONFLICT {
            return Ok((code, body));
        }
        let Some(leader) = named_leader(&String::from_utf8_lossy(&body)).map(str::to_string) else {
            return Ok((code, body));
        };
        match views
            .iter()
            .position(|v| v.name.as_deref() == Some(leader.as_str()))
            .filter(|&i| i != target)
        {
            Some(i) => {
                tracing::info!(node = %id, admin = %urls[i], %leader, "a follower named the leader: switchover sent there");
                self.promote(&urls[i], id).await
            }
            None => Ok((code, body)),
        }
    }

    /// One POST of `{admin}/nodes/{id}/promote`.
    async fn promote(&self, admin: &str, id: &str) -> Result<(StatusCode, Bytes), FetchError> {
        let url = format!("{admin}/nodes/{id}/promote");
        // dbproxy answers at once with an operation id (202) and runs the switchover itself; its
        // progress shows in its /status.
        self.call(Method::POST, &url, self.timeout).await
    }

    /// What the admin listener at `admin` says of itself in its `/status`.
    async fn admin_view(&self, admin: &str) -> AdminView {
        match self.get_json(&format!("{admin}/status")).await {
            Ok(status) => AdminView::of(&status),
            Err(e) => {
                tracing::debug!(admin, error = %e, "dbproxy admin status unreadable before a switchover");
                AdminView::default()
            }
        }
    }
}

/// One dbproxy admin listener as the switchover sees it before sending.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct AdminView {
    /// It answered its `/status`.
    reachable: bool,
    /// Its instance name (`record.coordination.instance`), when it is one of several.
    name: Option<String>,
    /// It says it holds the leader lease.
    leads: bool,
}

impl AdminView {
    fn of(status: &serde_json::Value) -> AdminView {
        let c = status.pointer("/record/coordination");
        AdminView {
            reachable: true,
            name: c
                .and_then(|c| c.get("instance"))
                .and_then(|n| n.as_str())
                .map(str::to_string),
            leads: c.and_then(|c| c.get("is_leader")).and_then(|l| l.as_bool()) == Some(true),
        }
    }
}

/// The admin listener a switchover goes to: the one that leads, else the first that answered,
/// else the first.
fn switchover_target(views: &[AdminView]) -> usize {
    views
        .iter()
        .position(|v| v.leads)
        .or_else(|| views.iter().position(|v| v.reachable))
        .unwrap_or(0)
}

/// The leader a follower's 409 names: dbproxy answers "this dbproxy (b) does not hold the leader
/// lease; ask the leader (a)". None for any other conflict, or when the leader is unknown.
fn named_leader(body: &str) -> Option<&str> {
    let (_, rest) = body.split_once("does not hold the leader lease")?;
    let (_, rest) = rest.split_once("ask the leader (")?;
    let name = rest.split_once(')')?.0.trim();
    (!name.is_empty() && name != "unknown").then_some(name)
}

/// How many failover events the dashboard remembers.
pub const MAX_EVENTS: usize = 50;

/// One change seen between two status reads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopologyEvent {
    /// When it was seen, in milliseconds since the epoch.
    pub at: u64,
    /// What changed, for people.
    pub message: String,
}

/// The parts of the status that make events: reachability, the primary, roles and health.
#[derive(Debug, Clone, Default, PartialEq)]
struct Summary {
    lb: Option<bool>,
    dbproxy: Option<bool>,
    primary: Option<String>,
    db_nodes: BTreeMap<String, (String, String)>,
    servers: BTreeMap<String, bool>,
    /// The dbproxy instance holding the leader lease, as the instances report it.
    leader: Option<String>,
}

fn text_of(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Summary {
    /// Reads what it can; anything missing or of an unexpected type is simply left out.
    fn of(lb: Option<&Source<'_>>, db: Option<&Source<'_>>) -> Summary {
        let mut s = Summary {
            lb: lb.map(|x| x.reachable),
            dbproxy: db.map(|x| x.reachable),
            ..Summary::default()
        };
        if let Some(status) = db.and_then(|x| x.status.as_ref()) {
            s.primary = status.get("primary").and_then(text_of);
            for (i, n) in status
                .get("nodes")
                .and_then(|n| n.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                let id = n
                    .get("node_id")
                    .and_then(text_of)
                    .unwrap_or_else(|| i.to_string());
                let role = n.get("role").and_then(text_of).unwrap_or_default();
                let state = n.get("status").and_then(text_of).unwrap_or_default();
                s.db_nodes.insert(id, (role, state));
            }
        }
        if let Some(status) = lb.and_then(|x| x.status.as_ref()) {
            for (i, srv) in status
                .get("servers")
                .and_then(|n| n.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = srv
                    .get("name")
                    .or_else(|| srv.get("addr"))
                    .and_then(text_of)
                    .unwrap_or_else(|| format!("server {i}"));
                let healthy = srv.get("healthy").and_then(|h| h.as_bool()).unwrap_or(true)
                    && srv.get("available").and_then(|h| h.as_bool()).unwrap_or(true);
                s.servers.insert(name, healthy);
            }
        }
        s
    }
}

/// The recent events and the summary they were derived from.
#[derive(Debug, Default)]
struct EventLog {
    last: Option<Summary>,
    recent: VecDeque<TopologyEvent>,
}

impl EventLog {
    fn push(&mut self, at: u64, message: String) {
        tracing::info!(event = %message, "topology changed");
        if self.recent.len() == MAX_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(TopologyEvent { at, message });
    }

    /// Records what changed since the previous summary (nothing on the first).
    fn observe(&mut self, at: u64, now: Summary) {
        let Some(prev) = self.last.take() else {
            self.last = Some(now);
            return;
        };
        for (name, a, b) in [("lb", prev.lb, now.lb), ("dbproxy", prev.dbproxy, now.dbproxy)] {
            match (a, b) {
                (Some(true), Some(false)) => self.push(at, format!("{name} unreachable")),
                (Some(false), Some(true)) => self.push(at, format!("{name} reachable again")),
                _ => {}
            }
        }
        if let (Some(a), Some(b)) = (&prev.primary, &now.primary) {
            if a != b {
                self.push(at, format!("primary changed: node {a} → node {b}"));
            }
        }
        match (&prev.leader, &now.leader) {
            (Some(a), Some(b)) if a != b => self.push(at, format!("dbproxy leader changed: {a} → {b}")),
            (None, Some(b)) if prev.dbproxy.is_some() => self.push(at, format!("dbproxy leader: {b}")),
            _ => {}
        }
        for (id, (role, state)) in &now.db_nodes {
            if let Some((old_role, old_state)) = prev.db_nodes.get(id) {
                if old_role != role {
                    self.push(at, format!("node {id}: {old_role} → {role}"));
                }
                if old_state != state {
                    self.push(at, format!("node {id}: {old_state} → {state}"));
                }
            }
        }
        for (name, healthy) in &now.servers {
            if let Some(was) = prev.servers.get(name) {
                if was != healthy {
                    let what = if *healthy { "healthy again" } else { "unhealthy" };
                    self.push(at, format!("webapp {name} {what}"));
                }
            }
        }
        // An unreachable source says nothing about its nodes: keep the last known ones so that
        // its return does not look like a burst of changes.
        let mut merged = now;
        if merged.dbproxy == Some(false) {
            merged.primary = prev.primary;
            merged.db_nodes = prev.db_nodes;
        } else if merged.primary.is_none() {
            // No primary elected for a moment (a switchover or failover in progress): remember
            // the last one, so that the change shows as `node 0 → node 1` once it is done.
            merged.primary = prev.primary;
        }
        if merged.lb == Some(false) {
            merged.servers = prev.servers;
        }
        // No holder for a moment (the lease of a dead leader running out): remember the last
        // one, so the change shows as `a → b`.
        if merged.leader.is_none() {
            merged.leader = prev.leader;
        }
        self.last = Some(merged);
    }
}

/// Whether `id` is an acceptable node id for the admin URL path (no slashes, dots or escapes).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `at` field of a snapshot, without parsing the rest (it is written first).
fn snapshot_time(snapshot: &str) -> Option<u64> {
    let rest = snapshot.strip_prefix("{\"at\":")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followers_conflict_names_the_leader_and_other_conflicts_do_not() {
        assert_eq!(
            named_leader("this dbproxy (b) does not hold the leader lease; ask the leader (a)\n"),
            Some("a")
        );
        assert_eq!(
            named_leader("this dbproxy (b) does not hold the leader lease; ask the leader (unknown)"),
            None
        );
        assert_eq!(
            named_leader("operation 3 (switchover of node 1) is running"),
            None
        );
        assert_eq!(named_leader("ask the leader (a)"), None);
        assert_eq!(named_leader(""), None);
    }

    #[test]
    fn the_switchover_goes_to_the_instance_that_leads() {
        let follower = AdminView::of(&serde_json::json!({
            "record": {"coordination": {"instance": "b", "is_leader": false}}
        }));
        let leader = AdminView::of(&serde_json::json!({
            "record": {"coordination": {"instance": "a", "is_leader": true}}
        }));
        assert_eq!(follower.name.as_deref(), Some("b"));
        assert!(leader.leads && !follower.leads);
        let down = AdminView::default();
        assert_eq!(switchover_target(&[follower.clone(), leader.clone()]), 1);
        assert_eq!(switchover_target(&[down.clone(), follower.clone()]), 1);
        assert_eq!(switchover_target(&[down.clone(), down.clone()]), 0);
        // A single instance's status has no coordination: reachable, nameless, not "leading".
        let alone = AdminView::of(&serde_json::json!({"record": {"coordination": null}}));
        assert_eq!(
            alone,
            AdminView {
                reachable: true,
                name: None,
                leads: false
            }
        );
    }

    #[test]
    fn node_ids_are_restricted() {
        assert!(valid_node_id("0"));
        assert!(valid_node_id("node-1_b"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("../x"));
        assert!(!valid_node_id("a/b"));
        assert!(!valid_node_id("a%2f"));
        assert!(!valid_node_id(&"x".repeat(65)));
    }

    fn source(status: serde_json::Value) -> Source<'static> {
        Source {
            url: "http://x/status",
            reachable: true,
            error: None,
            status: Some(status),
        }
    }

    fn down() -> Source<'static> {
        Source {
            url: "http://x/status",
            reachable: false,
            error: Some("unreachable".into()),
            status: None,
        }
    }

    #[test]
    fn events_follow_failovers_and_tolerate_odd_status() {
        let db0 = source(serde_json::json!({"primary": "0", "nodes": [
            {"node_id": "0", "role": "primary", "status": "up"},
            {"node_id": "1", "role": "standby", "status": "up"}]}));
        let db1 = source(serde_json::json!({"primary": 1, "nodes": [
            {"node_id": "0", "role": "primary", "status": "down"},
            {"node_id": 1, "role": "primary", "status": "up"}]}));
        let lb = source(serde_json::json!({"servers": [{"name": "web-1", "healthy": true}]}));
        let lb_bad = source(serde_json::json!({"servers": [{"name": "web-1", "healthy": false}]}));
        let odd = source(serde_json::json!({"primary": {"x": 1}, "nodes": "many"}));
        let mut log = EventLog::default();
        log.observe(1, Summary::of(Some(&lb), Some(&db0)));
        assert!(log.recent.is_empty());
        log.observe(2, Summary::of(Some(&lb_bad), Some(&db1)));
        let msgs: Vec<_> = log.recent.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "primary changed: node 0 → node 1",
                "node 0: up → down",
                "node 1: standby → primary",
                "webapp web-1 unhealthy"
            ]
        );
        log.observe(3, Summary::of(Some(&lb_bad), Some(&down())));
        log.observe(4, Summary::of(Some(&lb_bad), Some(&db1)));
        let msgs: Vec<_> = log.recent.iter().skip(4).map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["dbproxy unreachable", "dbproxy reachable again"]);
        log.observe(5, Summary::of(None, Some(&odd)));
        assert_eq!(log.recent.len(), 6);
        for i in 0..(2 * MAX_EVENTS as u64) {
            let s = if i % 2 == 0 {
                down()
            } else {
                source(serde_json::json!({}))
            };
            log.observe(10 + i, Summary::of(None, Some(&s)));
        }
        assert_eq!(log.recent.len(), MAX_EVENTS);
    }

    #[test]
    fn a_moment_without_a_primary_does_not_hide_the_change() {
        let status = |p: serde_json::Value| {
            source(serde_json::json!({"primary": p, "nodes": [
                {"node_id": "0", "role": "primary", "status": "up"}]}))
        };
        let mut log = EventLog::default();
        log.observe(1, Summary::of(None, Some(&status(serde_json::json!(0)))));
        log.observe(2, Summary::of(None, Some(&status(serde_json::Value::Null))));
        log.observe(3, Summary::of(None, Some(&status(serde_json::json!(1)))));
        let msgs: Vec<_> = log.recent.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["primary changed: node 0 → node 1"]);
    }

    #[test]
    fn snapshot_time_reads_the_leading_field() {
        assert_eq!(snapshot_time("{\"at\":123,\"x\":1}"), Some(123));
        assert_eq!(snapshot_time(""), None);
        assert_eq!(snapshot_time("{\"x\":1}"), None);
    }
}
