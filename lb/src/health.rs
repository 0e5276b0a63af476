//! Active health checks: every `health.interval` each server gets an HTTP GET of `health.path`; the
//! probe only reports pass or fail, and each server's rise/fall state (`common::HealthState`)
//! decides when it flips.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request failed (connect refused, reset, ...).
    #[error("request failed: {0}")]
    Request(String),
    /// The server answered with another status.
    #[error("status {got}, expected {expected}")]
    Status {
        /// What came back.
        got: u16,
        /// What was expected.
        expected: u16,
    },
}

/// The client probes use; short-lived pooled connections are fine for one GET per interval.
pub type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// A client for probes.
pub fn probe_client(connect_timeout: Duration) -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// One probe: GET `path` on `addr`, passing when the status is `expected` within `timeout`.
pub async fn probe(
    client: &ProbeClient,
    addr: SocketAddr,
    path: &str,
    expected: u16,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(path)
        .build()
        .map_err(|e| ProbeError::Request(e.to_string()))?;
    let req = Request::get(uri)
        .header(http::header::USER_AGENT, "ha-stack-lb-health")
        .body(Empty::new())
        .map_err(|e| ProbeError::Request(e.to_string()))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
        .map_err(|e| ProbeError::Request(e.to_string()))?;
    let got = resp.status();
    // The body is not needed; dropping the response closes or recycles the connection.
    if got == StatusCode::from_u16(expected).unwrap_or(StatusCode::OK) {
        Ok(())
    } else {
        Err(ProbeError::Status {
            got: got.as_u16(),
            expected,
        })
    }
}

/// Probes every server of the live upstream until `shutdown`; picks up reloads each round.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut client: Option<(Duration, ProbeClient)> = None;
    loop {
        let rt = shared.runtime.load_full();
        let h = rt.config.health.clone();
        if h.enabled {
            let c = match &client {
                Some((t, c)) if *t == h.timeout.get() => c.clone(),
                _ => {
                    let c = probe_client(h.timeout.get());
                    client = Some((h.timeout.get(), c.clone()));
                    c
                }
            };
            let mut set = JoinSet::new();
            for server in rt
                .groups()
                .flat_map(|g| g.servers.iter())
                .filter(|s| !s.config.down)
            {
                let (server, c, path) = (server.clone(), c.clone(), h.path.clone());
                let (expected, timeout) = (h.expected_status, h.timeout.get());
                set.spawn(async move {
                    let r = probe(&c, server.addr, &path, expected, timeout).await;
                    if let Err(e) = &r {
                        tracing::debug!(server = %server.label, error = %e, "health probe failed");
                    }
                    server.observe_probe(r.is_ok(), Instant::now());
                });
            }
            tokio::select! {
                _ = async { while set.join_next().await.is_some() {} } => {}
                _ = shutdown.cancelled() => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(h.interval.get()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
