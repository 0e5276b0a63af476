//! HTTP load balancer in front of the web replicas (replaces nginx): HTTP/1.1 and h2c from clients,
//! TLS with HTTP/2 by ALPN (`tls`: rustls, certificates by SNI, re-read on reload), virtual servers
//! and locations (`route/`), static files (`files`: root, alias, try_files, ETag, ranges),
//! websockets passed through, nginx-compatible balancing (smooth weighted round
//! robin, ip_hash, least_conn, consistent hash), passive and active health checks, retries on the
//! next server, limits, `/metrics` and `/status`, SIGHUP reload and graceful shutdown.
//!
//! `main.rs` only parses flags; [`run`] and [`Lb`] are what tests drive on port 0.
//!
//! Map: `config` (TOML, nginx-style durations) and `nginx_conf` (`--nginx-conf` → a config table)
//! feed `route/` (virtual servers by listen address and Host, locations in nginx's order,
//! `rewrite`, `return`, the URI sent upstream: pure, asked by both paths below) and `upstream`
//! (one per group: `upstream` and `upstreams`; resolved servers with live state: passive fails, active health, slow start,
//! in-flight counts, and each server's per-thread pools of idle upstream connections) whose
//! `select/` algorithms are pure and pick an index only. `server` accepts on the control runtime
//! and runs each connection on a serving thread (`common::workers`; limits,
//! idle/header timeouts, drain): `fast` serves plain bodiless HTTP/1.1 requests (GET, HEAD,
//! OPTIONS, DELETE) itself with httparse over the servers' pools, relaying the response framing
//! byte for byte, and hands the connection to hyper at the first request it does not take (a
//! body, an upgrade, HTTP/1.0, h2c); on that path `proxy` handles one request (headers, tries,
//! upgrades; `grpc://` groups over HTTP/2 cleartext) with hyper-util's clients; `h2_websocket`
//! maps RFC 8441 websockets to HTTP/1.1 handshakes; `early_answer` lets an upstream's answer win over a body write the upstream reset; `body` keeps a request body replayable
//! until first sent, drains an HTTP/2 request body the upstream did not read, and times out
//! stalled upstream bodies; `health` probes; `metrics` and `access` observe.
//!
//! State: a reload swaps one `Arc<Runtime>` (config + upstream groups + routes + client); requests in flight and
//! relayed websockets keep the `Runtime` they started with. Known limits: listen addresses and
//! `limits.max_connections` change only on restart; TLS connections that chose HTTP/1.1 take the
//! fast path like plain ones (`fast::ClientStream`), HTTP/2 ones go to hyper; once a connection is on the hyper path, an
//! idle keep-alive connection is closed after `min(header_read, client_idle)` because hyper's
//! header timer also runs while waiting for the next request (the fast path waits `client_idle`).

pub mod access;
pub mod body;
pub mod config;
mod early_answer;
mod fast;
mod files;
#[doc(hidden)]
pub mod fuzzing;
mod h2_websocket;
mod head_check;
pub mod health;
pub mod metrics;
pub mod nginx_conf;
mod proxy;
pub mod route;
pub mod select;
mod send_timeout;
mod server;
pub mod tls;
pub mod upstream;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use body::UpBody;
use metrics::Metrics;
use upstream::{Upstream, UpstreamError};

