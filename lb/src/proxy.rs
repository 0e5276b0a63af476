//! One proxied request: pick a server, rewrite headers, send, retry on the next server like nginx's
//! `proxy_next_upstream`, relay upgrades (websockets), and account for it in metrics and the log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::access;
use crate::body::{ActiveGuard, BodySlot, RespBody, UpBody};
use crate::head_check::{self, BadHead};
use crate::route::{Route, RouteRequest};
use crate::server::ConnCtx;
use crate::upstream::RequestPick;
use crate::Shared;

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Why a request got no upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveUp {
    /// Every try failed, or no server was usable.
    BadGateway,
    /// The upstream did not answer in time.
    Timeout,
    /// The request body exceeded the limit.
    TooLarge,
}

fn error_response(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::text(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A response a route makes itself (`return`, redirects).
fn route_response(status: u16, location: Option<String>, body: String) -> Response<RespBody> {
    let mut r = Response::new(RespBody::Full(Some(bytes::Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if location.is_some() {
        "text/html"
    } else {
        "text/plain"
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    if let Some(v) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The body of a 400 for a refused head (static text: `error_response` takes no allocation).
fn bad_request_text(bad: BadHead) -> &'static str {
    match bad {
        BadHead::MissingHost => "bad request: missing host header\n",
        BadHead::DuplicateHost => "bad request: duplicate host header\n",
        BadHead::BadHost => "bad request: invalid host header\n",
        BadHead::BadMethod => "method not allowed\n",
        BadHead::BadTarget => "bad request: invalid request target\n",
        BadHead::BadLength => "bad request: invalid content-length\n",
        BadHead::DuplicateLength => "bad request: duplicate content-length header\n",
        BadHead::LengthAndEncoding => "bad request: both content-length and transfer-encoding\n",
        BadHead::BadEncoding => "bad request: unsupported transfer-encoding\n",
    }
}

/// Whether the request asks for a protocol upgrade (websocket and friends).
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Removes hop-by-hop headers, including every one the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Names listed in Connection are hop-by-hop too, however many; collect them (only when
    // Connection names any) before Connection goes.
    let mut listed: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        for t in v.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(t.trim_ascii()) {
                // Host is end-to-end whatever Connection says.
                if name != header::UPGRADE && name != header::HOST {
                    listed.push(name);
                }
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Adds X-Forwarded-For, X-Real-IP, X-Forwarded-Proto and Forwarded, and settles Host.
fn forwarding_headers(
    headers: &mut HeaderMap,
    uri: &Uri,
    client: SocketAddr,
    host_override: Option<&HeaderValue>,
    https: bool,
) {
    use std::fmt::Write;
    let ip = client.ip().to_canonical();
    let mut buf = String::with_capacity(64);
    let _ = write!(buf, "{ip}");
    let ip_value = HeaderValue::from_str(&buf).expect("an IP address is a valid header value");
    // Append to any X-Forwarded-For the client sent, as nginx's $proxy_add_x_forwarded_for does.
    let xff = {
        let prior: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if prior.is_empty() {
            ip_value.clone()
        } else {
            let mut joined = prior.join(", ");
            joined.push_str(", ");
            joined.push_str(&buf);
            HeaderValue::from_str(&joined).unwrap_or_else(|_| ip_value.clone())
        }
    };
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_REAL_IP, ip_value);
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // HTTP/2 clients send :authority instead of Host.
    if !headers.contains_key(header::HOST) {
        if let Some(v) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, v);
        }
    }
    let mut fwd = String::with_capacity(64);
    if ip.is_ipv6() {
        let _ = write!(fwd, "for=\"[{ip}]\";proto={proto}");
    } else {
        let _ = write!(fwd, "for={ip};proto={proto}");
    }
    if let Some(h) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        if h.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
            let _ = write!(fwd, ";host=\"{h}\"");
        }
    }
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {fwd}"),
        None => fwd,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if let Some(h) = host_override {
        headers.insert(header::HOST, h.clone());
    }
}

/// Handles one request from a client connection.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let _inflight = ctx.begin();
    let logging = shared.runtime.load().config.access_log.enabled;
    let line = logging.then(|| access::RequestLine::of(&req));
    let (resp, label) = proxy(&shared, &ctx, req, start).await;
    let elapsed = start.elapsed();
    let m = &shared.metrics;
    m.requests
        .with_label_values(&[label.as_deref().unwrap_or("none"), resp.status().as_str()])
        .inc();
    m.duration.observe(elapsed.as_secs_f64());
    if let Some(line) = line {
        let format = shared.runtime.load().config.access_log.format;
        let tls = ctx.tls_protocol.get().copied();
        access::log(format, ctx.peer, &line, &resp, label.as_deref(), elapsed, tls);
    }
    Ok(resp)
}

/// Sends the request to a server, retrying as configured; returns the response and the label of
/// the server that produced it.
async fn proxy(
    shared: &Shared,
    ctx: &Arc<ConnCtx>,
    mut req: Request<Incoming>,
    start: Instant,
) -> (Response<RespBody>, Option<Arc<str>>) {
    // RFC 8441: an extended CONNECT for a websocket goes upstream as an HTTP/1.1 handshake.
    let h2_websocket = crate::h2_websocket::is_websocket_connect(&req);
    if req.method() == http::Method::CONNECT && req.version() == Version::HTTP_2 && !h2_websocket {
        // A plain CONNECT (a tunnel), or another `:protocol`: lb is no forward proxy.
        return (
            error_response(
                StatusCode::NOT_IMPLEMENTED,
                "CONNECT is only for websockets over HTTP/2 (RFC 8441, :protocol websocket)\n",
            ),
            None,
        );
    }
    // The same head rules as the fast path (hyper's parser takes some of these, e.g. a second
    // Host, or Content-Length beside Transfer-Encoding, which would be forwarded ambiguously).
    if req.version() <= Version::HTTP_11 {
        let heads = req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        let target_ok = req.uri().path().starts_with('/') && req.uri().path() != "*";
        let checked = head_check::check_line(req.method().as_str().as_bytes(), target_ok)
            .and_then(|()| head_check::check(req.version() == Version::HTTP_11, heads));
        if let Err(bad) = checked {
            tracing::debug!(peer = %ctx.peer, reason = %bad, "bad request head");
            let status = if bad == BadHead::BadMethod {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::BAD_REQUEST
            };
            let mut r = error_response(status, bad_request_text(bad));
            // The body's extent is in doubt: never read another request from this connection.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return (r, None);
        }
    }
    let rt = shared.runtime.load_full();
    let cfg = &rt.config;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let route = rt.router.route(&RouteRequest {
        listen: ctx.listen,
        port: ctx.port,
        tls: ctx.tls,
        host,
        path: req.uri().path(),
        query: req.uri().query(),
    });
    let (group, target, grpc) = match route {
        Route::Proxy { upstream, uri, grpc } => (upstream, uri, grpc),
        Route::Respond {
            status,
            location,
            body,
        } => return (route_response(status, location, body), None),
        Route::Files {
            candidates,
            fallback,
            redirect_dirs,
            slash_location,
        } => {
            let files = crate::files::Files {
                candidates,
                fallback,
                redirect_dirs,
                slash_location,
            };
            return (
                crate::files::serve(req.method(), req.headers(), &files).await,
                None,
            );
        }
    };
    let limit = cfg.limits.max_body_bytes;
    if limit > 0 {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return (
                error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
                None,
            );
        }
    }
    if grpc && h2_websocket {
        return (
            error_response(StatusCode::NOT_IMPLEMENTED, "websockets to a grpc:// upstream\n"),
            None,
        );
    }
    // An HTTP/2 (gRPC) upstream takes no HTTP/1.1 upgrade: the Upgrade header is dropped.
    let upgrade = h2_websocket || (!grpc && wants_upgrade(&req));
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let h2 = parts.version == Version::HTTP_2;
    let slot = (!body.is_end_stream()).then(|| BodySlot::new(body, limit, h2));
    if h2_websocket {
        // The upstream sees the GET of an HTTP/1.1 websocket handshake.
        parts.method = http::Method::GET;
    }
    let idempotent = parts.method.is_idempotent();

    let mut headers = std::mem::take(&mut parts.headers);
    // gRPC servers want `te: trailers` (the one TE value HTTP/2 allows); nginx's grpc_pass
    // passes it on.
    let te_trailers = grpc
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    strip_hop_by_hop(&mut headers, upgrade);
    if h2_websocket {
        crate::h2_websocket::to_http1_handshake(&mut headers);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let host_override = (!cfg.headers.host.is_empty())
        .then(|| HeaderValue::from_str(&cfg.headers.host).ok())
        .flatten();
    forwarding_headers(
        &mut headers,
        &parts.uri,
        ctx.peer,
        host_override.as_ref(),
        ctx.tls,
    );
    // Headers stay in `parts` for hashing; hop-by-hop-free copies go upstream.
    parts.headers = headers;

    let up = rt.group(group);
    let max_tries = match cfg.retry.tries {
        0 => up.servers.len(),
        n => (n as usize).min(up.servers.len()),
    }
    .max(1);
    let deadline = (!cfg.retry.timeout.get().is_zero()).then(|| start + cfg.retry.timeout.get());
    let response_timeout = cfg.timeouts.upstream_response.get();
    let path = match target.map(http::uri::PathAndQuery::try_from) {
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            return (
                error_response(StatusCode::BAD_REQUEST, "bad rewritten request target\n"),
                None,
            )
        }
        None => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    };
    let mut pick = RequestPick::default();
    let mut give_up = GiveUp::BadGateway;
    let mut last_label = None;

    for attempt in 0..max_tries {
        if attempt > 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            shared.metrics.retries.inc();
        }
        let Some(i) = up.pick(&parts, ctx.peer.ip(), &mut pick, Instant::now()) else {
            break;
        };
        let server = up.servers[i].clone();
        last_label = Some(server.label.clone());
        server.requests.fetch_add(1, Ordering::Relaxed);
        // Cached authority and the request's own path: no parsing or copying per try.
        let mut uri_parts = http::uri::Parts::default();
        uri_parts.scheme = Some(http::uri::Scheme::HTTP);
        uri_parts.authority = Some(server.authority.clone());
        uri_parts.path_and_query = Some(path.clone());
        let Ok(uri) = Uri::from_parts(uri_parts) else {
            return (
                error_response(StatusCode::BAD_REQUEST, "bad request target\n"),
                None,
            );
        };
        let body = match &slot {
            None => UpBody::Empty,
            Some(s) => UpBody::Lazy {
                slot: s.clone(),
                taken: None,
                seen: 0,
            },
        };
        let mut ureq = Request::new(body);
        *ureq.method_mut() = parts.method.clone();
        *ureq.uri_mut() = uri;
        let client = if grpc {
            *ureq.version_mut() = Version::HTTP_2;
            &rt.client.h2
        } else {
            *ureq.version_mut() = Version::HTTP_11;
            &rt.client.h1
        };
        *ureq.headers_mut() = parts.headers.clone();
        // A request with a body: keep a handle on its connection, to keep it out of the pool
        // if the upstream answers before it has the whole body (below).
        let captured = slot
            .as_ref()
            .map(|_| hyper_util::client::legacy::connect::capture_connection(&mut ureq));
        let guard = ActiveGuard::new(server.clone());
        let sent = tokio::time::timeout(response_timeout, client.request(ureq)).await;
        let retryable_body = slot.as_ref().is_none_or(|s| s.unsent());
        match sent {
            Err(_) => {
                server.record_failure(Instant::now());
                shared.metrics.failures.with_label_values(&[&*server.label]).inc();
                tracing::warn!(server = %server.label, "upstream timed out");
                give_up = GiveUp::Timeout;
                break;
            }
            Ok(Err(e)) => {
                if slot.as_ref().is_some_and(|s| s.too_large()) {
                    give_up = GiveUp::TooLarge;
                    break;
                }
                server.record_failure(Instant::now());
                shared.metrics.failures.with_label_values(&[&*server.label]).inc();
                tracing::warn!(server = %server.label, error = %e, connect = e.is_connect(), "upstream try failed");
                give_up = GiveUp::BadGateway;
                // A connect error means nothing was sent; other errors only retry an idempotent
                // request whose body never left.
                if retryable_body && (e.is_connect() || idempotent) {
                    continue;
                }
                break;
            }
            Ok(Ok(resp)) => {
                if slot.as_ref().is_some_and(|s| !s.ended()) {
                    // An answer before the whole body: the upstream may close the connection
                    // without saying so (hyper's server does when it cannot drain the body),
                    // and a request sent on it from the pool would fail. nginx does not keep
                    // such a connection either (`request_body_sent`).
                    if let Some(c) = &captured {
                        if let Some(conn) = c.connection_metadata().as_ref() {
                            conn.poison();
                        }
                    }
                }
                let status = resp.status();
                let can_retry_status = cfg.retry.on_status
                    && idempotent
                    && retryable_body
                    && matches!(status.as_u16(), 502..=504)
                    && attempt + 1 < max_tries;
                if can_retry_status {
                    server.record_failure(Instant::now());
                    shared.metrics.failures.with_label_values(&[&*server.label]).inc();
                    continue;
                }
                server.record_success(Instant::now());
                let label = Some(server.label.clone());
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return (
                        relay_upgrade(shared, ctx, resp, client_upgrade, guard, h2_websocket),
                        label,
                    );
                }
                if h2_websocket && status.is_success() {
                    // A 2xx would open the tunnel on the client's side with nothing behind it.
                    return (
                        error_response(
                            StatusCode::BAD_GATEWAY,
                            "upstream did not switch to the websocket protocol\n",
                        ),
                        label,
                    );
                }
                let (mut rparts, rbody) = resp.into_parts();
                if rparts.headers.contains_key(header::TRANSFER_ENCODING) {
                    // hyper decoded the body by its chunks; a Content-Length beside them would
                    // frame the client's copy differently (RFC 9112 section 6.3).
                    rparts.headers.remove(header::CONTENT_LENGTH);
                }
                strip_hop_by_hop(&mut rparts.headers, false);
                let body = RespBody::Upstream {
                    inner: rbody,
                    guard: Some(guard),
                    idle: response_timeout,
                    timer: None,
                    armed: false,
                };
                return (Response::from_parts(rparts, body), label);
            }
        }
    }
    let resp = match give_up {
        GiveUp::BadGateway => error_response(
            StatusCode::BAD_GATEWAY,
            "bad gateway: no upstream server answered\n",
        ),
        GiveUp::Timeout => error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway timeout: upstream did not answer in time\n",
        ),
        GiveUp::TooLarge => error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
    };
    (resp, last_label)
}

