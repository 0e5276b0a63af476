//! The HTTP/1.1 fast path: plain bodiless requests (GET, HEAD, OPTIONS, DELETE without a body,
//! no upgrade, no `Expect`) are parsed with httparse, rewritten into a reused buffer and relayed
//! over lb's own pool of upstream connections in the client connection's task, with the
//! response's own framing (Content-Length, chunked or until close) passed through byte for byte.
//! Anything else (a body, an upgrade, HTTP/1.0, h2c, a head httparse refuses) hands the
//! connection, with the bytes read so far, to the hyper path in `server.rs` for good.
//!
//! Why: with hyper's client every request crossed two tasks and rebuilt header maps and URIs;
//! here a request costs one parse and a few syscalls. The semantics are those of `proxy.rs`:
//! hop-by-hop headers stripped, X-Forwarded-For appended, X-Real-IP, X-Forwarded-Proto and
//! Forwarded set, Host kept or overridden; tries, passive failures, 502/504 and metrics alike.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access;
use crate::config::Algorithm;
use crate::head_check;
use crate::route::{Route, RouteRequest};
use crate::server::ConnCtx;
use crate::upstream::{Pooled, RequestPick, Server};
use crate::{Runtime, Shared};

/// Most headers a fast-path request or response may carry; more goes to the hyper path (requests)
/// or is a bad gateway (responses).
const MAX_HEADERS: usize = 64;
/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for client and upstream buffers.
const READ_CHUNK: usize = 4096;

/// Request headers never forwarded: hop-by-hop ones and those lb sets itself.
const DROP_REQUEST: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
    "forwarded",
];

/// Response headers never forwarded. Transfer-Encoding and Content-Length stay: the body is
/// relayed with its own framing.
const DROP_RESPONSE: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
];

/// How a client connection's fast path ended.
pub(crate) enum Outcome {
    /// The connection is finished (closed by either side, timed out, or shut down).
    Closed,
    /// The next request is not for the fast path: serve the connection with hyper, starting
    /// with these already-read bytes.
    Fallback(BytesMut),
}

/// Connection-wide values computed once.
pub(crate) struct ClientInfo {
    /// The client's address as text (X-Real-IP, the X-Forwarded-For hop).
    ip: String,
    /// The listener's configured address and the local port, for routing.
    listen: SocketAddr,
    port: u16,
    /// `for=...;proto=http` (or `https`), the start of this hop's Forwarded element.
    forwarded: String,
    /// The client connection is TLS (`X-Forwarded-Proto: https`, routing by `listen ... ssl`).
    tls: bool,
}

impl ClientInfo {
    pub(crate) fn new(peer: SocketAddr, listen: SocketAddr, port: u16, tls: bool) -> ClientInfo {
        let ip = peer.ip().to_canonical();
        let proto = if tls { "https" } else { "http" };
        let forwarded = if ip.is_ipv6() {
            format!("for=\"[{ip}]\";proto={proto}")
        } else {
            format!("for={ip};proto={proto}")
        };
        ClientInfo {
            ip: ip.to_string(),
            listen,
            port,
            forwarded,
            tls,
        }
    }
}

/// A client connection the fast path serves: plain TCP, or TLS once the handshake chose HTTP/1.1.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Waits until a read may find data, before a buffer is taken for it (idle keep-alive
    /// connections hold none). A stream that may hold decrypted bytes of its own is always ready.
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl ClientStream for TcpStream {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.readable()
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        // rustls may already hold plaintext the socket no longer signals.
        std::future::ready(Ok(()))
    }
}

/// A request head ready to send upstream.
pub(crate) struct Prepared {
    /// The method is HEAD (the response has no body).
    head: bool,
    /// The client asked to close after this response.
    close: bool,
    /// The upstream group the route chose.
    upstream: usize,
    /// The route's own answer (`return`, a redirect), instead of proxying.
    respond: Option<Route>,
    /// What the selector needs for `hash` (built only for that algorithm).
    parts: http::request::Parts,
    /// What the access log needs (only when it is on).
    line: Option<access::RequestLine>,
}

