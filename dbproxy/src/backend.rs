//! Framed sockets ([`Conn`]) and backend connections: connecting to a node (over TLS when
//! `[tls]` says so, see `backend_tls`), logging in with whatever method it asks for
//! (SCRAM-SHA-256, md5, cleartext, trust), and the per-connection bookkeeping a session needs
//! (which prepared statements exist there, which SETs were applied).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{Credentials, ScramClient};
use crate::backend_tls::BackendTls;
use crate::config::BackendTlsMode;
use crate::memory::Charge;
use crate::protocol::{self, auth as pauth, error as perror, BackendMessage, Frame, ProtocolError};

/// Why talking to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Connecting or logging in took too long.
    #[error("timed out connecting to the server")]
    Timeout,
    /// The server broke the protocol.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// The server refused with this ErrorResponse (relayed to the client as is).
    #[error("server refused the login")]
    Refused(Frame),
    /// The server asked for a password the proxy does not have, or a method it does not speak.
    #[error("{0}")]
    Auth(String),
    /// The server closed the connection.
    #[error("server closed the connection unexpectedly")]
    Closed,
    /// There is no primary to connect to (none elected, or it cannot be reached) and none
    /// appeared within `failover.session_wait`.
    #[error("no primary server is available")]
    NoPrimary,
    /// The pool for this node, user and database stayed full (`pool.size` connections, the
    /// number given) for `pool.checkout_timeout`.
    #[error("no server connection became free within pool.checkout_timeout (pool.size = {0})")]
    PoolTimeout(usize),
    /// TLS to the server is wanted and cannot be had (refused, handshake or certificate
    /// check failed).
    #[error("tls to the server: {0}")]
    Tls(String),
}

/// A client or backend socket: plain TCP, or TLS once a client asked for it with SSLRequest (or
/// dbproxy asked a server).
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, dbproxy being the server (a client's connection).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS over TCP, dbproxy being the client (a connection to a PostgreSQL server).
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Between the two, during the handshake (never read or written).
    Upgrading,
}

impl Stream {
    fn gone() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotConnected, "connection is being upgraded")
    }

    /// Whether the bytes are encrypted.
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Stream::Tls(_) | Stream::TlsClient(_))
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsClient(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Upgrading => std::task::Poll::Ready(Err(Stream::gone())),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsClient(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Upgrading => std::task::Poll::Ready(Err(Stream::gone())),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsClient(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Upgrading => std::task::Poll::Ready(Err(Stream::gone())),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsClient(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Upgrading => std::task::Poll::Ready(Err(Stream::gone())),
        }
    }
}

/// The usual size of a connection's buffers.
const BUFFER: usize = 16 * 1024;

/// Buffers that grew past this for one large message go back to [`BUFFER`] once it has passed,
/// so a session that sent (or received) one 32 MiB message does not keep 32 MiB while idle.
const LARGE_BUFFER: usize = 1024 * 1024;

/// `buf`, or a fresh [`BUFFER`]-sized copy of its few bytes when its allocation is large.
fn right_sized(buf: BytesMut) -> BytesMut {
    if buf.capacity() <= LARGE_BUFFER || buf.len() > BUFFER {
        return buf;
    }
    let mut fresh = BytesMut::with_capacity(BUFFER);
    fresh.extend_from_slice(&buf);
    fresh
}

/// A socket with a read buffer and a write buffer, decoding whole frames.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// Bytes to write on the next [`Conn::flush`].
    pub wbuf: BytesMut,
    /// The largest frame accepted.
    pub max: usize,
    /// How long a write may make no progress (a peer that stops reading) before
    /// [`Conn::flush`] fails with `TimedOut`; `None`: no limit.
    pub write_timeout: Option<Duration>,
    /// Whether [`Conn::flush`] wrote anything since this was last cleared: the pool clears it
    /// when it hands a connection out, so one its client never used goes back without a reset.
    pub written: bool,
    /// What this connection's large messages hold of `limits.max_message_memory` (charged on a
    /// client's connection only).
    pub charge: Charge,
    /// The message at the head of the read buffer is charged already.
    charged_head: bool,
}

