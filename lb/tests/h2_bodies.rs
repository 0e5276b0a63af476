//! Request bodies over HTTP/2 through TLS: many POSTs on one connection, bodies from empty to
//! past the flow-control window, sequential and as parallel streams, to an upstream that reads
//! the body and to one that answers before reading it (and then closes its connection). Every
//! response must arrive whole: a reset stream or a cut body fails the test.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::tls::{ca, client, connect, leaf};
use support::wait_for;

/// Sizes around the HTTP/2 frame (16 KiB) and window (64 KiB - 1) edges, and past them.
const SIZES: [usize; 12] = [
    0, 1, 3, 1000, 16_383, 16_384, 16_385, 65_535, 65_536, 70_000, 200_000, 1_000_000,
];

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// lb on a TLS listener, its CA, and what must live as long as the test.
struct Setup {
    h2: Sender,
    tls: SocketAddr,
    ca: std::path::PathBuf,
    /// Connections the early upstream has closed.
    closed: Arc<AtomicUsize>,
    _lb: tokio_util::sync::DropGuard,
    _reader: support::Backend,
    _dir: tempfile::TempDir,
}

/// lb on a TLS listener (in this process) in front of `/read` (a backend that reads and echoes
/// the body) and `/early` (one that answers at once without reading it), and an HTTP/2
/// connection to it.
async fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (crt, key) = leaf(dir.path(), &authority, "a.test", "a")?;
    let reader = support::Backend::start("reader").await;
    let (early, closed) = early_upstream().await?;
    let tls = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()?));
    let guard = support::tls::serve(&format!(
        "http {{\n server {{ listen {tls} ssl; server_name a.test; ssl_certificate {}; ssl_certificate_key {};\n\
           location /read/ {{ proxy_pass http://{}/echo; }}\n\
           location /early/ {{ proxy_pass http://{early}; }} }}\n}}\n",
        crt.display(),
        key.display(),
        reader.addr,
    ))
    .await?;
    let connector = client(&authority.0, &[b"h2"])?;
    let c = connector.clone();
    let stream = wait_for("lb to serve TLS", move || {
        let c = c.clone();
        async move { connect(&c, tls, "a.test").await.ok() }
    })
    .await?;
    ensure!(stream.get_ref().1.alpn_protocol() == Some(b"h2"), "h2 by ALPN");
    let (h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(Setup {
        h2,
        tls,
        ca: authority.0,
        closed,
        _lb: guard,
        _reader: reader,
        _dir: dir,
    })
}

/// An upstream that answers `early METHOD TARGET` at once, without reading the request body,
/// and then closes the connection;
/// counts the connections it closed.
async fn early_upstream() -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let closed = Arc::new(AtomicUsize::new(0));
    let count = closed.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let text = format!("early {} {}", req.method(), req.uri());
                        // It closes the connection after this answer, and says so (as Go's
                        // server does when it leaves a body unread). hyper's server alone would
                        // close without saying it, a keep-alive race for any client (see
                        // ARCHITECTURE.md, "early answers").
                        let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
                        resp.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                        Ok::<_, Infallible>(resp)
                    });
                let conn =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                // The socket is closed once the connection future is done.
                let _ = conn.await;
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, closed))
}