/// What can stop the load balancer from starting or reloading.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// The upstream could not be built (e.g. a host name did not resolve).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The routing table does not build.
    #[error(transparent)]
    Route(#[from] route::RouteError),
    /// A certificate or key does not load.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// An upstream HTTP client.
pub(crate) type UpClient = Client<early_answer::UpConnector, UpBody>;

/// The upstream clients: HTTP/1.1 for `http://` groups, HTTP/2 cleartext for `grpc://` ones.
#[derive(Clone)]
pub(crate) struct UpClients {
    pub h1: UpClient,
    pub h2: UpClient,
}

/// Everything a request needs that a reload may replace, swapped as one.
pub struct Runtime {
    /// The config in force.
    pub config: Config,
    /// The resolved servers and selector.
    pub upstream: Upstream,
    /// The other groups (`upstreams`), in order: group `i + 1` of a [`route::Route`].
    pub upstreams: Vec<Upstream>,
    /// Virtual servers and locations.
    pub router: Arc<route::Router>,
    /// The TLS acceptors, by address.
    pub tls: tls::Tls,
    client: UpClients,
}

impl Runtime {
    /// Resolves every group and compiles the routing table, reusing servers' state from `old`.
    fn build(config: Config, client: UpClients, old: Option<&Runtime>) -> Result<Runtime, LbError> {
        let upstream = Upstream::build(&config, old.map(|o| &o.upstream))?;
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for up in &config.upstreams {
            let previous = old.and_then(|o| o.upstreams.iter().find(|u| u.name == up.name));
            upstreams.push(Upstream::build_group(&config, up, previous)?);
        }
        let router = Arc::new(route::Router::build(&config)?);
        let tls = tls::Tls::build(&config, &router, old.map(|o| &o.tls))?;
        Ok(Runtime {
            config,
            upstream,
            upstreams,
            router,
            tls,
            client,
        })
    }

    /// Group `i` of a route: 0 is `upstream`, then `upstreams`.
    pub fn group(&self, i: usize) -> &Upstream {
        match i {
            0 => &self.upstream,
            i => self.upstreams.get(i - 1).unwrap_or(&self.upstream),
        }
    }

    /// Every group, the main one first.
    pub fn groups(&self) -> impl Iterator<Item = &Upstream> {
        std::iter::once(&self.upstream).chain(&self.upstreams)
    }
}

#[cfg(test)]
impl Runtime {
    /// A runtime for unit tests (servers resolved, nothing started).
    pub(crate) fn for_tests(config: Config) -> Runtime {
        let client = build_client(&config);
        Runtime::build(config, client, None).expect("test runtime")
    }
}

/// State shared by every connection.
pub(crate) struct Shared {
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub metrics: Metrics,
    /// Woken by every reload, so the accept loop applies a new `limits.max_connections` even
    /// while it waits for a free slot.
    pub reloaded: tokio::sync::Notify,
}

fn build_client(config: &Config) -> UpClients {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.timeouts.upstream_connect.get()));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.timeouts.upstream_idle.get())
        .pool_max_idle_per_host(config.limits.upstream_keepalive);
    // An upstream's early answer wins over a failed body write (see `early_answer`).
    let connector = early_answer::UpConnector(connector);
    let h1 = builder.build(connector.clone());
    // One HTTP/2 connection per server carries every stream (nginx's grpc_pass opens more; h2
    // multiplexes), with keep-alive pings so a dead server is noticed between calls.
    builder
        .http2_only(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(config.timeouts.upstream_connect.get().max(Duration::from_secs(5)));
    let h2 = builder.build(connector);
    UpClients { h1, h2 }
}

/// Whether two configs can share one upstream client (same connect timeout and pool settings).
fn same_client_settings(a: &Config, b: &Config) -> bool {
    a.timeouts.upstream_connect == b.timeouts.upstream_connect
        && a.timeouts.upstream_idle == b.timeouts.upstream_idle
        && a.limits.upstream_keepalive == b.limits.upstream_keepalive
}

/// A load balancer; clones share everything.
#[derive(Clone)]
pub struct Lb {
    shared: Arc<Shared>,
}