/// Whether `v` would pass `HeaderValue::to_str` (visible ASCII, space and tab).
fn is_text(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Parses a complete request head in `buf` and writes its upstream form into `out`; `None`
/// when the request is not for the fast path.
pub(crate) fn prepare(
    buf: &[u8],
    rt: &Runtime,
    client: &ClientInfo,
    logging: bool,
    out: &mut Vec<u8>,
) -> Option<Prepared> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(buf).ok()? else {
        return None;
    };
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    let head = match method {
        "GET" | "OPTIONS" | "DELETE" => false,
        "HEAD" => true,
        _ => return None,
    };
    let path = req.path?;
    if !path.starts_with('/') {
        return None;
    }
    // First pass: what decides the path. (`head_check` already refused ambiguous framing and
    // duplicate or missing Host.)
    let mut close = false;
    let mut host: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if trim(h.value) != b"0" {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("http2-settings")
        {
            return None;
        } else if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return None;
            }
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = trim(t);
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    return None;
                }
            }
        }
    }
    let host = host?;
    let cfg = &rt.config;
    let (route_path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
    let route = rt.router.route(&RouteRequest {
        listen: client.listen,
        port: client.port,
        tls: client.tls,
        host: std::str::from_utf8(host).unwrap_or(""),
        path: route_path,
        query,
    });
    let (upstream, target, respond) = match route {
        Route::Proxy {
            upstream,
            uri,
            grpc: false,
        } => (upstream, uri, None),
        r @ Route::Respond { .. } => (0, None, Some(r)),
        // Files, and HTTP/2 (gRPC) upstreams, are served on the hyper path.
        Route::Files { .. } | Route::Proxy { grpc: true, .. } => return None,
    };

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_deref().unwrap_or(path).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let override_host = !cfg.headers.host.is_empty();
    let mut xff_prior = false;
    let mut forwarded_prior: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            xff_prior |= is_text(h.value);
            continue;
        }
        if name.eq_ignore_ascii_case("forwarded") {
            if forwarded_prior.is_none() && is_text(h.value) {
                forwarded_prior = Some(h.value);
            }
            continue;
        }
        if DROP_REQUEST.iter().any(|d| name.eq_ignore_ascii_case(d))
            // Host is end-to-end whatever Connection says (found by fuzzing: `Connection: host`
            // sent the upstream a request with no Host).
            || (connection_lists(req.headers, name.as_bytes()) && !name.eq_ignore_ascii_case("host"))
            || (override_host && name.eq_ignore_ascii_case("host"))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if override_host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(cfg.headers.host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // Append to any X-Forwarded-For the client sent, as nginx's $proxy_add_x_forwarded_for does.
    out.extend_from_slice(b"x-forwarded-for: ");
    if xff_prior {
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("x-forwarded-for") && is_text(h.value) {
                out.extend_from_slice(h.value);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(client.ip.as_bytes());
    out.extend_from_slice(b"\r\nx-real-ip: ");
    out.extend_from_slice(client.ip.as_bytes());
    out.extend_from_slice(if client.tls {
        b"\r\nx-forwarded-proto: https\r\nforwarded: ".as_slice()
    } else {
        b"\r\nx-forwarded-proto: http\r\nforwarded: ".as_slice()
    });
    if let Some(prior) = forwarded_prior {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.forwarded.as_bytes());
    if host
        .iter()
        .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host);
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\n\r\n");

    // The selector only looks at the request for `hash`; the log only when it is on.
    let needs_parts = rt.group(upstream).algorithm == Algorithm::Hash || logging;
    let parts = if needs_parts {
        let mut r = http::Request::new(());
        *r.method_mut() = http::Method::from_bytes(method.as_bytes()).ok()?;
        *r.uri_mut() = http::Uri::try_from(path).ok()?;
        for h in req.headers.iter() {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_bytes(h.value),
            ) {
                r.headers_mut().append(n, v);
            }
        }
        r.into_parts().0
    } else {
        http::Request::new(()).into_parts().0
    };
    let line = logging.then(|| {
        let mut r = http::Request::new(());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.headers_mut() = parts.headers.clone();
        access::RequestLine::of(&r)
    });
    Some(Prepared {
        head,
        close,
        upstream,
        respond,
        parts,
        line,
    })
}

/// How an upstream response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding, relayed as is.
    Chunked,
    /// Until the upstream closes; the client connection closes after it.
    UntilClose,
}

/// A parsed upstream response head, with the client's copy written out.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    status: u16,
    /// Bytes of the head in the upstream buffer.
    pub(crate) len: usize,
    pub(crate) framing: Framing,
    /// The upstream connection may be reused afterwards.
    reusable: bool,
    /// A content length, for the access log.
    content_length: Option<u64>,
}

/// What parsing an upstream response head found.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim (1xx other than 101) response of this many bytes, to skip.
    Interim(usize),
    /// A final response head.
    Final(ResponseHead),
}

