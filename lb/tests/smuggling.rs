//! Request smuggling and malformed heads, sent as raw bytes to lb and to a real nginx (Debian's
//! nginx-light, 1.22) in front of recording upstreams: lb must refuse whatever nginx refuses, and no
//! request hidden in another one's body may ever reach lb's upstream (a desync). The table of
//! answers is printed (`cargo test -p lb --test smuggling -- --nocapture`).
//!
//! Also the response side and the connection's end: a chunked response loses any Content-Length,
//! an upstream `Content-Length: +5` is a bad gateway, every name in Connection is stripped, and a
//! connection closed after a response with pipelined bytes unread is not reset.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lb::config::Algorithm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request an upstream saw: method, path, header names, body length.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<String>,
    body: usize,
}

/// An HTTP/1.1 upstream (hyper, keep-alive) that records every request it parses.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start() -> Result<Recorder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().to_string();
                            let headers = req.headers().keys().map(|k| k.to_string()).collect();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
                            log.lock().unwrap().push(Seen {
                                method,
                                path,
                                headers,
                                body: body.unwrap_or(usize::MAX),
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Recorder { addr, seen })
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// nginx proxying to `upstream` (keep-alive, HTTP/1.1 upstream, as lb does); returns it and its address.
async fn start_nginx(upstream: SocketAddr) -> Result<(support::nginx::Nginx, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let body = format!(
        "  upstream app {{ server {upstream}; keepalive 4; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://app;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}"
    );
    Ok((support::nginx::Nginx::start(&body, addr).await?, addr))
}

/// What a server answered to one raw request.
#[derive(Debug)]
struct Answer {
    /// Status codes of every response on the connection, in order.
    statuses: Vec<u16>,
    /// The connection was reset instead of closed.
    reset: bool,
    text: String,
}

impl Answer {
    /// The first status, or 0 when there was no response at all.
    fn first(&self) -> u16 {
        self.statuses.first().copied().unwrap_or(0)
    }

    /// Refused: an error status, or no response at all.
    fn refused(&self) -> bool {
        self.first() == 0 || self.first() >= 400
    }

    fn cell(&self) -> String {
        let mut c = if self.statuses.is_empty() {
            "no answer".to_string()
        } else {
            self.statuses
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join("+")
        };
        if self.reset {
            c.push_str(" (reset)");
        }
        c
    }
}

/// Sends `bytes` on a fresh connection and reads until the server closes, or nothing more came
/// for 300 ms (a kept-alive connection), or 5 s passed.
async fn send(to: SocketAddr, bytes: &[u8]) -> Result<Answer> {
    let mut s = TcpStream::connect(to).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut reset = false;
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                reset = e.kind() == std::io::ErrorKind::ConnectionReset;
                break;
            }
        }
        if Instant::now() > until {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let statuses = text
        .match_indices("HTTP/1.")
        .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n'))
        .filter_map(|(i, _)| text[i..].split_whitespace().nth(1)?.parse().ok())
        .collect();
    Ok(Answer {
        statuses,
        reset,
        text,
    })
}

/// The request hidden in the attacks' bodies: reaching an upstream is a desync.
const HIDDEN: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