impl Lb {
    /// Resolves the servers and prepares metrics; serves nothing yet.
    pub fn new(config: Config) -> Result<Lb, LbError> {
        let client = build_client(&config);
        let runtime = Arc::new(ArcSwap::from_pointee(Runtime::build(config, client, None)?));
        let metrics = Metrics::new(runtime.clone());
        Ok(Lb {
            shared: Arc::new(Shared {
                runtime,
                metrics,
                reloaded: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Applies a new config to new requests; connections, websockets and requests in flight keep
    /// what they started with. Servers whose address and parameters did not change keep their
    /// health and counters. A new `limits.max_connections` applies to the next accepted
    /// connections (open ones over a lowered limit stay). Listener addresses and `workers` need
    /// a restart.
    pub fn reload(&self, config: Config) -> Result<(), LbError> {
        let old = self.shared.runtime.load_full();
        let client = if same_client_settings(&config, &old.config) {
            old.client.clone()
        } else {
            build_client(&config)
        };
        let runtime = Runtime::build(config, client, Some(&old))?;
        if !runtime.config.health.enabled {
            for s in runtime.groups().flat_map(|g| &g.servers) {
                s.force_healthy();
            }
        }
        let config = &runtime.config;
        if config.listen_addrs() != old.config.listen_addrs()
            || config.admin_listen != old.config.admin_listen
        {
            tracing::warn!("listen addresses change only on restart");
        }
        if config.admin_token != old.config.admin_token {
            tracing::warn!("admin_token changes only on restart");
        }
        if config.workers != old.config.workers {
            tracing::warn!("the number of serving threads (workers) changes only on restart");
        }
        let servers: usize = runtime.groups().map(|g| g.servers.len()).sum();
        self.shared.runtime.store(Arc::new(runtime));
        self.shared.reloaded.notify_one();
        tracing::info!(servers, "configuration reloaded");
        Ok(())
    }

    /// The Prometheus registry (served by [`Lb::serve_admin`]).
    pub fn registry(&self) -> prometheus::Registry {
        self.shared.metrics.registry.clone()
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.shared.runtime.load().config.clone()
    }

    /// Serves clients on `listener` (and runs health checks) until `shutdown`, then drains.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), LbError> {
        self.serve_all(vec![listener], shutdown).await
    }

    /// Serves clients on `listeners`, which stand for [`Config::listen_addrs`] in order (the
    /// virtual servers of the address a connection came in on answer it), until `shutdown`.
    pub async fn serve_all(
        self,
        listeners: Vec<TcpListener>,
        shutdown: CancellationToken,
    ) -> Result<(), LbError> {
        let addrs = self.shared.runtime.load().config.listen_addrs();
        let mut bound = Vec::with_capacity(listeners.len());
        for (listener, addr) in listeners.into_iter().zip(addrs) {
            let local = listener.local_addr()?;
            tracing::info!(%local, configured = %addr, "lb listening");
            let configured = addr.parse().unwrap_or(local);
            bound.push((configured, listener));
        }
        let health = tokio::spawn(health::run(self.shared.clone(), shutdown.clone()));
        let served = server::serve(self.shared.clone(), bound, shutdown).await;
        health.abort();
        Ok(served?)
    }

    /// Serves `/metrics`, `/healthz` and `/status` on `listener` until `shutdown`.
    pub async fn serve_admin(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let token = self.shared.runtime.load().config.admin_token.clone();
        let routes = Arc::new(StatusRoute {
            lb: self.clone(),
            token,
        });
        common::admin::serve(listener, self.registry(), routes, shutdown).await
    }

    /// The servers, their health, weights and counters, as `/status` shows them.
    pub fn status(&self) -> serde_json::Value {
        let rt = self.shared.runtime.load();
        let now = Instant::now();
        let servers: Vec<_> = rt
            .groups()
            .flat_map(|g| g.servers.iter().map(move |s| (g, s)))
            .map(|(g, s)| {
                serde_json::json!({
                    "group": g.name,
                    "addr": &*s.label,
                    "name": s.name,
                    "weight": s.config.weight,
                    "effective_weight": s.effective_weight(now),
                    "backup": s.config.backup,
                    "down": s.config.down,
                    "healthy": s.is_healthy(),
                    "resting": s.passively_failed(now),
                    "available": s.available(now),
                    "active": s.active.load(Ordering::Relaxed),
                    "requests": s.requests.load(Ordering::Relaxed),
                    "failures": s.failures.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "upstream": rt.upstream.name,
            "algorithm": rt.upstream.algorithm,
            "active_connections": self.shared.metrics.active_connections.get(),
            "servers": servers,
        })
    }
}

struct StatusRoute {
    lb: Lb,
    /// `admin_token` as it was at start (a reload does not change it).
    token: String,
}

impl common::admin::AdminRoutes for StatusRoute {
    fn token(&self) -> Option<&str> {
        (!self.token.is_empty()).then_some(self.token.as_str())
    }

    fn route(&self, method: &Method, path: &str, _body: Bytes) -> Option<common::admin::ResponseFuture> {
        if method == Method::GET && path == "/status" {
            let v = self.lb.status();
            return Some(Box::pin(async move { common::admin::json(StatusCode::OK, &v) }));
        }
        None
    }
}

/// Serves `config` on `listener` until `shutdown` (no admin listener; see [`Lb`] for that).
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) -> Result<(), LbError> {
    Lb::new(config)?.serve(listener, shutdown).await
}