/// Parses an upstream response head from `buf`, writing the client's copy into `out` (with
/// `connection: close` when `close_client`, or when the body runs until close).
pub(crate) fn parse_response(
    buf: &[u8],
    head_request: bool,
    close_client: bool,
    out: &mut Vec<u8>,
) -> Result<Parsed, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_RESPONSE_HEAD {
                return Err("upstream response head too large");
            }
            return Ok(Parsed::Partial);
        }
        Err(_) => return Err("malformed upstream response head"),
    };
    let status = resp.code.ok_or("malformed upstream response head")?;
    if status == 101 {
        return Err("upstream switched protocols unasked");
    }
    if (100..200).contains(&status) {
        return Ok(Parsed::Interim(len));
    }
    let mut upstream_close = resp.version != Some(1);
    let mut chunked = None;
    let mut length: Option<u64> = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding decides whether the body is chunked.
            let last = h.value.rsplit(|&b| b == b',').next().map(trim).unwrap_or(b"");
            chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only: `+5` parses as a u64 in Rust but is no Content-Length.
            let n = head_check::content_length(h.value).ok_or("bad upstream content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting upstream content-length");
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = trim(t);
                if t.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                }
            }
        }
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    let close = close_client || framing == Framing::UntilClose;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(
        StatusCode::from_u16(status)
            .map_err(|_| "bad upstream status")?
            .as_str()
            .as_bytes(),
    );
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        if DROP_RESPONSE.iter().any(|d| h.name.eq_ignore_ascii_case(d))
            || (h.name.eq_ignore_ascii_case("upgrade"))
            || connection_lists(resp.headers, h.name.as_bytes())
            // A chunked body is delimited by its chunks: a Content-Length beside it would make
            // the client read the body differently from lb (RFC 9112 section 6.3).
            || (framing == Framing::Chunked && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Parsed::Final(ResponseHead {
        status,
        len,
        framing,
        reusable: !upstream_close && framing != Framing::UntilClose,
        content_length: if framing == Framing::Chunked { None } else { length },
    }))
}

/// Whether a `Connection` header among `headers` names `name` (a hop-by-hop header for this
/// connection only). Every listed name counts, however many there are; `keep-alive` and `close`
/// are options, not names to strip.
fn connection_lists(headers: &[httparse::Header<'_>], name: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| trim(t).eq_ignore_ascii_case(name))
}

/// Finds where a chunked body ends, fed the bytes as they arrive (nothing is buffered).
#[derive(Debug, Default)]
pub(crate) struct ChunkedEnd {
    state: ChunkState,
    remaining: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hexadecimal size.
    #[default]
    Size,
    /// Skipping a chunk extension up to the end of the line.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// After data, expecting CR.
    DataCr,
    /// After data's CR, expecting LF.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// After the final line's CR.
    EndLf,
    /// The body is complete.
    Done,
}

/// A chunked body that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body from upstream")]
pub(crate) struct BadChunk;

impl ChunkedEnd {
    /// Feeds the next bytes; returns how many of them complete the body, if it completes here.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(BadChunk);
                        }
                        self.remaining = self.remaining * 16 + u64::from(d);
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = Extension,
                    b'\r' if self.digits > 0 => self.state = SizeLf,
                    _ => return Err(BadChunk),
                },
                Extension => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    } else if b == b'\n' {
                        return Err(BadChunk);
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = if self.remaining == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let take = (data.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(BadChunk);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = Size;
                    self.digits = 0;
                }
                TrailerStart => {
                    self.state = if b == b'\r' { EndLf } else { Trailer };
                }
                Trailer => {
                    if b == b'\n' {
                        self.state = TrailerStart;
                    }
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok(None)
    }
}

/// Why one try got no usable response head.
enum TryError {
    /// Connecting failed or timed out: nothing was sent.
    Connect(io::Error),
    /// The exchange failed after connecting, or the upstream answered something unusable.
    Io(io::Error),
}

fn protocol_error(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Pooled> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(Pooled {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        idle_since: Instant::now(),
    })
}

