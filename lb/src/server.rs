//! The client side: accept loop with a connection cap, HTTP/1.1 + h2c per connection (hyper-util's
//! auto builder), header/idle timeouts, and graceful shutdown that drains with a deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fast::Outcome;
use crate::Shared;

/// Per-connection state the request handler and the idle watchdog share.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    /// The client.
    pub peer: SocketAddr,
    /// The configured address of the listener it came in on (what `vhosts.listen` names).
    pub listen: SocketAddr,
    /// The local port it came in on (for absolute redirects).
    pub port: u16,
    /// The listener speaks TLS.
    pub tls: bool,
    /// The negotiated TLS version, as nginx's `$ssl_protocol`, once the handshake is done.
    pub tls_protocol: std::sync::OnceLock<&'static str>,
    /// Tasks that must finish before shutdown completes (upgraded connections).
    pub tracker: TaskTracker,
    /// Cancelled when the shutdown deadline passes: upgraded connections close then.
    pub hard: CancellationToken,
    /// The connection's slot under `limits.max_connections`; an upgrade takes it along, so
    /// relayed websockets count against the limit for as long as they live.
    pub permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    inflight: AtomicU32,
    seen_request: AtomicBool,
    /// Milliseconds since `opened` of the last request start or end.
    last_activity_ms: AtomicU64,
    opened: Instant,
}

/// Marks a request in flight on a connection.
pub(crate) struct Inflight<'a>(&'a ConnCtx);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks something living on the connection (a websocket on an HTTP/2 stream) as a request in
/// flight for as long as it is held, so the idle watchdog leaves the connection open.
pub(crate) struct HeldInflight(Arc<ConnCtx>);

impl Drop for HeldInflight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnCtx {
    /// Like [`ConnCtx::begin`], for a guard that outlives the request (moved into a task).
    pub fn hold(self: &Arc<Self>) -> HeldInflight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        HeldInflight(self.clone())
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Records that the fast path served a request (the hyper path's idle rules then apply).
    pub fn mark_request(&self) {
        self.seen_request.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// Records the start of a request; the returned guard records its end.
    pub fn begin(&self) -> Inflight<'_> {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.seen_request.store(true, Ordering::Relaxed);
        self.touch();
        Inflight(self)
    }

    /// When the connection may be closed for idleness, if no request is in flight.
    fn idle_deadline(&self, header_read: Duration, client_idle: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = self.opened + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        // Before the first request the header timeout applies (hyper only starts its own once it
        // knows the protocol); between requests the idle timeout does.
        if self.seen_request.load(Ordering::Relaxed) {
            Some(last + client_idle)
        } else {
            Some(last + header_read)
        }
    }
}

/// Serves clients on `listener` until `shutdown`, then drains for `timeouts.shutdown_grace`.
/// Fails only when the serving threads cannot be started.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listeners: Vec<(SocketAddr, TcpListener)>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    let hard = CancellationToken::new();
    let (max, workers) = {
        let rt = shared.runtime.load();
        (rt.config.limits.max_connections, rt.config.workers)
    };
    let permits = Arc::new(Semaphore::new(max));
    let tls_addrs = crate::tls::tls_addrs(&shared.runtime.load().config);
    let workers = common::workers::Workers::start("lb-worker", workers)?;
    let mut limit = max;
    // Permits to take out of circulation after a reload lowered the limit: each is forgotten
    // as soon as the loop gets it, before any new connection could.
    let mut debt = 0usize;
    loop {
        // A reload may have changed the limit.
        let wanted = shared.runtime.load().config.limits.max_connections;
        if wanted != limit {
            tracing::info!(from = limit, to = wanted, "max_connections changed");
            if wanted > limit {
                let grow = wanted - limit;
                let repaid = grow.min(debt);
                debt -= repaid;
                permits.add_permits(grow - repaid);
            } else {
                debt += limit - wanted;
            }
            limit = wanted;
        }
        if debt > 0 {
            debt -= permits.forget_permits(debt);
        }
        // Waiting for a permit before accepting leaves excess clients in the kernel's backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.reloaded.notified() => continue,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        if debt > 0 {
            permit.forget();
            debt -= 1;
            continue;
        }
        let accept = std::future::poll_fn(|cx| {
            for (i, (_, l)) in listeners.iter().enumerate() {
                if let Poll::Ready(r) = l.poll_accept(cx) {
                    return Poll::Ready(r.map(|(s, p)| (s, p, i)));
                }
            }
            Poll::Pending
        });
        let (stream, peer, which) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.reloaded.notified() => continue,
            r = accept => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let listen = listeners[which].0;
        let port = stream.local_addr().map_or(listen.port(), |a| a.port());
        let ctx = Arc::new(ConnCtx {
            peer,
            listen,
            port,
            tls: tls_addrs.contains(&listen),
            tls_protocol: std::sync::OnceLock::new(),
            tracker: tracker.clone(),
            hard: hard.clone(),
            permit: std::sync::Mutex::new(Some(permit)),
            inflight: AtomicU32::new(0),
            seen_request: AtomicBool::new(false),
            last_activity_ms: AtomicU64::new(0),
            opened: Instant::now(),
        });
        // Counted before the hand-over, so the drain below cannot miss a connection in transit.
        let token = tracker.token();
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        workers.serve(stream, move |stream| async move {
            connection(shared, stream, ctx, shutdown).await;
            drop(token);
        });
    }
    drop(listeners);
    tracker.close();
    let grace = shared.runtime.load().config.timeouts.shutdown_grace.get();
    tracing::info!(
        connections = shared.metrics.active_connections.get(),
        ?grace,
        "draining"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("shutdown deadline passed: closing the remaining connections");
        hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
    Ok(())
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, ctx: Arc<ConnCtx>, shutdown: CancellationToken) {
    let gauge = shared.metrics.active_connections.clone();
    gauge.inc();
    if ctx.tls {
        // After the handshake, HTTP/2 (by ALPN) goes to hyper; HTTP/1.1 takes the fast path
        // like a plain connection.
        if let Some(tls) = handshake(&shared, stream, &ctx).await {
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                serve_hyper(&shared, tls, &ctx, &shutdown).await;
            } else {
                fast_then_hyper(&shared, tls, &ctx, &shutdown).await;
            }
        }
        gauge.dec();
        return;
    }
    fast_then_hyper(&shared, stream, &ctx, &shutdown).await;
    gauge.dec();
}

