//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz`, and routes a binary adds
//! (`/status`, `/nodes/{id}/attach`, ...) through [`AdminRoutes`].
//!
//! It is deliberately small: HTTP/1.1 only, bodies capped at [`MAX_BODY`], a header read timeout,
//! and no state of its own besides the registry.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The largest request body the admin listener reads.
pub const MAX_BODY: usize = 64 * 1024;

/// A boxed future answering one admin request.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// Routes a binary adds to the admin listener.
pub trait AdminRoutes: Send + Sync + 'static {
    /// Answers `method path` with `body`, or returns `None` when the route is not this binary's.
    fn route(&self, method: &Method, path: &str, body: Bytes) -> Option<ResponseFuture>;

    /// The bearer token requests other than GET and HEAD (those that change something) must
    /// carry in `Authorization: Bearer ...`; `None` lets them through unchecked.
    fn token(&self) -> Option<&str> {
        None
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time).
pub fn bearer_matches(headers: &hyper::HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    constant_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Whether `a == b`, in a time that depends on their lengths only, not on where they differ (for
/// secrets: tokens, passwords).
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |d, (x, y)| d | usize::from(x ^ y));
    diff == 0
}

/// No extra routes.
pub struct NoRoutes;

impl AdminRoutes for NoRoutes {
    fn route(&self, _: &Method, _: &str, _: Bytes) -> Option<ResponseFuture> {
        None
    }
}

/// No extra routes, and a token for every request but reads (empty: none).
pub struct TokenOnly(pub String);

impl AdminRoutes for TokenOnly {
    fn route(&self, _: &Method, _: &str, _: Bytes) -> Option<ResponseFuture> {
        None
    }

    fn token(&self) -> Option<&str> {
        (!self.0.is_empty()).then_some(self.0.as_str())
    }
}

/// Whether `listen` (an `address:port`) can only be reached from this host.
pub fn is_loopback(listen: &str) -> bool {
    match listen.parse::<SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => listen
            .rsplit_once(':')
            .is_some_and(|(host, _)| host == "localhost"),
    }
}

/// The one rule every admin listener follows: off loopback it needs a token, unless the
/// configuration says (`admin_allow_open = true`) that an open listener is on purpose. Returns
/// the reason for refusing to start, for the binary's config validation to report under
/// `admin_listen`.
pub fn check_exposure(listen: &str, token: &str, allow_open: bool) -> Result<(), String> {
    if token.is_empty() && !allow_open && !is_loopback(listen) {
        return Err(format!(
            "`{listen}` is reachable from other hosts and admin_token is empty: set admin_token, \
             bind a loopback address, or set admin_allow_open = true if an open admin listener \
             is on purpose"
        ));
    }
    Ok(())
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Renders every metric of `registry` in the Prometheus text format.
pub fn render_metrics(registry: &Registry) -> String {
    let mut buf = Vec::with_capacity(4096);
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    routes: Arc<dyn AdminRoutes>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "admin listener up");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let routes = routes.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let routes = routes.clone();
                // A client that goes away must not cancel what it asked for (a switchover, an
                // attach): the request runs in a task of its own, spawned here as the request is
                // handed over rather than in the future below, which hyper may drop unpolled when
                // the connection closes right after the request.
                let task = tokio::spawn(async move { handle(req, peer, &registry, routes.as_ref()).await });
                async move {
                    let resp = task.await.unwrap_or_else(|_| {
                        text(StatusCode::INTERNAL_SERVER_ERROR, "admin request failed\n")
                    });
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    _peer: SocketAddr,
    registry: &Registry,
    routes: &dyn AdminRoutes,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if !matches!(method, Method::GET | Method::HEAD) {
        if let Some(token) = routes.token() {
            if !bearer_matches(req.headers(), token) {
                let mut r = text(
                    StatusCode::UNAUTHORIZED,
                    "this admin endpoint needs the admin token: Authorization: Bearer <admin_token>\n",
                );
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"admin\""),
                );
                return r;
            }
        }
    }
    match (method.clone(), path.as_str()) {
        (Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, render_metrics(registry));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return r;
        }
        (Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        _ => {}
    }
    let body = match tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
        Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "request body timed out\n"),
    };
    match routes.route(&method, &path, body) {
        Some(fut) => fut.await,
        None => text(
            StatusCode::NOT_FOUND,
            format!("no such admin endpoint: {method} {path}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Echo;
    impl AdminRoutes for Echo {
        fn route(&self, method: &Method, path: &str, body: Bytes) -> Option<ResponseFuture> {
            if method == Method::POST && path == "/echo" {
                Some(Box::pin(async move { text(StatusCode::OK, body) }))
            } else {
                None
            }
        }
    }

    struct Guarded;
    impl AdminRoutes for Guarded {
        fn route(&self, method: &Method, path: &str, body: Bytes) -> Option<ResponseFuture> {
            Echo.route(method, path, body).or_else(|| {
                (path == "/state")
                    .then(|| -> ResponseFuture { Box::pin(async { text(StatusCode::OK, "open") }) })
            })
        }
        fn token(&self) -> Option<&str> {
            Some("s3cret")
        }
    }

    #[test]
    fn off_loopback_an_admin_listener_needs_a_token_or_a_stated_purpose() {
        for open in ["0.0.0.0:9930", "10.1.2.3:1", "[::]:9100", "admin.example:9100"] {
            let e = check_exposure(open, "", false).unwrap_err();
            assert!(e.contains(open) && e.contains("admin_allow_open"), "{e}");
            assert!(check_exposure(open, "t0ken", false).is_ok());
            assert!(check_exposure(open, "", true).is_ok());
        }
        for local in ["127.0.0.1:9930", "127.9.9.9:0", "[::1]:9100", "localhost:9100"] {
            assert!(check_exposure(local, "", false).is_ok(), "{local}");
        }
        assert!(constant_eq(b"abc", b"abc"));
        assert!(!constant_eq(b"abc", b"abd") && !constant_eq(b"abc", b"abcd"));
    }

    #[tokio::test]
    async fn a_token_guards_every_request_but_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Registry::new(),
            Arc::new(Guarded),
            shutdown.clone(),
        ));
        let post = |auth: &str| {
            format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\nhi"
            )
        };
        for auth in [
            "",
            "Authorization: Bearer wrong\r\n",
            "Authorization: Bearer s3cre\r\n",
            "Authorization: Bearer s3cret!\r\n",
            "Authorization: Basic s3cret\r\n",
        ] {
            let r = request(addr, &post(auth)).await;
            assert!(r.starts_with("HTTP/1.1 401"), "{auth:?}: {r}");
            assert!(r.to_ascii_lowercase().contains("www-authenticate: bearer"), "{r}");
        }
        let r = request(addr, &post("Authorization: Bearer s3cret\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("hi"), "{r}");
        for path in ["/state", "/metrics", "/healthz"] {
            let r = request(
                addr,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    async fn request(addr: SocketAddr, raw: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_routes() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("test_things_total", "things").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, registry, Arc::new(Echo), shutdown.clone()));

        let m = request(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("test_things_total 3"), "{m}");
        let h = request(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
        let e = request(
            addr,
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .await;
        assert!(e.ends_with("hello"), "{e}");
        let n = request(addr, "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(n.starts_with("HTTP/1.1 404"), "{n}");
        let big = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            MAX_BODY + 1,
            "a".repeat(MAX_BODY + 1)
        );
        let b = request(addr, &big).await;
        assert!(b.starts_with("HTTP/1.1 413"), "{b}");

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
