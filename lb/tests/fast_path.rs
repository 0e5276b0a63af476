//! The HTTP/1.1 fast path end to end: response framings relayed as sent (chunked, length,
//! until close, HEAD), pooled upstream connections the upstream closed, pipelining, and a
//! connection that moves to the hyper path mid-way (a POST after GETs).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use lb::config::{Algorithm, ServerConfig};
use support::{admin_get, config, start, Backend, Conn, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that writes canned bytes per path, to pin down the framings lb must relay.
struct RawBackend {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicU64>,
}

impl RawBackend {
    async fn start() -> Result<RawBackend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw(s));
            }
        });
        Ok(RawBackend { addr, connections })
    }
}

async fn serve_raw(mut s: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            match tokio::time::timeout(DEADLINE, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let line = head.lines().next().unwrap_or("");
        let (close, reply): (bool, &[u8]) = match line {
            l if l.starts_with("GET /chunked ") => (
                false,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
            ),
            l if l.starts_with("GET /close-after ") => {
                (true, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            }
            l if l.starts_with("GET /eof-body ") => (true, b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
            l if l.starts_with("HEAD ") => (false, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
            l if l.starts_with("GET /continue ") => (
                false,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter",
            ),
            _ => (false, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"),
        };
        if s.write_all(reply).await.is_err() || close {
            return;
        }
    }
}

fn raw_config(b: &RawBackend) -> lb::Config {
    let mut c = config(&[], Algorithm::RoundRobin);
    c.upstream.servers = vec![ServerConfig {
        addr: b.addr.to_string(),
        ..Default::default()
    }];
    c
}

fn head(path: &str) -> Request<Full<Bytes>> {
    Request::head(path)
        .header("host", "app.example")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_is_relayed_and_the_connection_goes_on() -> Result<()> {
    let b = RawBackend::start().await?;
    let lb = start(raw_config(&b)).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    assert_eq!(conn.get("/chunked").await?.1, "hello world");
    assert_eq!(conn.get("/").await?.1, "ok");
    let (status, body) = conn.send(head("/")).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, ""));
    assert_eq!(conn.get("/continue").await?.1, "after");
    assert_eq!(conn.get("/chunked").await?.1, "hello world");
    // A body delimited by the upstream's close ends the client connection too.
    assert_eq!(conn.get("/eof-body").await?.1, "until close");
    let mut fresh = Conn::open(lb.addr, "127.0.0.1").await?;
    assert_eq!(fresh.get("/").await?.1, "ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_errors() -> Result<()> {
    let b = RawBackend::start().await?;
    let lb = start(raw_config(&b)).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    for _ in 0..5 {
        // The upstream answers and closes: the pooled connection is dead by the next request.
        assert_eq!(conn.get("/close-after").await?.1, "ok");
        assert_eq!(conn.get("/").await?.1, "ok");
    }
    // Keep-alive works: the plain requests share connections.
    assert!(b.connections.load(Ordering::SeqCst) <= 10);
    let metrics = admin_get(lb.admin, "/metrics").await?;
    assert!(
        !metrics.contains("lb_upstream_failures_total{"),
        "a closed idle connection is not a server failure:\n{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_and_a_post_after_gets_share_one_connection() -> Result<()> {
    let a = Backend::start("a").await;
    let lb = start(config(&[&a], Algorithm::RoundRobin)).await?;
    // Two pipelined GETs in one write; the second asks to close.
    let mut s = TcpStream::connect(lb.addr).await?;
    s.write_all(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .context("pipelined responses")??;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");

    // GETs on the fast path, then a POST with a body: the connection moves to the hyper path.
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    assert_eq!(conn.get("/").await?.1, "a");
    assert_eq!(conn.get("/").await?.1, "a");
    let post = Request::post("/echo")
        .header("host", "x")
        .body(Full::new(Bytes::from_static(b"payload")))?;
    assert_eq!(conn.send(post).await?.1, "payload");
    assert_eq!(conn.get("/").await?.1, "a");
    assert_eq!(a.hits(), 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_takes_the_fast_path_pipelined_and_then_moves_to_hyper() -> Result<()> {
    let b = RawBackend::start().await?;
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir()?;
    let authority = support::tls::ca(dir.path())?;
    let (crt, key) = support::tls::leaf(dir.path(), &authority, "a.test", "a")?;
    let tls = std::net::SocketAddr::from(([127, 0, 0, 1], testkit::free_port()?));
    let _lb = support::tls::serve(&format!(
        "http {{\n server {{ listen {tls} ssl; server_name a.test; ssl_certificate {}; ssl_certificate_key {};\n\
           location / {{ proxy_pass http://{}; }}\n\
           location /echo {{ proxy_pass http://{}; }} }}\n}}\n",
        crt.display(),
        key.display(),
        b.addr,
        a.addr,
    ))
    .await?;
    let connector = support::tls::client(&authority.0, &[b"http/1.1"])?;
    let c = connector.clone();
    let mut s = support::wait_for("lb to serve TLS", move || {
        let c = c.clone();
        async move { support::tls::connect(&c, tls, "a.test").await.ok() }
    })
    .await?;
    // The chunk extension and the trailer come back as the upstream sent them: only the fast
    // path relays framing byte for byte (hyper's would re-chunk it). Three requests in one TLS
    // write: the later ones wait decrypted inside rustls, where no socket readiness shows them.
    s.write_all(
        b"GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n\
          GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await?;
    s.flush().await?;
    let want = "5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let mut out = Vec::new();
    while String::from_utf8_lossy(&out).matches(want).count() < 2 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
            .await
            .context("pipelined TLS responses")??;
        anyhow::ensure!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    // A POST moves the same TLS connection to the hyper path, which goes on serving it.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 7\r\n\r\npayload")
        .await?;
    s.write_all(b"GET /chunked HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await?;
    s.flush().await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .context("the rest")?;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("\r\n\r\npayload"), "{text}");
    // hyper's path decodes and re-chunks: the extension is gone, the body is the same.
    assert!(text.contains("hello") && !text.contains("5;x=y"), "{text}");
    Ok(())
}
