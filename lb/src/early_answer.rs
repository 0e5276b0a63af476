//! Upstream connections on which an early answer wins over a failed body write.
//!
//! An upstream may answer a request before it has read the body (a 413, a redirect, a handler that
//! ignores the body), and then close its connection; RFC 9112 section 9.5 asks the client to stop
//! sending and take the answer. When the rest of the body reaches the closed socket, the upstream's
//! kernel resets the connection, and lb's next write fails with `ECONNRESET` or `EPIPE`. hyper's
//! client fails the request on that write error when it has not yet *read* the answer, although
//! the answer arrived before the reset and is still in the socket's receive queue: whether lb's
//! client saw 200 or 502 depended on which readiness event the runtime handled first.
//!
//! [`EarlyAnswer`] makes that order not matter: a write that fails because the peer reset or
//! closed the connection does not fail at once; it waits (the bytes are dropped, as the peer drops
//! them) until the read side has reached the end of the connection, and fails then. hyper meanwhile
//! reads the answer the upstream sent before the reset and hands it on; then it meets the end of
//! the connection in the middle of its request and closes it, so the connection never goes back to
//! the pool (a reused connection whose request body was cut would fail the next request). With no
//! answer in the socket, the read side fails first and the request gets its 502, as before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::future::{MapOk, TryFutureExt};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An upstream connection whose failed writes wait for the read side's end (see the module).
#[derive(Debug)]
pub struct EarlyAnswer<T> {
    inner: T,
    /// The write error seen when the peer had gone, held until the read side ends.
    gone: Option<io::ErrorKind>,
    /// The read side returned its end (0 bytes) or an error.
    read_ended: bool,
    /// The writer waiting for the read side's end.
    writer: Option<Waker>,
}

impl<T> EarlyAnswer<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        EarlyAnswer {
            inner,
            gone: None,
            read_ended: false,
            writer: None,
        }
    }

    /// A write on a connection the peer left: the held error once the read side has ended,
    /// otherwise wait for that.
    fn held<R>(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<R>>> {
        let kind = self.gone?;
        if self.read_ended {
            return Some(Poll::Ready(Err(kind.into())));
        }
        self.writer = Some(cx.waker().clone());
        Some(Poll::Pending)
    }

    /// A peer-gone write error becomes a wait for the read side's end.
    fn settle<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(Err(e)) if peer_gone(&e) => {
                tracing::debug!(error = %e, "upstream closed while lb wrote; reading its answer first");
                self.gone = Some(e.kind());
                self.held(cx).unwrap_or(Poll::Pending)
            }
            other => other,
        }
    }
}

/// The write errors that mean "the peer no longer reads": anything it answered is still readable.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for EarlyAnswer<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let ended = match &r {
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended {
            this.read_ended = true;
            if let Some(w) = this.writer.take() {
                w.wake();
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for EarlyAnswer<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(p) = this.held(cx) {
            return p;
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.settle(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(p) = this.held(cx) {
            return p;
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.settle(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(p) = this.held(cx) {
            return p;
        }
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.settle(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing needs nothing from a peer that has gone.
        let this = self.get_mut();
        if this.gone.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for EarlyAnswer<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

/// hyper-util's TCP connector, handing out [`EarlyAnswer`] connections.
#[derive(Clone, Debug)]
pub struct UpConnector(pub HttpConnector);

type Tcp = tokio::net::TcpStream;
type Wrapped = TokioIo<EarlyAnswer<Tcp>>;

fn wrap(io: TokioIo<Tcp>) -> Wrapped {
    TokioIo::new(EarlyAnswer::new(io.into_inner()))
}

impl tower_service::Service<Uri> for UpConnector {
    type Response = Wrapped;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = MapOk<<HttpConnector as tower_service::Service<Uri>>::Future, fn(TokioIo<Tcp>) -> Wrapped>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        self.0.call(dst).map_ok(wrap as fn(TokioIo<Tcp>) -> Wrapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Hides the socket's read readiness, once `armed`, until one write has been tried: the order
    /// in which a busy runtime may hand hyper the events (the client's body chunk first, the
    /// upstream's answer second).
    struct LateReads {
        inner: Tcp,
        armed: Arc<AtomicBool>,
        wrote: bool,
        parked: Option<Waker>,
    }

    impl AsyncRead for LateReads {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.armed.load(Ordering::SeqCst) && !this.wrote {
                this.parked = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Pin::new(&mut this.inner).poll_read(cx, buf)
        }
    }

    impl LateReads {
        fn after_write<R>(&mut self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
            if self.armed.load(Ordering::SeqCst) && r.is_ready() {
                self.wrote = true;
                if let Some(w) = self.parked.take() {
                    w.wake();
                }
            }
            r
        }
    }

    impl AsyncWrite for LateReads {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_write(cx, buf);
            this.after_write(r)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_flush(cx);
            this.after_write(r)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// The upstream answers the head at once and resets the connection (as a server that closes
    /// with the body unread does); only then does the client's body chunk reach lb's side.
    /// Returns the status and whether the connection could take another request.
    async fn answered_then_reset(wrap: bool) -> Result<(u16, bool), hyper::Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reset_tx, reset_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "head not received");
                head.extend_from_slice(&buf[..n]);
            }
            // A keep-alive answer: only the cut request body makes the connection unusable.
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                .await
                .unwrap();
            // Zero linger: close() sends a reset instead of a FIN.
            s.set_zero_linger().unwrap();
            drop(s);
            let _ = reset_tx.send(());
        });
        let armed = Arc::new(AtomicBool::new(false));
        let late = LateReads {
            inner: Tcp::connect(addr).await.unwrap(),
            armed: armed.clone(),
            wrote: false,
            parked: None,
        };
        let (body_tx, mut body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| body_rx.poll_recv(cx)));
        let (mut send, conn) = if wrap {
            let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(EarlyAnswer::new(late))).await?;
            (s, tokio::spawn(async move { c.await.map(|_| ()) }))
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(late)).await?;
            (s, tokio::spawn(async move { c.await.map(|_| ()) }))
        };
        let req = http::Request::post("/upload")
            .header("host", "up")
            .header("content-length", "8")
            .body(body)
            .unwrap();
        let answer = tokio::spawn(async move {
            let r = send.send_request(req).await;
            (r, send)
        });
        reset_rx.await.unwrap();
        // A loopback reset is in lb's socket by the time close() returns: from here, writes
        // fail in the kernel, and reads are held back until one has been tried.
        armed.store(true, Ordering::SeqCst);
        let _ = body_tx
            .send(Ok(Frame::data(Bytes::from_static(b"k=v&x=yz"))))
            .await;
        drop(body_tx);
        let (resp, mut send) = answer.await.unwrap();
        let resp = resp?;
        let status = resp.status().as_u16();
        let text = resp.into_body().collect().await?.to_bytes();
        assert_eq!(&text[..], b"early");
        let _ = conn.await;
        let reusable = futures_util::future::poll_fn(|cx| send.poll_ready(cx))
            .await
            .is_ok();
        Ok((status, reusable))
    }

    #[tokio::test]
    async fn an_answer_sent_before_the_reset_wins_over_the_failed_body_write() {
        // Without the wrapper the write meets the reset first and the request fails: the test's
        // set-up reproduces the 502.
        let bare = answered_then_reset(false).await;
        assert!(
            bare.is_err(),
            "without EarlyAnswer the write error wins: {bare:?}"
        );
        let (status, reusable) = answered_then_reset(true).await.expect("the early answer");
        assert_eq!(status, 200);
        assert!(!reusable, "a connection whose request body was cut is not reused");
    }
}