impl Conn {
    /// Wraps a connected socket.
    pub fn new(stream: TcpStream, max: usize) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn::over(Stream::Plain(stream), max)
    }

    /// Wraps a connected (possibly encrypted) stream.
    pub fn over(stream: Stream, max: usize) -> Conn {
        Conn {
            stream,
            rbuf: BytesMut::with_capacity(BUFFER),
            wbuf: BytesMut::with_capacity(BUFFER),
            max,
            write_timeout: None,
            written: false,
            charge: Charge::default(),
            charged_head: false,
        }
    }

    /// A frame already buffered, if any. A large message is charged against the connection's
    /// budget as soon as its header is in, before its body is read.
    pub fn buffered(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if !self.charged_head && self.rbuf.len() >= 5 {
            let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
            let total = usize::try_from(len).unwrap_or(0) + 1;
            if total > crate::memory::LARGE_MESSAGE && total <= self.max {
                self.charge
                    .message(total)
                    .map_err(|limit| ProtocolError::OverBudget { len: total, limit })?;
                self.charged_head = true;
            }
        }
        let frame = protocol::decode(&mut self.rbuf, self.max)?;
        if frame.is_some() {
            self.charged_head = false;
        }
        Ok(frame)
    }

    /// Reads and drops the next `n` bytes (the rest of a message refused unread), for at most
    /// `limit`: the peer's writes then complete, and it reads the error sent before the
    /// connection closes instead of a reset.
    pub async fn discard(&mut self, mut n: usize, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let take = n.min(self.rbuf.len());
                let _ = self.rbuf.split_to(take);
                n -= take;
                if n == 0 {
                    return;
                }
                if !matches!(self.stream.read_buf(&mut self.rbuf).await, Ok(1..)) {
                    return;
                }
            }
        })
        .await;
    }

    /// Reads more bytes; 0 means end of stream. Cancel-safe.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if !self.charged_head {
            // Reading again: the large messages taken from this buffer have been dealt with.
            self.charge.release();
        }
        self.rbuf = right_sized(std::mem::take(&mut self.rbuf));
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            // May take back the whole allocation a large frame came in (once that is dropped).
            self.rbuf.reserve(BUFFER);
            self.rbuf = right_sized(std::mem::take(&mut self.rbuf));
        }
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// The next frame; `Ok(None)` at end of stream. Cancel-safe: bytes stay buffered.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, BackendError> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Writes everything in the write buffer.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.written = true;
        let Some(limit) = self.write_timeout else {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            self.wbuf = right_sized(std::mem::take(&mut self.wbuf));
            if self.stream.is_encrypted() {
                // TLS buffers records: push them out.
                self.stream.flush().await?;
            }
            return Ok(());
        };
        let stalled = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer read nothing for the write timeout",
            )
        };
        // Each write must make progress within `limit`: a slow reader may take as long as it
        // needs, one that stopped reading is dropped (with the server connection it holds).
        let mut at = 0;
        while at < self.wbuf.len() {
            let n = tokio::time::timeout(limit, self.stream.write(&self.wbuf[at..]))
                .await
                .map_err(|_| stalled())??;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            at += n;
        }
        self.wbuf.clear();
        self.wbuf = right_sized(std::mem::take(&mut self.wbuf));
        if self.stream.is_encrypted() {
            tokio::time::timeout(limit, self.stream.flush())
                .await
                .map_err(|_| stalled())??;
        }
        Ok(())
    }

    /// Runs the server side of a TLS handshake on this (plain) connection and continues over TLS.
    pub async fn accept_tls(&mut self, acceptor: &tokio_rustls::TlsAcceptor) -> std::io::Result<()> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            return Err(Stream::gone());
        };
        let tls = acceptor.accept(tcp).await?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }
}

/// One logged-in connection to a node, owned by one session.
#[derive(Debug)]
pub struct Backend {
    /// The framed socket.
    pub conn: Conn,
    /// Index of the node in the cluster.
    pub node: usize,
    /// The node's address, for cancel requests.
    pub addr: SocketAddr,
    /// This side's address of the connection.
    pub local: Option<SocketAddr>,
    /// The pool's mark when the pool counts this connection (dropping it frees its place).
    pub pooled: Option<crate::pool::Tag>,
    /// The backend's BackendKeyData.
    pub key: (i32, i32),
    /// Named statements (and `""` for the unnamed one) that exist on this connection, each with
    /// the fingerprint of the Parse that made it: in transaction pooling another client's
    /// statement of the same name may be there, and is then prepared again (closed first).
    pub prepared: HashMap<String, u64>,
    /// Statements to close here before its next use (the client closed them elsewhere).
    pub to_close: Vec<String>,
    /// How many of the session's SET statements were applied here.
    pub sets_applied: usize,
    /// The client whose SET statements `sets_applied` counts (0: none yet); in transaction
    /// pooling a connection whose settings are another client's is reset before its next use.
    pub sets_owner: u64,
    /// Responses of injected queries still to swallow, counted by their ReadyForQuery.
    pub swallow_rfq: usize,
    /// ParseComplete messages of injected Parses still to swallow.
    pub swallow_parse: usize,
    /// CloseComplete messages of injected Closes still to swallow.
    pub swallow_close: usize,
    /// Responses of `pg_current_wal_insert_lsn()` queries sent behind a write, still to read (their
    /// value becomes the session's read-your-writes position).
    pub capture_lsn: usize,
    /// The frames arriving now answer such a query (from the end of the client's request until
    /// their ReadyForQuery).
    pub capturing: bool,
}

