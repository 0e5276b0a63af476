//! The web page: latest host metrics, serving instance and database node, live dashboard.
//!
//! `config` is the configuration; `db` the pool, the page's queries and the migrations; `dashboard`
//! reads lb's and dbproxy's `/status` and feeds the event stream; `operator` is the login (signed
//! session cookie, CSRF token, failed-login limit) the switchover needs; `routes` is the HTTP
//! surface and `render` its HTML; `metrics` the Prometheus registry. [`run`] ties them together.

pub mod config;
pub mod dashboard;
pub mod db;
pub mod metrics;
pub mod operator;
mod render;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use operator::{COOKIE as OPERATOR_COOKIE, CSRF_HEADER};

/// Why the webapp could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WebappError {
    /// The configuration was refused.
    #[error("configuration: {0}")]
    Config(#[from] common::ConfigError),
    /// The metrics registry refused a metric (a build mistake).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The pool could not be built.
    #[error("database pool: {0}")]
    Db(#[from] db::DbError),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `config` on `listener` until `shutdown`, then drains for at most 10 s.
///
/// Migrations run in the background, retried with backoff while the database is unreachable: the
/// process serves `/healthz` at once and answers 503 elsewhere until the schema is ready.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), WebappError> {
    let metrics = Arc::new(metrics::Metrics::new()?);
    let instance = config.instance_name();
    let db = db::Db::new(
        config.pg_config()?,
        config.pool_size,
        config.query_timeout(),
        metrics.clone(),
    )?;
    let dashboard = Arc::new(dashboard::Dashboard::new(
        &config,
        instance.clone(),
        metrics.clone(),
    ));
    let state = Arc::new(routes::AppState {
        instance,
        history: config.history,
        db,
        dashboard: dashboard.clone(),
        metrics,
        operator: operator::Operator::new(&config.operator_password, config.operator_cookie_secure),
        shutdown: shutdown.clone(),
    });
    if !config.dbproxy_admin_url.is_empty() && config.operator_password.is_empty() {
        tracing::warn!("dbproxy_admin_url is set but operator_password is not: the dashboard is read-only");
    }
    tracing::info!(local = %listener.local_addr()?, instance = %state.instance, "webapp listening");

    let migrator = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { state.db.migrate_until_done(&shutdown).await })
    };
    let fetcher = tokio::spawn(dashboard.run(shutdown.clone()));

    let app = routes::router(state);
    serve(
        listener,
        app,
        Duration::from_millis(config.header_timeout_ms),
        shutdown.clone(),
    )
    .await;
    migrator.abort();
    fetcher.abort();
    Ok(())
}

/// The accept loop: HTTP/1.1 with keep-alive and a bound on reading each request head (axum's own
/// `serve` has no such bound, and a client trickling headers would hold a task forever). On
/// shutdown it stops accepting, asks every connection to finish its request in flight, and cuts
/// what is still open after 10 s.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open 10 s after shutdown were cut");
    }
}