/// Answers the client's upgrade with the upstream's 101 and relays bytes both ways until either
/// side closes or shutdown's deadline passes.
fn relay_upgrade(
    shared: &Shared,
    ctx: &Arc<ConnCtx>,
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    guard: ActiveGuard,
    h2_websocket: bool,
) -> Response<RespBody> {
    let Some(client_upgrade) = client_upgrade else {
        // The upstream switched protocols although the client did not ask: refuse to relay.
        return error_response(StatusCode::BAD_GATEWAY, "upstream switched protocols unasked\n");
    };
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let hard = ctx.hard.clone();
    let permit = ctx.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
    // A websocket on an HTTP/2 stream keeps its connection busy: no idle close under it.
    let held = h2_websocket.then(|| ctx.hold());
    let gauge = shared.metrics.upgraded.clone();
    let idle = shared.runtime.load().config.timeouts.upgraded_idle.get();
    ctx.tracker.spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let _held = held;
        let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade failed");
                return;
            }
        };
        gauge.inc();
        let clock = ActivityClock::new();
        let mut client = Activity {
            inner: TokioIo::new(client),
            clock: &clock,
        };
        let mut upstream = Activity {
            inner: TokioIo::new(upstream),
            clock: &clock,
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
            }
            _ = clock.idle_for(idle) => tracing::debug!(?idle, "closing idle upgraded connection"),
            _ = hard.cancelled() => tracing::info!("closing upgraded connection at the shutdown deadline"),
        }
        gauge.dec();
    });
    let (mut parts, _) = resp.into_parts();
    // Keep Upgrade and Connection: they are the point of a 101.
    for name in &HOP_BY_HOP[1..] {
        parts.headers.remove(name);
    }
    if h2_websocket {
        // RFC 8441: the HTTP/2 client's tunnel opens with a 200 and no upgrade headers.
        parts.status = StatusCode::OK;
        crate::h2_websocket::strip_switching_headers(&mut parts.headers);
    }
    Response::from_parts(parts, RespBody::Full(None))
}