/// What a successful login produced besides the connection.
#[derive(Debug, Default)]
pub struct Greeting {
    /// ParameterStatus and NoticeResponse frames, to relay to the client.
    pub frames: Vec<Frame>,
}

/// Where and how to reach one node: its address and the TLS settings for it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Host name or address (also the name a `verify-full` certificate must carry).
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// The process's backend TLS settings.
    pub tls: &'a BackendTls,
    /// The TLS mode for this node.
    pub mode: BackendTlsMode,
}

impl<'a> Target<'a> {
    /// Node `node` with the settings in `tls`.
    pub fn new(node: &'a crate::config::NodeConfig, tls: &'a BackendTls) -> Target<'a> {
        Target {
            host: &node.host,
            port: node.port,
            tls,
            mode: tls.mode_for(node),
        }
    }
}

/// Connects to `target` and logs in with `params` as `user`; the whole exchange is bounded by
/// `timeout`. The password (when the server asks for one) comes from `creds`.
pub async fn connect(
    node: usize,
    target: Target<'_>,
    params: &[(String, String)],
    user: &str,
    creds: Option<&Credentials>,
    max: usize,
    timeout: Duration,
) -> Result<(Backend, Greeting), BackendError> {
    tokio::time::timeout(timeout, connect_inner(node, target, params, user, creds, max))
        .await
        .map_err(|_| BackendError::Timeout)?
}

/// Connects to `target` (with TLS when its mode asks and the server agrees) and sends the
/// startup packet with `params`; returns the connection, the server's address and this side's,
/// before any answer is read.
pub async fn open(
    target: Target<'_>,
    params: &[(String, String)],
    max: usize,
) -> Result<(Conn, SocketAddr, Option<SocketAddr>), BackendError> {
    let stream = TcpStream::connect((target.host, target.port)).await?;
    let _ = stream.set_nodelay(true);
    let addr = stream.peer_addr()?;
    let local = stream.local_addr().ok();
    let stream = target.tls.negotiate(target.mode, target.host, stream).await?;
    let mut conn = Conn::over(stream, max);
    protocol::startup::encode_startup(
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut conn.wbuf,
    );
    conn.flush().await?;
    Ok((conn, addr, local))
}

async fn connect_inner(
    node: usize,
    target: Target<'_>,
    params: &[(String, String)],
    user: &str,
    creds: Option<&Credentials>,
    max: usize,
) -> Result<(Backend, Greeting), BackendError> {
    let (mut conn, addr, local) = open(target, params, max).await?;
    let mut scram: Option<ScramClient> = None;
    let mut greeting = Greeting::default();
    loop {
        let f = conn.read_frame().await?.ok_or(BackendError::Closed)?;
        match BackendMessage::parse(&f)? {
            BackendMessage::Authentication { code, data } => {
                match code {
                    pauth::OK => return finish_login(conn, node, addr, local, greeting).await,
                    pauth::CLEARTEXT => {
                        target.tls.check_cleartext(conn.stream.is_encrypted())?;
                        let pw = plain(creds, user)?;
                        pauth::encode_password(pw, &mut conn.wbuf);
                    }
                    pauth::MD5 => {
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or(ProtocolError::Malformed("AuthenticationMD5Password"))?;
                        let answer = match creds {
                            Some(Credentials { plain: Some(p), .. }) => {
                                postgres_protocol::authentication::md5_hash(
                                    user.as_bytes(),
                                    p.as_bytes(),
                                    salt,
                                )
                            }
                            Some(Credentials {
                                md5: Some(secret), ..
                            }) => md5_from_secret(secret, salt),
                            _ => return Err(no_password(user)),
                        };
                        pauth::encode_password(&answer, &mut conn.wbuf);
                    }
                    pauth::SASL => {
                        let mechs = pauth::sasl_mechanisms(data)?;
                        if !mechs.contains(&"SCRAM-SHA-256") {
                            return Err(BackendError::Auth(format!(
                                "server offers no SASL mechanism dbproxy supports ({})",
                                mechs.join(", ")
                            )));
                        }
                        // Checked here so that a missing password (or proven key) fails
                        // before the exchange.
                        if !creds.is_some_and(Credentials::can_scram) {
                            return Err(no_password(user));
                        }
                        let (s, first) = ScramClient::start();
                        pauth::encode_sasl_initial("SCRAM-SHA-256", first.as_bytes(), &mut conn.wbuf);
                        scram = Some(s);
                    }
                    pauth::SASL_CONTINUE => {
                        let s = scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("AuthenticationSASLContinue"))?;
                        let c = creds.ok_or_else(|| no_password(user))?;
                        let proof = s
                            .respond(data, c.plain.as_deref(), &c.keys)
                            .map_err(|e| BackendError::Auth(format!("SCRAM exchange failed: {e}")))?;
                        pauth::encode_sasl_response(proof.as_bytes(), &mut conn.wbuf);
                    }
                    pauth::SASL_FINAL => {
                        let s = scram
                            .as_ref()
                            .ok_or(ProtocolError::Malformed("AuthenticationSASLFinal"))?;
                        s.finish(data)
                            .map_err(|e| BackendError::Auth(format!("server signature rejected: {e}")))?;
                    }
                    other => {
                        return Err(BackendError::Auth(format!(
                            "server asks for authentication method {other}, which dbproxy does not support"
                        )))
                    }
                }
                conn.flush().await?;
            }
            BackendMessage::ErrorResponse(_) => return Err(BackendError::Refused(f)),
            BackendMessage::NoticeResponse(_) => greeting.frames.push(f),
            _ => return Err(ProtocolError::Malformed("authentication response").into()),
        }
    }
}

