//! Body types of the proxy. The request body sent upstream stays in a shared slot until hyper
//! first polls it, so a try that failed before sending a byte (connect error) can hand the same
//! body to the next server. The response body keeps the server's in-flight count until it ends.
//! An HTTP/2 request body that nobody took to its end (the upstream answered without reading it,
//! or lb answered itself) is drained, bounded, instead of dropped: dropping it while the client
//! is still sending makes h2 reset the stream, which curl takes as a failed transfer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::upstream::Server;

/// A boxed error for body streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body exceeded `limits.max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// At most this much of an abandoned HTTP/2 request body is read and discarded.
const DRAIN_BYTES: u64 = 1024 * 1024;
/// For at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads what remains of an HTTP/2 request body in a task of its own, so that the client's
/// stream ends with its own END_STREAM. Past [`DRAIN_BYTES`] or [`DRAIN_TIME`] the body is
/// dropped, and h2 resets the stream with NO_ERROR (RFC 9113 section 8.1).
fn drain(mut body: Incoming) {
    if body.is_end_stream() {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let mut seen = 0u64;
        let read = async {
            while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                let Ok(frame) = frame else { return };
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DRAIN_BYTES {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, read).await;
    });
}

/// The client's body, waiting to be sent by whichever try polls it first.
#[derive(Debug)]
pub struct BodySlot {
    body: Mutex<Option<Incoming>>,
    too_large: AtomicBool,
    /// The body's end was handed to the upstream connection.
    ended: AtomicBool,
    limit: u64,
    /// Drain what no try took (HTTP/2 bodies; hyper's HTTP/1 server handles its own).
    drain: bool,
}

impl BodySlot {
    /// Wraps `body`; `limit` 0 means unlimited; `drain` for HTTP/2 bodies.
    pub fn new(body: Incoming, limit: u64, drain: bool) -> Arc<BodySlot> {
        Arc::new(BodySlot {
            body: Mutex::new(Some(body)),
            too_large: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            limit,
            drain,
        })
    }

    /// Whether no try has started sending the body yet.
    pub fn unsent(&self) -> bool {
        self.body.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Whether a try has handed the body's end to its upstream connection.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Whether sending stopped because the body was too large.
    pub fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }
}

impl Drop for BodySlot {
    fn drop(&mut self) {
        let body = self.body.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(body) = body.filter(|_| self.drain && !self.too_large()) {
            drain(body);
        }
    }
}

/// The body of one upstream try.
#[derive(Debug)]
pub enum UpBody {
    /// No body (most GETs): nothing to keep for retries.
    Empty,
    /// A body shared by every try; taken on first poll.
    Lazy {
        /// Where the body waits.
        slot: Arc<BodySlot>,
        /// The body once this try took it.
        taken: Option<Incoming>,
        /// Bytes passed so far.
        seen: u64,
    },
}

impl UpBody {
    /// Whether the body could still be sent by another try.
    pub fn retryable(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Lazy { slot, .. } => slot.unsent(),
        }
    }
}

impl Drop for UpBody {
    fn drop(&mut self) {
        if let UpBody::Lazy { slot, taken, .. } = self {
            if let Some(body) = taken.take().filter(|_| slot.drain && !slot.too_large()) {
                drain(body);
            }
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Lazy { slot, taken, seen } => {
                if taken.is_none() {
                    *taken = slot.body.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if taken.is_none() {
                        // Another try already consumed it; this one cannot send it again.
                        return Poll::Ready(Some(Err(
                            "request body already consumed by an earlier try".into()
                        )));
                    }
                }
                let Some(inner) = taken.as_mut() else {
                    return Poll::Ready(None);
                };
                match Pin::new(&mut *inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            *seen += data.len() as u64;
                            if slot.limit > 0 && *seen > slot.limit {
                                slot.too_large.store(true, Ordering::Relaxed);
                                return Poll::Ready(Some(Err(Box::new(TooLarge(slot.limit)))));
                            }
                        }
                        if inner.is_end_stream() {
                            slot.ended.store(true, Ordering::Relaxed);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Ready(None) => {
                        slot.ended.store(true, Ordering::Relaxed);
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Lazy { taken: Some(b), .. } => b.is_end_stream(),
            UpBody::Lazy { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Lazy { taken: Some(b), .. } => b.size_hint(),
            UpBody::Lazy { slot, .. } => slot
                .body
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}

/// Decrements a server's in-flight count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(pub Arc<Server>);

impl ActiveGuard {
    /// Counts one more request in flight on `server`.
    pub fn new(server: Arc<Server>) -> ActiveGuard {
        server.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(server)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the client receives.
#[derive(Debug)]
pub enum RespBody {
    /// A short body lb wrote itself (errors).
    Full(Option<Bytes>),
    /// A file's bytes (`root`/`alias`), read in chunks as the client takes them.
    File {
        /// The file, positioned at the first byte to send.
        file: tokio::fs::File,
        /// Bytes still to send.
        remaining: u64,
    },
    /// The upstream's body, streamed.
    Upstream {
        /// The stream.
        inner: Incoming,
        /// Keeps the server's in-flight count until the body ends or is dropped.
        guard: Option<ActiveGuard>,
        /// Longest wait for the next piece of body (nginx's `proxy_read_timeout`).
        idle: Duration,
        /// Created only when a read would block, so bodies that arrive at once cost no timer;
        /// afterwards reset, not reallocated, for each wait.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        /// Whether `timer` is counting the current wait.
        armed: bool,
    },
}

/// The upstream stopped sending its body for longer than the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for {0:?}")]
pub struct Stalled(pub Duration);

impl RespBody {
    /// A fixed body.
    pub fn text(s: &'static str) -> RespBody {
        RespBody::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::File { file, remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = usize::try_from(*remaining).unwrap_or(usize::MAX).min(64 * 1024);
                let mut chunk = bytes::BytesMut::with_capacity(want);
                match tokio_util::io::poll_read_buf(Pin::new(file), cx, &mut chunk) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Ready(Ok(0)) => {
                        *remaining = 0;
                        Poll::Ready(Some(Err("file shorter than its size".into())))
                    }
                    Poll::Ready(Ok(n)) => {
                        let n = (n as u64).min(*remaining);
                        *remaining -= n;
                        chunk.truncate(n as usize);
                        Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
                    }
                }
            }
            RespBody::Upstream {
                inner,
                guard,
                idle,
                timer,
                armed,
            } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(r) => {
                    if matches!(r, None | Some(Err(_))) {
                        guard.take();
                    }
                    *armed = false;
                    Poll::Ready(r.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
                }
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + *idle;
                    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if !*armed {
                        t.as_mut().reset(deadline);
                        *armed = true;
                    }
                    if t.as_mut().poll(cx).is_ready() {
                        guard.take();
                        return Poll::Ready(Some(Err(Box::new(Stalled(*idle)))));
                    }
                    Poll::Pending
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::File { remaining, .. } => *remaining == 0,
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::File { remaining, .. } => SizeHint::with_exact(*remaining),
            RespBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