/// When bytes last moved on an upgraded connection, in milliseconds since `start`.
struct ActivityClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl ActivityClock {
    fn new() -> Self {
        ActivityClock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle`; re-arms on every wake instead of per byte.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// An I/O half that records activity on the shared clock.
struct Activity<'a, T> {
    inner: T,
    clock: &'a ActivityClock,
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key("x-kept"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
    }

    #[test]
    fn every_name_connection_lists_is_stripped() {
        let mut h = HeaderMap::new();
        let names: Vec<String> = (0..40).map(|i| format!("x-hop-{i}")).collect();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_str(&names[..20].join(", ")).unwrap(),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_str(&names[20..].join(",")).unwrap(),
        );
        for n in &names {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn forwarding_headers_append_and_set() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        let uri: Uri = "/x".parse().unwrap();
        forwarding_headers(&mut h, &uri, "10.0.0.9:1234".parse().unwrap(), None, false);
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "1.1.1.1, 10.0.0.9");
        assert_eq!(h.get(&X_REAL_IP).unwrap(), "10.0.0.9");
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(
            h.get(header::FORWARDED).unwrap(),
            "for=10.0.0.9;proto=http;host=\"example.com\""
        );
        assert_eq!(h.get(header::HOST).unwrap(), "example.com");

        let mut h = HeaderMap::new();
        let uri: Uri = "http://svc:81/x".parse().unwrap();
        let over = HeaderValue::from_static("internal");
        forwarding_headers(&mut h, &uri, "[::1]:5".parse().unwrap(), Some(&over), true);
        assert_eq!(
            h.get(header::FORWARDED).unwrap(),
            "for=\"[::1]\";proto=https;host=\"svc:81\""
        );
        assert_eq!(h.get(header::HOST).unwrap(), "internal");
    }

    #[test]
    fn methods_that_may_be_retried() {
        assert!(Method::GET.is_idempotent());
        assert!(Method::PUT.is_idempotent());
        assert!(!Method::POST.is_idempotent());
        assert!(!Method::PATCH.is_idempotent());
    }
}