/// The rest of a login once the server said AuthenticationOk: its ParameterStatus and notices
/// (the greeting), BackendKeyData, then ReadyForQuery. Also ends logins whose authentication
/// exchange the session relayed between the client and the server (pass-through).
pub async fn finish_login(
    mut conn: Conn,
    node: usize,
    addr: SocketAddr,
    local: Option<SocketAddr>,
    mut greeting: Greeting,
) -> Result<(Backend, Greeting), BackendError> {
    let mut key = (0, 0);
    loop {
        let f = conn.read_frame().await?.ok_or(BackendError::Closed)?;
        match BackendMessage::parse(&f)? {
            BackendMessage::ErrorResponse(_) => return Err(BackendError::Refused(f)),
            BackendMessage::ParameterStatus | BackendMessage::NoticeResponse(_) => greeting.frames.push(f),
            BackendMessage::BackendKeyData { pid, key: k } => key = (pid, k),
            BackendMessage::ReadyForQuery { .. } => {
                return Ok((
                    Backend {
                        conn,
                        node,
                        addr,
                        local,
                        pooled: None,
                        key,
                        prepared: HashMap::new(),
                        to_close: Vec::new(),
                        sets_applied: 0,
                        sets_owner: 0,
                        swallow_rfq: 0,
                        swallow_parse: 0,
                        swallow_close: 0,
                        capture_lsn: 0,
                        capturing: false,
                    },
                    greeting,
                ))
            }
            _ => return Err(ProtocolError::Malformed("startup response").into()),
        }
    }
}

fn no_password(user: &str) -> BackendError {
    BackendError::Auth(format!(
        "the server asks for a password for user \"{user}\" and none is configured"
    ))
}

fn plain<'a>(creds: Option<&'a Credentials>, user: &str) -> Result<&'a str, BackendError> {
    creds
        .and_then(|c| c.plain.as_deref())
        .ok_or_else(|| no_password(user))
}

fn md5_from_secret(secret: &str, salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(&secret.as_bytes()[3..]);
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

/// Sends a CancelRequest for `(pid, key)` to `addr` (best effort, bounded by `timeout`).
pub async fn cancel(addr: SocketAddr, pid: i32, key: i32, timeout: Duration) {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut buf = BytesMut::with_capacity(16);
        protocol::startup::encode_cancel(pid, key, &mut buf);
        s.write_all(&buf).await?;
        // PostgreSQL closes the connection once it has handled the request.
        let mut sink = [0u8; 16];
        let _ = s.read(&mut sink).await;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%addr, error = %e, "cannot send cancel request"),
        Err(_) => tracing::warn!(%addr, "cancel request timed out"),
    }
}

/// The SQLSTATE of an ErrorResponse frame.
pub fn sqlstate(f: &Frame) -> Option<&str> {
    perror::sqlstate(f.body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_shrink_after_a_large_message() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, mut b) = (
            Conn::new(client.unwrap(), 8 << 20),
            Conn::new(server.unwrap().0, 8 << 20),
        );
        let big = crate::protocol::Frame::new(b'Q', &vec![b'x'; 4 << 20]);
        a.wbuf.extend_from_slice(big.raw());
        let (sent, got) = tokio::join!(a.flush(), b.read_frame());
        sent.unwrap();
        assert_eq!(got.unwrap().unwrap().body().len(), 4 << 20);
        // The next frame is read into a right-sized buffer again.
        a.wbuf
            .extend_from_slice(crate::protocol::Frame::new(b'S', b"").raw());
        a.flush().await.unwrap();
        assert_eq!(b.read_frame().await.unwrap().unwrap().tag(), b'S');
        assert!(
            b.rbuf.capacity() <= LARGE_BUFFER,
            "read buffer {}",
            b.rbuf.capacity()
        );
        assert!(
            a.wbuf.capacity() <= LARGE_BUFFER,
            "write buffer {}",
            a.wbuf.capacity()
        );
    }
}