/// The cases: a name and the raw bytes.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let hidden_chunk = format!("{:x}\r\n{HIDDEN}\r\n0\r\n\r\n", HIDDEN.len());
    let cl_te_body = format!("0\r\n\r\n{HIDDEN}");
    let post = |headers: &str, body: &str| -> Vec<u8> {
        format!("POST / HTTP/1.1\r\nHost: x\r\n{headers}\r\n{body}").into_bytes()
    };
    let te_cl = |te: &str| post(&format!("Content-Length: 4\r\n{te}\r\n"), &hidden_chunk);
    vec![
        ("control: GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "control: POST with Content-Length",
            post("Content-Length: 3\r\n", "a=1"),
        ),
        (
            "control: POST chunked",
            post("Transfer-Encoding: chunked\r\n", "3\r\na=1\r\n0\r\n\r\n"),
        ),
        (
            "control: GET with a body holding a request",
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{HIDDEN}",
                HIDDEN.len()
            )
            .into_bytes(),
        ),
        (
            "CL.TE",
            post(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    cl_te_body.len()
                ),
                &cl_te_body,
            ),
        ),
        ("TE.CL", te_cl("Transfer-Encoding: chunked")),
        ("TE.TE: xchunked", te_cl("Transfer-Encoding: xchunked")),
        (
            "TE.TE: chunked, identity",
            te_cl("Transfer-Encoding: chunked, identity"),
        ),
        (
            "TE.TE: identity, chunked",
            te_cl("Transfer-Encoding: identity, chunked"),
        ),
        (
            "TE.TE: two TE headers",
            te_cl("Transfer-Encoding: chunked\r\nTransfer-Encoding: x"),
        ),
        ("TE.TE: space before colon", te_cl("Transfer-Encoding : chunked")),
        ("TE.TE: tab before value", te_cl("Transfer-Encoding:\tchunked")),
        ("TE.TE: upper case", te_cl("TRANSFER-ENCODING: CHUNKED")),
        ("TE.TE: obs-fold value", te_cl("Transfer-Encoding:\r\n chunked")),
        (
            "TE.TE: line starting with space",
            te_cl(" Transfer-Encoding: chunked"),
        ),
        (
            "TE.TE: bare LF before TE",
            te_cl("X-A: 1\nTransfer-Encoding: chunked"),
        ),
        ("TE.TE: quoted", te_cl("Transfer-Encoding: \"chunked\"")),
        (
            "TE without CL, not chunked",
            post("Transfer-Encoding: gzip\r\n", ""),
        ),
        (
            "TE in HTTP/1.0",
            format!("POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{hidden_chunk}")
                .into_bytes(),
        ),
        (
            "duplicate CL, different",
            post(
                &format!("Content-Length: 3\r\nContent-Length: {}\r\n", 3 + HIDDEN.len()),
                &format!("a=1{HIDDEN}"),
            ),
        ),
        (
            "duplicate CL, same",
            post("Content-Length: 3\r\nContent-Length: 3\r\n", "a=1"),
        ),
        ("CL list", post("Content-Length: 3, 3\r\n", "a=1")),
        ("CL +3", post("Content-Length: +3\r\n", "a=1")),
        ("CL -1", post("Content-Length: -1\r\n", "")),
        ("CL 0x3", post("Content-Length: 0x3\r\n", "a=1")),
        ("CL with leading zeros", post("Content-Length: 003\r\n", "a=1")),
        ("CL huge", post("Content-Length: 99999999999999999999\r\n", "")),
        (
            "obs-fold header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
        ),
        ("bare LF line ends", b"GET / HTTP/1.1\nHost: x\n\n".to_vec()),
        (
            "bare CR in a header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header name",
            b"GET / HTTP/1.1\r\nHost: x\r\nX\0A: 1\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "space in a header name",
            b"GET / HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n".to_vec(),
        ),
        (
            "space before colon in CL",
            post(&format!("Content-Length : {}\r\n", HIDDEN.len()), HIDDEN),
        ),
        ("missing Host, HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("missing Host, HTTP/1.0", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        (
            "duplicate Host",
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".to_vec(),
        ),
        ("empty Host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n".to_vec()),
        (
            "target: absolute-form",
            b"GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "target: authority-form CONNECT",
            b"CONNECT x:80 HTTP/1.1\r\nHost: x:80\r\n\r\n".to_vec(),
        ),
        (
            "target: asterisk-form OPTIONS",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "target: asterisk-form GET",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "target: relative path",
            b"GET a/b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "target: fragment",
            b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "target: space inside",
            b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "target: two spaces",
            b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("version: HTTP/1.2", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n".to_vec()),
        (
            "version: HTTP/2.0 text",
            b"GET / HTTP/2.0\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("version: HTTP/0.9 line", b"GET /\r\n\r\n".to_vec()),
        ("lower-case method", b"get / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "bad chunk size",
            post("Transfer-Encoding: chunked\r\n", "zz\r\nabc\r\n0\r\n\r\n"),
        ),
        (
            "chunk size overflow",
            post(
                "Transfer-Encoding: chunked\r\n",
                "fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_refused_at_least_as_strictly_as_nginx_and_never_desync() -> Result<()> {
    let (lb_up, nginx_up) = (Recorder::start().await?, Recorder::start().await?);
    let (_nginx, nginx_addr) = start_nginx(nginx_up.addr).await?;
    let mut cfg = support::config(&[], Algorithm::RoundRobin);
    cfg.upstream.servers = vec![lb::config::ServerConfig {
        addr: lb_up.addr.to_string(),
        ..Default::default()
    }];
    let lb = support::start(cfg).await?;

    let mut table = vec![
        "| request | nginx | lb | upstream behind lb saw |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    let mut failures = Vec::new();
    for (name, bytes) in cases() {
        let via_nginx = send(nginx_addr, &bytes).await?;
        let via_lb = send(lb.addr, &bytes).await?;
        // Anything forwarded has been parsed by now (the answers came back, or 300 ms passed).
        let lb_saw = lb_up.take();
        let nginx_saw = nginx_up.take();
        let saw = if lb_saw.is_empty() {
            "nothing".to_string()
        } else {
            lb_saw
                .iter()
                .map(|s| format!("{} {} ({} B)", s.method, s.path, s.body))
                .collect::<Vec<_>>()
                .join(", ")
        };
        table.push(format!(
            "| {name} | {} | {} | {saw} |",
            via_nginx.cell(),
            via_lb.cell()
        ));
        if lb_saw.iter().any(|s| s.path.contains("smuggled")) {
            failures.push(format!("{name}: desync, lb's upstream saw {lb_saw:?}"));
        }
        if via_nginx.refused() && !via_lb.refused() {
            failures.push(format!(
                "{name}: nginx refused ({}), lb answered {}: {}",
                via_nginx.cell(),
                via_lb.cell(),
                via_lb.text
            ));
        }
        if name.starts_with("control") && (via_lb.first() != 200 || lb_saw.len() != 1) {
            failures.push(format!("{name}: lb should pass it: {} {lb_saw:?}", via_lb.cell()));
        }
        if nginx_saw.iter().any(|s| s.path.contains("smuggled")) {
            eprintln!("note: {name}: nginx's upstream saw the hidden request");
        }
    }
    eprintln!("{}", table.join("\n"));
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// An upstream that answers every request with `response` (raw bytes) and then closes.
async fn canned(response: &'static [u8]) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn lb_in_front_of(upstream: SocketAddr) -> Result<support::Running> {
    let mut cfg = support::config(&[], Algorithm::RoundRobin);
    cfg.upstream.servers = vec![lb::config::ServerConfig {
        addr: upstream.to_string(),
        ..Default::default()
    }];
    cfg.retry.tries = 1;
    support::start(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_responses_are_framed_one_way_only() -> Result<()> {
    // Chunked with a Content-Length beside it: the client's copy carries only the chunks.
    let up = canned(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await?;
    let lb = lb_in_front_of(up).await?;
    for req in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\na"[..],
    ] {
        let a = send(lb.addr, req).await?;
        let head = a.text.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
        ensure!(a.first() == 200, "{}", a.text);
        ensure!(head.contains("transfer-encoding: chunked"), "{}", a.text);
        ensure!(!head.contains("content-length"), "{}", a.text);
        ensure!(a.text.contains("hello"), "{}", a.text);
    }

    // `Content-Length: +5` parses as a number in many languages but is not one in HTTP.
    let up = canned(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\nConnection: close\r\n\r\nhello").await?;
    let lb = lb_in_front_of(up).await?;
    for req in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\na"[..],
    ] {
        let a = send(lb.addr, req).await?;
        ensure!(a.first() == 502, "{}", a.text);
    }

    // Every header Connection names is stripped, however many (20 here), both ways.
    let names: Vec<String> = (0..20).map(|i| format!("x-hop-{i}")).collect();
    let resp: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\n{}Content-Length: 2\r\n\r\nok",
            names.join(", "),
            names.iter().map(|n| format!("{n}: 1\r\n")).collect::<String>()
        )
        .into_boxed_str(),
    );
    let up = canned(resp.as_bytes()).await?;
    let lb = lb_in_front_of(up).await?;
    let a = send(lb.addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    ensure!(a.first() == 200 && !a.text.contains("x-hop-"), "{}", a.text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_listed_request_header_is_stripped() -> Result<()> {
    let up = Recorder::start().await?;
    let lb = lb_in_front_of(up.addr).await?;
    let names: Vec<String> = (0..20).map(|i| format!("x-hop-{i}")).collect();
    let hops: String = names.iter().map(|n| format!("{n}: 1\r\n")).collect();
    for (method, body) in [("GET", ""), ("POST", "a")] {
        let req = format!(
            "{method} / HTTP/1.1\r\nHost: x\r\nConnection: {}\r\nConnection: x-hop-19\r\n{hops}\
             Content-Length: {}\r\n\r\n{body}",
            names[..19].join(","),
            body.len()
        );
        let a = send(lb.addr, req.as_bytes()).await?;
        ensure!(a.first() == 200, "{}", a.text);
        let seen = up.take();
        ensure!(seen.len() == 1, "{seen:?}");
        ensure!(
            !seen[0].headers.iter().any(|h| h.starts_with("x-hop-")),
            "{method}: {:?}",
            seen[0].headers
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_after_a_response_does_not_reset_pipelined_requests() -> Result<()> {
    let up = Recorder::start().await?;
    let lb = lb_in_front_of(up.addr).await?;
    // The first request asks to close; the pipelined rest (60 KiB of them) is never answered,
    // but must not turn the close into a reset that could destroy the first response.
    let mut bytes = b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
    while bytes.len() < 60 * 1024 {
        bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    for _ in 0..20 {
        let a = send(lb.addr, &bytes).await?;
        ensure!(!a.reset, "the connection was reset: {}", a.text);
        ensure!(a.statuses == [200], "{}", a.cell());
        ensure!(a.text.ends_with("ok\n"), "{}", a.text);
    }
    Ok(())
}