/// A body of `n` bytes that differ from one position to the next.
fn body(n: usize, seed: usize) -> Bytes {
    (0..n)
        .map(|i| ((i * 31 + seed) % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

/// POSTs `data` to `path`; the status and the whole response body.
async fn post(h2: &mut Sender, path: &str, data: Bytes) -> Result<(u16, Bytes)> {
    let req = hyper::Request::post(format!("https://a.test{path}"))
        .header("content-length", data.len())
        .body(Full::new(data))?;
    tokio::time::timeout(support::DEADLINE, async {
        h2.ready().await?;
        let resp = h2.send_request(req).await.context("response head")?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("response body")?
            .to_bytes();
        Ok((status, body))
    })
    .await
    .context("POST timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_of_every_size_over_one_connection_come_back_whole() -> Result<()> {
    let s = setup().await?;
    let mut h2 = s.h2.clone();
    for round in 0..3 {
        for (i, &n) in SIZES.iter().enumerate() {
            let data = body(n, i + round);
            let (status, got) = post(&mut h2, "/read/", data.clone()).await?;
            ensure!(status == 200, "{n} bytes: status {status}");
            ensure!(got == data, "{n} bytes: echoed {} bytes, not the same", got.len());
        }
    }
    // The same sizes as parallel streams on the connection.
    let mut inflight = Vec::new();
    for round in 0..4 {
        for (i, &n) in SIZES.iter().enumerate() {
            let mut h2 = h2.clone();
            inflight.push(tokio::spawn(async move {
                let data = body(n, i * 7 + round);
                let (status, got) = post(&mut h2, "/read/", data.clone()).await?;
                ensure!(
                    status == 200 && got == data,
                    "{n} bytes: status {status}, {} back",
                    got.len()
                );
                Ok(())
            }));
        }
    }
    for t in inflight {
        t.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_before_reading_the_body_is_relayed_whole() -> Result<()> {
    let s = setup().await?;
    let mut h2 = s.h2.clone();
    // Every size, up to bodies lb writes upstream in many writes: a later write meets the reset
    // of the upstream that closed without reading, and the answer it sent before still wins
    // (lb's `early_answer`; before it, such a request could get a 502).
    let sizes = &SIZES[..];
    for round in 0..20 {
        for (i, &n) in sizes.iter().enumerate() {
            let (status, got) = post(&mut h2, "/early/x", body(n, i + round)).await?;
            ensure!(
                status == 200 && got == "early POST /early/x",
                "{n} bytes (round {round}): status {status}, body {got:?}"
            );
        }
    }
    let mut inflight = Vec::new();
    for round in 0..8 {
        for (i, &n) in sizes.iter().enumerate() {
            let mut h2 = h2.clone();
            inflight.push(tokio::spawn(async move {
                let (status, got) = post(&mut h2, "/early/x", body(n, i + round)).await?;
                ensure!(
                    status == 200 && got == "early POST /early/x",
                    "{n} bytes: status {status}, body {got:?}"
                );
                Ok(())
            }));
        }
    }
    for t in inflight {
        t.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_posts_in_parallel_streams_get_their_responses() -> Result<()> {
    // curl 7.88 (Debian 12) fails a transfer whose stream is reset, even with NO_ERROR, while it
    // still has body to send, so lb must not reset a stream it answered early.
    let s = setup().await?;
    let (ca, tls) = (s.ca.clone(), s.tls);
    for path in ["/early/c", "/read/"] {
        let urls: Vec<String> = (0..100)
            .map(|i| format!("https://a.test:{}{path}?{i}", tls.port()))
            .collect();
        let ca = ca.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args([
                    "-sS",
                    "--http2",
                    "--parallel",
                    "--parallel-max",
                    "50",
                    "--max-time",
                    "20",
                ])
                .arg("--cacert")
                .arg(&ca)
                .args(["--resolve", &format!("a.test:{}:{}", tls.port(), tls.ip())])
                .args(["-d", "k=v", "-w", "=%{http_code}\n"])
                .args(&urls)
                .output()
        })
        .await??;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "{path}: curl: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Parallel transfers interleave their output: count the statuses and the bodies.
        let want = if path == "/read/" {
            "k=v"
        } else {
            "early POST /early/c?"
        };
        let (ok, bodies) = (text.matches("=200").count(), text.matches(want).count());
        ensure!(ok == 100 && bodies == 100, "{path}: {ok} of 100 answered: {text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_answered_early_is_not_reset_while_the_client_still_sends() -> Result<()> {
    // The client sends the head, reads the whole response, and only then its body: lb must take
    // the body (and the stream end normally), not reset the stream. curl 7.88 fails a transfer
    // whose stream is reset while it still has body to send, even with NO_ERROR.
    let s = setup().await?;
    let connector = client(&s.ca, &[b"h2"])?;
    let stream = connect(&connector, s.tls, "a.test").await?;
    let (h2, mut conn) = h2::client::handshake(stream).await?;
    let mut ping = conn.ping_pong().context("ping")?;
    tokio::spawn(conn);
    let mut h2 = h2.ready().await?;
    for i in 0..20 {
        let req = http::Request::post(format!("https://a.test/early/{i}")).body(())?;
        let (resp, mut send) = h2.send_request(req, false)?;
        let resp = tokio::time::timeout(support::DEADLINE, resp).await??;
        ensure!(resp.status() == 200, "status {}", resp.status());
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        ensure!(text == format!("early POST /early/{i}").as_bytes(), "{text:?}");
        // The upstream closed its connection without the body; lb's client sees that at once.
        let closed = s.closed.clone();
        wait_for("the upstream to close", || {
            let n = closed.load(Ordering::SeqCst);
            async move { (n > i).then_some(()) }
        })
        .await?;
        // A ping answered means lb wrote any reset it had queued before the pong.
        ping.ping(h2::Ping::opaque()).await?;
        let reset = std::future::poll_fn(|cx| send.poll_reset(cx)).now_or_never();
        ensure!(
            reset.is_none(),
            "POST {i}: lb reset the stream before its body: {reset:?}"
        );
        send.send_data(Bytes::from_static(b"late body"), true)?;
        ping.ping(h2::Ping::opaque()).await?;
        let reset = std::future::poll_fn(|cx| send.poll_reset(cx)).now_or_never();
        ensure!(reset.is_none(), "POST {i}: lb reset the stream: {reset:?}");
    }
    Ok(())
}