/// Sends the head on a pooled (or new) connection and reads the response head. A pooled
/// connection that turns out closed before any response byte is replaced by a new one once:
/// the request is bodiless and idempotent, and the upstream saw nothing it answered.
async fn exchange(
    server: &Server,
    rt: &Runtime,
    req_head: &[u8],
    head_request: bool,
    close_client: bool,
    resp_out: &mut Vec<u8>,
    now: Instant,
) -> Result<(Pooled, ResponseHead), TryError> {
    let idle_limit = rt.config.timeouts.upstream_idle.get();
    let connect_timeout = rt.config.timeouts.upstream_connect.get();
    let mut pooled = server.pool_take(idle_limit, now);
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(c) => c,
            None => connect(server.addr, connect_timeout)
                .await
                .map_err(TryError::Connect)?,
        };
        let r: io::Result<Option<ResponseHead>> = async {
            up.stream.write_all(req_head).await?;
            up.buf.clear();
            loop {
                if up.buf.capacity() - up.buf.len() < 1024 {
                    up.buf.reserve(READ_CHUNK);
                }
                if up.stream.read_buf(&mut up.buf).await? == 0 {
                    if up.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed mid-head",
                    ));
                }
                loop {
                    match parse_response(&up.buf, head_request, close_client, resp_out)
                        .map_err(protocol_error)?
                    {
                        Parsed::Partial => break,
                        Parsed::Interim(n) => up.buf.advance(n),
                        Parsed::Final(h) => return Ok(Some(h)),
                    }
                    if up.buf.is_empty() {
                        break;
                    }
                }
            }
        }
        .await;
        match r {
            Ok(Some(h)) => return Ok((up, h)),
            // A kept-alive connection the upstream had closed: try a new one.
            Ok(None) if reused => continue,
            Err(e) if reused && up.buf.is_empty() && e.kind() != io::ErrorKind::InvalidData => continue,
            Ok(None) => {
                return Err(TryError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed without answering",
                )))
            }
            Err(e) => return Err(TryError::Io(e)),
        }
    }
}

/// Writes a response a route makes itself (`return`, redirects).
async fn write_response<S: ClientStream>(
    stream: &mut S,
    status: u16,
    location: Option<&str>,
    body: &str,
    head_only: bool,
    close: bool,
    timeout: Duration,
) -> io::Result<()> {
    use std::fmt::Write;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut head = String::with_capacity(160 + body.len());
    let _ = write!(head, "HTTP/1.1 {status}\r\n");
    let kind = if location.is_some() {
        "text/html"
    } else {
        "text/plain"
    };
    let _ = write!(head, "content-type: {kind}\r\ncontent-length: {}\r\n", body.len());
    if let Some(l) = location {
        let _ = write!(head, "location: {l}\r\n");
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    if !head_only {
        head.push_str(body);
    }
    write_timed(stream, head.as_bytes(), timeout).await
}

/// Writes a short response lb makes itself.
async fn write_error<S: ClientStream>(
    stream: &mut S,
    status: StatusCode,
    body: &str,
    close: bool,
    timeout: Duration,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n{body}",
        status,
        body.len(),
        if close { "connection: close\r\n" } else { "" },
    );
    write_timed(stream, head.as_bytes(), timeout).await
}