/// Serves a connection on the fast path while its requests suit it, then on hyper's.
async fn fast_then_hyper<S>(
    shared: &Arc<Shared>,
    mut stream: S,
    ctx: &Arc<ConnCtx>,
    shutdown: &CancellationToken,
) where
    S: crate::fast::ClientStream + 'static,
{
    let outcome = tokio::select! {
        o = crate::fast::serve(shared, ctx, &mut stream, shutdown) => o,
        _ = ctx.hard.cancelled() => Outcome::Closed,
    };
    if let Outcome::Fallback(prefix) = outcome {
        let io = Prefixed {
            prefix,
            inner: stream,
        };
        serve_hyper(shared, io, ctx, shutdown).await;
    }
}

/// The TLS handshake, bounded by `timeouts.header_read`; `None` when it fails (logged).
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
    ctx: &ConnCtx,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let (acceptor, limit) = {
        let rt = shared.runtime.load();
        (
            rt.tls.acceptor(ctx.listen).cloned(),
            rt.config.timeouts.header_read.get(),
        )
    };
    let Some(acceptor) = acceptor else {
        tracing::warn!(listen = %ctx.listen, "no TLS settings for this address any more: closing");
        return None;
    };
    let done = tokio::select! {
        r = tokio::time::timeout(limit, acceptor.accept(stream)) => r,
        _ = ctx.hard.cancelled() => return None,
    };
    match done {
        Ok(Ok(tls)) => {
            let _ = ctx
                .tls_protocol
                .set(crate::tls::protocol_name(tls.get_ref().1.protocol_version()));
            Some(tls)
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %ctx.peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %ctx.peer, "TLS handshake timed out");
            None
        }
    }
}

/// A client stream with bytes already read from it in front (the fast path's leftovers).
struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the rest of a connection with hyper (HTTP/1.1 with bodies and upgrades, and h2c).
async fn serve_hyper<I>(shared: &Arc<Shared>, stream: I, ctx: &Arc<ConnCtx>, shutdown: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (header_read, client_idle, max_header, client_send) = {
        let rt = shared.runtime.load();
        let c = &rt.config;
        (
            c.timeouts.header_read.get(),
            c.timeouts.client_idle.get(),
            c.limits.max_header_bytes,
            c.timeouts.client_send.get(),
        )
    };
    let stream = crate::send_timeout::SendTimeout::new(stream, client_send);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_buf_size(max_header)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        // nginx's `http2_max_concurrent_streams` default.
        .max_concurrent_streams(128)
        // RFC 8441: websockets over HTTP/2 (`h2_websocket`).
        .enable_connect_protocol();
    let svc_shared = shared.clone();
    let svc_ctx = ctx.clone();
    let service =
        hyper::service::service_fn(move |req| crate::proxy::handle(svc_shared.clone(), svc_ctx.clone(), req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        // Requests move the deadline without waking this loop, so look again at least every
        // `tick`: a connection closes at most one tick after its deadline.
        let tick = Instant::now() + client_idle.min(header_read);
        let wake = ctx
            .idle_deadline(header_read, client_idle)
            .map_or(tick, |d| d.min(tick));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %ctx.peer, error = %e, "client connection ended with an error");
                }
                break;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = ctx.hard.cancelled() => break,
            _ = tokio::time::sleep_until(wake.into()) => {
                if ctx.idle_deadline(header_read, client_idle).is_some_and(|d| d <= Instant::now()) {
                    if !ctx.seen_request.load(Ordering::Relaxed) {
                        tracing::debug!(peer = %ctx.peer, "no request head in time: closing");
                        break;
                    }
                    if !draining {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        break;
                    }
                }
            }
        }
    }
}
