//! Prometheus metrics of the proxy, plus a collector that reads upstream health and load from the
//! live upstream at scrape time (so a reload never leaves stale series behind).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::Runtime;

/// The proxy's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Where everything is registered.
    pub registry: Registry,
    /// `lb_requests_total{upstream,code}`.
    pub requests: IntCounterVec,
    /// `lb_request_duration_seconds`: time to the response head.
    pub duration: Histogram,
    /// `lb_active_connections`: open client connections.
    pub active_connections: IntGauge,
    /// `lb_retries_total`: tries beyond the first.
    pub retries: IntCounter,
    /// `lb_upstream_failures_total{upstream}`.
    pub failures: IntCounterVec,
    /// `lb_websockets_active`: upgraded connections being relayed.
    pub upgraded: IntGauge,
}

/// A metric definition that cannot fail is a programming error, so `expect` is fine here.
fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("valid metric definition")
}

impl Metrics {
    /// Creates and registers every metric; the upstream collector reads `runtime` when scraped.
    pub fn new(runtime: Arc<ArcSwap<Runtime>>) -> Metrics {
        let registry = Registry::new();
        let requests = must(IntCounterVec::new(
            Opts::new(
                "lb_requests_total",
                "Requests answered, by upstream server and status",
            ),
            &["upstream", "code"],
        ));
        let duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "lb_request_duration_seconds",
                "Time from request to response head",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        ));
        let active_connections = must(IntGauge::new("lb_active_connections", "Open client connections"));
        let retries = must(IntCounter::new(
            "lb_retries_total",
            "Requests sent to another server after a failure",
        ));
        let failures = must(IntCounterVec::new(
            Opts::new("lb_upstream_failures_total", "Failed tries, by upstream server"),
            &["upstream"],
        ));
        let upgraded = must(IntGauge::new(
            "lb_websockets_active",
            "Upgraded (websocket) connections relayed",
        ));
        for c in [
            Box::new(requests.clone()) as Box<dyn Collector>,
            Box::new(duration.clone()),
            Box::new(active_connections.clone()),
            Box::new(retries.clone()),
            Box::new(failures.clone()),
            Box::new(upgraded.clone()),
            Box::new(UpstreamCollector::new(runtime)),
        ] {
            must(registry.register(c));
        }
        Metrics {
            registry,
            requests,
            duration,
            active_connections,
            retries,
            failures,
            upgraded,
        }
    }
}

/// Reports `lb_upstream_up{upstream}` and `lb_upstream_active_requests{upstream}` from live state.
struct UpstreamCollector {
    runtime: Arc<ArcSwap<Runtime>>,
    up: IntGaugeVec,
    active: IntGaugeVec,
    weight: IntGaugeVec,
}

impl UpstreamCollector {
    fn new(runtime: Arc<ArcSwap<Runtime>>) -> Self {
        let vec = |name: &str, help: &str| must(IntGaugeVec::new(Opts::new(name, help), &["upstream"]));
        UpstreamCollector {
            runtime,
            up: vec(
                "lb_upstream_up",
                "1 when the server can take requests (not down, healthy, not resting)",
            ),
            active: vec("lb_upstream_active_requests", "Requests in flight per server"),
            weight: vec(
                "lb_upstream_weight",
                "Weight in force per server (lower during slow start)",
            ),
        }
    }
}

impl Collector for UpstreamCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.up.desc();
        d.extend(self.active.desc());
        d.extend(self.weight.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.up.reset();
        self.active.reset();
        self.weight.reset();
        let rt = self.runtime.load();
        let now = std::time::Instant::now();
        for s in rt.groups().flat_map(|g| g.servers.iter()) {
            let labels = [&*s.label];
            self.up
                .with_label_values(&labels)
                .set(i64::from(s.available(now)));
            self.active
                .with_label_values(&labels)
                .set(i64::from(s.active.load(Ordering::Relaxed)));
            self.weight
                .with_label_values(&labels)
                .set(i64::from(s.effective_weight(now)));
        }
        let mut out = self.up.collect();
        out.extend(self.active.collect());
        out.extend(self.weight.collect());
        out
    }
}