/// Half-closes and reads what the client still sends, for a bounded time and size, so that
/// closing with unread input (a reset) does not destroy the response just written.
async fn linger_close<S: ClientStream>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 256 * 1024usize;
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while left > 0 {
        match tokio::time::timeout_at(until, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Writes and flushes (a TLS stream may keep records until flushed; TCP's flush is free).
async fn write_timed<S: ClientStream>(stream: &mut S, data: &[u8], timeout: Duration) -> io::Result<()> {
    let write = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    if timeout.is_zero() {
        return write.await;
    }
    tokio::time::timeout(timeout, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client write timed out"))?
}

/// Counts a request in flight on a server until dropped.
struct Active<'a>(&'a Server);

impl<'a> Active<'a> {
    fn new(server: &'a Server) -> Active<'a> {
        server.active.fetch_add(1, Ordering::Relaxed);
        Active(server)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-connection buffers and values.
struct Session<'a> {
    shared: &'a Shared,
    ctx: &'a ConnCtx,
    client: ClientInfo,
    req_head: Vec<u8>,
    resp_head: Vec<u8>,
    /// `lb_requests_total` handles this connection used, by server label and status, so a
    /// request costs no label lookup.
    counters: Vec<(Arc<str>, u16, prometheus::IntCounter)>,
}

/// What became of one request.
enum Served {
    /// Keep the client connection for the next request.
    KeepAlive,
    /// Close the client connection.
    Close,
}

/// Serves requests on `stream` while they suit the fast path.
pub(crate) async fn serve<S: ClientStream>(
    shared: &Shared,
    ctx: &ConnCtx,
    stream: &mut S,
    shutdown: &CancellationToken,
) -> Outcome {
    let (header_read, client_idle, max_header) = {
        let rt = shared.runtime.load();
        let c = &rt.config;
        (
            c.timeouts.header_read.get(),
            c.timeouts.client_idle.get(),
            c.limits.max_header_bytes,
        )
    };
    let mut s = Session {
        shared,
        ctx,
        client: ClientInfo::new(ctx.peer, ctx.listen, ctx.port, ctx.tls),
        req_head: Vec::new(),
        resp_head: Vec::new(),
        counters: Vec::new(),
    };
    let mut buf = BytesMut::new();
    let mut seen = false;
    // One waiter for the whole connection, not one registered and dropped per request.
    let mut stop = std::pin::pin!(shutdown.cancelled());
    loop {
        // Wait for a complete request head: the idle (or, before the first request, header)
        // timeout until its first byte, then the header timeout for the whole head.
        let mut head_deadline = (!buf.is_empty()).then(|| Instant::now() + header_read);
        let head_len = loop {
            if !buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let heads = req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
                        if let Err(bad) = head_check::check(req.version == Some(1), heads) {
                            tracing::debug!(peer = %ctx.peer, reason = %bad, "bad request head");
                            let _ = write_error(
                                stream,
                                StatusCode::BAD_REQUEST,
                                &format!("bad request: {bad}\n"),
                                true,
                                client_idle,
                            )
                            .await;
                            linger_close(stream).await;
                            return Outcome::Closed;
                        }
                        break n;
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Outcome::Fallback(buf),
                }
                if buf.len() >= max_header {
                    // hyper answers an oversized head with 431 and closes; so does this path.
                    let _ = write_error(
                        stream,
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request header fields too large\n",
                        true,
                        client_idle,
                    )
                    .await;
                    linger_close(stream).await;
                    return Outcome::Closed;
                }
            }
            let wait_until = head_deadline
                .unwrap_or_else(|| Instant::now() + if seen { client_idle } else { header_read });
            tokio::select! {
                biased;
                // Wait for readiness before taking a buffer: idle keep-alive connections hold
                // none. The read itself goes through `read_buf`, which (unlike `try_read_buf`)
                // forgets the readiness after a short read, so the next wait costs no `recv`
                // that would only say EAGAIN.
                r = async {
                    stream.wait_readable().await?;
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(READ_CHUNK);
                    }
                    stream.read_buf(&mut buf).await
                } => match r {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {
                        head_deadline.get_or_insert_with(|| Instant::now() + header_read);
                    }
                },
                _ = &mut stop, if buf.is_empty() => return Outcome::Closed,
                _ = tokio::time::sleep_until(wait_until.into()) => {
                    tracing::debug!(peer = %ctx.peer, "no complete request head in time: closing");
                    return Outcome::Closed;
                }
            }
        };
        let rt = shared.runtime.load_full();
        let logging = rt.config.access_log.enabled;
        let Some(prep) = prepare(&buf[..head_len], &rt, &s.client, logging, &mut s.req_head) else {
            return Outcome::Fallback(buf);
        };
        buf.advance(head_len);
        if buf.is_empty() {
            // Nothing pipelined: an idle connection keeps no read buffer.
            buf = BytesMut::new();
        }
        seen = true;
        ctx.mark_request();
        let close = prep.close || shutdown.is_cancelled();
        match s.request(&rt, stream, prep, close).await {
            Served::KeepAlive if !close => {}
            _ => {
                // Pipelined requests may still be on their way: closing with unread input
                // would reset the connection and could destroy the response just written.
                linger_close(stream).await;
                return Outcome::Closed;
            }
        }
    }
}

impl Session<'_> {
    /// Proxies one prepared request and relays its response.
    async fn request<S: ClientStream>(
        &mut self,
        rt: &Arc<Runtime>,
        stream: &mut S,
        prep: Prepared,
        close: bool,
    ) -> Served {
        let start = Instant::now();
        let cfg = &rt.config;
        let up = rt.group(prep.upstream);
        // Every write to the client is bounded by `client_send` (a client that stops reading).
        let client_send = cfg.timeouts.client_send.get();
        if let Some(Route::Respond {
            status,
            location,
            body,
        }) = &prep.respond
        {
            self.observe(rt, &prep, *status, Some(body.len() as u64), None, start.elapsed());
            let r = write_response(
                stream,
                *status,
                location.as_deref(),
                body,
                prep.head,
                close,
                client_send,
            )
            .await;
            return match r {
                Ok(()) => Served::KeepAlive,
                Err(_) => Served::Close,
            };
        }
        let max_tries = match cfg.retry.tries {
            0 => up.servers.len(),
            n => (n as usize).min(up.servers.len()),
        }
        .max(1);
        let deadline = (!cfg.retry.timeout.get().is_zero()).then(|| start + cfg.retry.timeout.get());
        let response_timeout = cfg.timeouts.upstream_response.get();
        let mut pick = RequestPick::default();
        let mut timed_out = false;
        let mut last_label: Option<&Arc<str>> = None;
        let m = &self.shared.metrics;

        for attempt in 0..max_tries {
            if attempt > 0 {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                m.retries.inc();
            }
            let now = if attempt == 0 { start } else { Instant::now() };
            let Some(i) = up.pick(&prep.parts, self.ctx.peer.ip(), &mut pick, now) else {
                break;
            };
            let server = &up.servers[i];
            last_label = Some(&server.label);
            server.requests.fetch_add(1, Ordering::Relaxed);
            // Borrowed, not an `Arc` clone: no shared reference count touched per request.
            let guard = Active::new(server);
            let sent = tokio::time::timeout(
                response_timeout,
                exchange(
                    server,
                    rt,
                    &self.req_head,
                    prep.head,
                    close,
                    &mut self.resp_head,
                    now,
                ),
            )
            .await;
            let (conn, head) = match sent {
                Err(_) => {
                    server.record_failure(Instant::now());
                    m.failures.with_label_values(&[&*server.label]).inc();
                    tracing::warn!(server = %server.label, "upstream timed out");
                    timed_out = true;
                    break;
                }
                Ok(Err(e)) => {
                    server.record_failure(Instant::now());
                    m.failures.with_label_values(&[&*server.label]).inc();
                    match e {
                        TryError::Connect(e) => {
                            tracing::warn!(server = %server.label, error = %e, connect = true, "upstream try failed")
                        }
                        TryError::Io(e) => {
                            tracing::warn!(server = %server.label, error = %e, connect = false, "upstream try failed")
                        }
                    }
                    // Every fast-path request is idempotent and bodiless: always another try.
                    continue;
                }
                Ok(Ok(x)) => x,
            };
            if cfg.retry.on_status && matches!(head.status, 502..=504) && attempt + 1 < max_tries {
                server.record_failure(Instant::now());
                m.failures.with_label_values(&[&*server.label]).inc();
                continue;
            }
            let at_head = Instant::now();
            server.record_success(at_head);
            let elapsed = at_head.saturating_duration_since(start);
            self.observe(
                rt,
                &prep,
                head.status,
                head.content_length,
                Some(&server.label),
                elapsed,
            );
            let mut conn = conn;
            // Idle from when the head arrived: close enough, and errs towards retiring it sooner.
            conn.idle_since = at_head;
            let keep = self
                .relay(stream, server, conn, &head, response_timeout, client_send)
                .await;
            drop(guard);
            return match (keep, head.framing) {
                (true, Framing::UntilClose) | (false, _) => Served::Close,
                (true, _) => Served::KeepAlive,
            };
        }
        let (status, body) = if timed_out {
            (
                StatusCode::GATEWAY_TIMEOUT,
                "gateway timeout: upstream did not answer in time\n",
            )
        } else {
            (
                StatusCode::BAD_GATEWAY,
                "bad gateway: no upstream server answered\n",
            )
        };
        self.observe(
            rt,
            &prep,
            status.as_u16(),
            Some(body.len() as u64),
            last_label,
            start.elapsed(),
        );
        match write_error(stream, status, body, close, client_send).await {
            Ok(()) => Served::KeepAlive,
            Err(_) => Served::Close,
        }
    }

    fn observe(
        &mut self,
        rt: &Runtime,
        prep: &Prepared,
        status: u16,
        content_length: Option<u64>,
        label: Option<&Arc<str>>,
        elapsed: Duration,
    ) {
        let m = &self.shared.metrics;
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let cached = label.and_then(|l| {
            self.counters
                .iter()
                .find(|(cl, st, _)| *st == status && Arc::ptr_eq(cl, l))
                .map(|(_, _, c)| c)
        });
        match (cached, label) {
            (Some(c), _) => c.inc(),
            (None, Some(l)) => {
                let c = m.requests.with_label_values(&[l, code.as_str()]);
                c.inc();
                if self.counters.len() < 16 {
                    self.counters.push((l.clone(), status, c));
                }
            }
            (None, None) => m.requests.with_label_values(&["none", code.as_str()]).inc(),
        }
        m.duration.observe(elapsed.as_secs_f64());
        if let Some(line) = &prep.line {
            let mut r = http::Response::new(());
            *r.status_mut() = code;
            if let Some(n) = content_length {
                r.headers_mut().insert(http::header::CONTENT_LENGTH, n.into());
            }
            access::log(
                rt.config.access_log.format,
                self.ctx.peer,
                line,
                &r,
                label.map(|l| &**l),
                elapsed,
                self.ctx.tls_protocol.get().copied(),
            );
        }
    }

    /// Relays the response head and body; returns whether it completed (the client connection
    /// may go on). The upstream connection goes back to the pool when it can be reused.
    async fn relay<S: ClientStream>(
        &mut self,
        stream: &mut S,
        server: &Server,
        mut up: Pooled,
        head: &ResponseHead,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> bool {
        up.buf.advance(head.len);
        let out = &mut self.resp_head;
        let done = match head.framing {
            Framing::Empty => {
                if write_timed(stream, out, write_timeout).await.is_err() {
                    return false;
                }
                true
            }
            Framing::Length(n) => {
                let first = (up.buf.len() as u64).min(n) as usize;
                out.extend_from_slice(&up.buf[..first]);
                up.buf.advance(first);
                if write_timed(stream, out, write_timeout).await.is_err() {
                    return false;
                }
                let mut remaining = n - first as u64;
                while remaining > 0 {
                    up.buf.clear();
                    match read_timed(&mut up, read_timeout).await {
                        Ok(0) | Err(_) => return false,
                        Ok(_) => {}
                    }
                    let take = (up.buf.len() as u64).min(remaining) as usize;
                    if write_timed(stream, &up.buf[..take], write_timeout).await.is_err() {
                        return false;
                    }
                    up.buf.advance(take);
                    remaining -= take as u64;
                }
                true
            }
            Framing::Chunked => {
                let mut end = ChunkedEnd::default();
                let mut first = true;
                loop {
                    let complete = match end.feed(&up.buf) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(server = %server.label, error = %e, "upstream body");
                            return false;
                        }
                    };
                    let take = complete.unwrap_or(up.buf.len());
                    let w = if first {
                        first = false;
                        out.extend_from_slice(&up.buf[..take]);
                        write_timed(stream, out, write_timeout).await
                    } else {
                        write_timed(stream, &up.buf[..take], write_timeout).await
                    };
                    if w.is_err() {
                        return false;
                    }
                    up.buf.advance(take);
                    if complete.is_some() {
                        break;
                    }
                    up.buf.clear();
                    match read_timed(&mut up, read_timeout).await {
                        Ok(0) | Err(_) => return false,
                        Ok(_) => {}
                    }
                }
                true
            }
            Framing::UntilClose => {
                out.extend_from_slice(&up.buf);
                up.buf.clear();
                if write_timed(stream, out, write_timeout).await.is_err() {
                    return false;
                }
                loop {
                    up.buf.clear();
                    match read_timed(&mut up, read_timeout).await {
                        Ok(0) => break,
                        Err(_) => return false,
                        Ok(_) => {}
                    }
                    if write_timed(stream, &up.buf, write_timeout).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        if done && head.reusable && up.buf.is_empty() {
            let cap = self.shared.runtime.load().config.limits.upstream_keepalive;
            server.pool_put(up, cap);
        }
        done
    }
}

async fn read_timed(up: &mut Pooled, timeout: Duration) -> io::Result<usize> {
    if up.buf.capacity() - up.buf.len() < 1024 {
        up.buf.reserve(READ_CHUNK);
    }
    match tokio::time::timeout(timeout, up.stream.read_buf(&mut up.buf)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(?timeout, "upstream body stalled");
            Err(io::Error::new(io::ErrorKind::TimedOut, "upstream body stalled"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(host_override: &str, algorithm: Algorithm) -> Runtime {
        let mut c = crate::Config::default();
        c.upstream.servers = vec![crate::config::ServerConfig {
            addr: "127.0.0.1:1".into(),
            ..Default::default()
        }];
        c.upstream.algorithm = algorithm;
        if algorithm == Algorithm::Hash {
            c.upstream.hash_key = "$http_x_user".into();
        }
        c.headers.host = host_override.into();
        Runtime::for_tests(c)
    }

    fn prep(raw: &str, rt: &Runtime, peer: &str) -> Option<(String, Prepared)> {
        let mut out = Vec::new();
        let info = ClientInfo::new(peer.parse().unwrap(), "127.0.0.1:80".parse().unwrap(), 80, false);
        let p = prepare(raw.as_bytes(), rt, &info, false, &mut out)?;
        Some((String::from_utf8(out).unwrap(), p))
    }

    #[test]
    fn a_host_named_in_connection_is_still_sent() {
        let rt = runtime("", Algorithm::RoundRobin);
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, Host\r\n\r\n";
        let (head, _) = prep(raw, &rt, "192.0.2.1:5").unwrap();
        assert!(head.contains("\r\nHost: a\r\n"), "{head}");
    }

    #[test]
    fn request_head_is_rewritten_like_the_hyper_path() {
        let rt = runtime("", Algorithm::RoundRobin);
        let (head, p) = prep(
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, x-secret\r\n\
             Keep-Alive: timeout=5\r\nX-Secret: 1\r\nTE: trailers\r\nX-Forwarded-For: 1.1.1.1\r\n\
             X-Real-IP: 6.6.6.6\r\nForwarded: for=1.1.1.1\r\nX-Kept: yes\r\n\r\n",
            &rt,
            "10.0.0.9:1234",
        )
        .unwrap();
        assert!(!p.close && !p.head);
        assert_eq!(
            head,
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Kept: yes\r\n\
             x-forwarded-for: 1.1.1.1, 10.0.0.9\r\nx-real-ip: 10.0.0.9\r\nx-forwarded-proto: http\r\n\
             forwarded: for=1.1.1.1, for=10.0.0.9;proto=http;host=\"example.com\"\r\n\r\n"
        );
    }

    #[test]
    fn host_override_and_ipv6_forwarded() {
        let rt = runtime("internal", Algorithm::RoundRobin);
        let (head, p) = prep(
            "HEAD / HTTP/1.1\r\nhost: svc:81\r\nconnection: close\r\n\r\n",
            &rt,
            "[::1]:5",
        )
        .unwrap();
        assert!(p.close && p.head);
        assert_eq!(
            head,
            "HEAD / HTTP/1.1\r\nhost: internal\r\nx-forwarded-for: ::1\r\nx-real-ip: ::1\r\n\
             x-forwarded-proto: http\r\nforwarded: for=\"[::1]\";proto=http;host=\"svc:81\"\r\n\r\n"
        );
    }

    #[test]
    fn unusual_requests_go_to_the_hyper_path() {
        let rt = runtime("", Algorithm::RoundRobin);
        for raw in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(prep(raw, &rt, "1.2.3.4:5").is_none(), "{raw}");
        }
        assert!(prep(
            "DELETE /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            &rt,
            "1.2.3.4:5"
        )
        .is_some());
    }

    #[test]
    fn hash_gets_the_request_headers() {
        let rt = runtime("", Algorithm::Hash);
        let (_, p) = prep(
            "GET / HTTP/1.1\r\nHost: x\r\nX-User: 42\r\n\r\n",
            &rt,
            "1.2.3.4:5",
        )
        .unwrap();
        assert_eq!(p.parts.headers.get("x-user").unwrap(), "42");
    }

    fn response(raw: &str, head_request: bool, close: bool) -> (String, ResponseHead) {
        let mut out = Vec::new();
        match parse_response(raw.as_bytes(), head_request, close, &mut out).unwrap() {
            Parsed::Final(h) => (String::from_utf8(out).unwrap(), h),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn response_framing_and_hop_by_hop() {
        let (out, h) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\nhello",
            false,
            false,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.reusable);
        assert_eq!(
            h.len,
            out.len() + "Connection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n".len()
        );

        let (out, h) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(h.framing, Framing::Chunked);

        let (out, h) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, false);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);

        let (_, h) = response("HTTP/1.1 304 Not Modified\r\n\r\n", false, false);
        assert_eq!(h.framing, Framing::Empty);

        let (out, h) = response("HTTP/1.0 200 OK\r\n\r\n", false, false);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.reusable);

        let (_, h) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            false,
            false,
        );
        assert!(!h.reusable);

        let mut out = Vec::new();
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
                false,
                false,
                &mut out
            ),
            Ok(Parsed::Interim(25))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-", false, false, &mut out),
            Ok(Parsed::Partial)
        ));
        for bad in [
            "HTTP/1.1 101 Switching\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                parse_response(bad.as_bytes(), false, false, &mut out).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn chunked_end_is_found_across_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let (a, b) = body.split_at(split);
            let got = match c.feed(a).unwrap() {
                Some(n) => n,
                None => split + c.feed(b).unwrap().expect("complete"),
            };
            assert_eq!(got, end, "split at {split}");
        }
        // One byte at a time.
        let mut c = ChunkedEnd::default();
        let mut at = None;
        for (i, b) in body.iter().enumerate() {
            if let Some(n) = c.feed(std::slice::from_ref(b)).unwrap() {
                assert_eq!(n, 1);
                at = Some(i + 1);
                break;
            }
        }
        assert_eq!(at, Some(end));
        let mut c = ChunkedEnd::default();
        assert_eq!(c.feed(b"0\r\n\r\n").unwrap(), Some(5));
        for bad in [&b"x\r\n"[..], b"5\r\nhelloX", b"\r\n", b"ffffffffffffffff0\r\n"] {
            assert!(ChunkedEnd::default().feed(bad).is_err(), "{bad:?}");
        }
    }
}
