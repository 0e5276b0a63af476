//! The webapp's Prometheus metrics, in a registry per instance (tests run several in one process).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Counters and histograms the handlers update.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `webapp_http_requests_total{route,code}`.
    pub requests: IntCounterVec,
    /// `webapp_http_request_duration_seconds{route}`.
    pub latency: HistogramVec,
    /// `webapp_db_errors_total{kind}`.
    pub db_errors: IntCounterVec,
    /// `webapp_db_request_duration_seconds`.
    pub db_seconds: Histogram,
    /// `webapp_status_fetch_errors_total{source}`.
    pub status_errors: IntCounterVec,
    /// `webapp_operator_logins_total{outcome}` (accepted, refused, limited).
    pub logins: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "webapp_http_requests_total",
                "HTTP requests by route and status code",
            ),
            &["route", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "webapp_http_request_duration_seconds",
                "time to the response head, by route",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )?;
        let db_errors = IntCounterVec::new(
            Opts::new("webapp_db_errors_total", "failed database requests by kind"),
            &["kind"],
        )?;
        let db_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "webapp_db_request_duration_seconds",
                "time of one database request, pool wait included",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let status_errors = IntCounterVec::new(
            Opts::new(
                "webapp_status_fetch_errors_total",
                "failed reads of lb and dbproxy status by source",
            ),
            &["source"],
        )?;
        let logins = IntCounterVec::new(
            Opts::new(
                "webapp_operator_logins_total",
                "operator login attempts by outcome (accepted, refused, limited)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(logins.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(db_errors.clone()))?;
        registry.register(Box::new(db_seconds.clone()))?;
        registry.register(Box::new(status_errors.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            db_errors,
            db_seconds,
            status_errors,
            logins,
        })
    }
}
