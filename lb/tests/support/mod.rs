//! Test helpers: real hyper backends on 127.0.0.1:0, lb started on port 0, and clients that can
//! connect from any 127.0.0.0/8 source address (to exercise ip_hash).

#![allow(dead_code)]

pub mod nginx;
pub mod proc;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A backend web server.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Answer `/health` with 200 (true) or 503.
    pub healthy: Arc<AtomicBool>,
    /// Answer every request with 503 while set.
    pub failing: Arc<AtomicBool>,
    /// Releases requests parked on `/hold`.
    pub release: Arc<Notify>,
    stop: CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backend {
    /// Starts a backend answering its name.
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let b = Backend {
            name: name.to_string(),
            addr,
            hits: Arc::new(AtomicU64::new(0)),
            healthy: Arc::new(AtomicBool::new(true)),
            failing: Arc::new(AtomicBool::new(false)),
            release: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        };
        let st = State {
            name: b.name.clone(),
            hits: b.hits.clone(),
            healthy: b.healthy.clone(),
            failing: b.failing.clone(),
            release: b.release.clone(),
        };
        let stop = b.stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let st = st.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(st.answer(req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        b
    }

    /// Stops the backend: its port refuses connections from now on.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct State {
    name: String,
    hits: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    release: Arc<Notify>,
}

impl State {
    async fn answer(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        if req.uri().path() == "/stall" {
            // One chunk, then nothing: a backend that hangs mid-body.
            self.hits.fetch_add(1, Ordering::SeqCst);
            let first =
                futures_util::stream::iter([Ok(hyper::body::Frame::data(Bytes::from_static(b"start")))]);
            let body = StreamBody::new(futures_util::StreamExt::chain(
                first,
                futures_util::stream::pending(),
            ));
            return Response::new(BodyExt::boxed(body));
        }
        self.answer_full(req).await.map(BodyExt::boxed)
    }

    async fn answer_full(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == "/health" {
            let ok = self.healthy.load(Ordering::SeqCst);
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return resp(status, "health");
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        if req.headers().contains_key(hyper::header::UPGRADE) {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
            let mut r = resp(StatusCode::SWITCHING_PROTOCOLS, "");
            *r.body_mut() = Full::new(Bytes::new());
            r.headers_mut()
                .insert(hyper::header::UPGRADE, "websocket".parse().unwrap());
            r.headers_mut()
                .insert(hyper::header::CONNECTION, "upgrade".parse().unwrap());
            return r;
        }
        if self.failing.load(Ordering::SeqCst) {
            return resp(StatusCode::SERVICE_UNAVAILABLE, "failing");
        }
        match path.as_str() {
            "/hold" => {
                self.release.notified().await;
                resp(StatusCode::OK, &self.name)
            }
            "/headers" => {
                let mut text = String::new();
                for (k, v) in req.headers() {
                    text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                }
                resp(StatusCode::OK, &text)
            }
            "/echo" => {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let mut r = resp(StatusCode::OK, "");
                *r.body_mut() = Full::new(body);
                r
            }
            _ => resp(StatusCode::OK, &self.name),
        }
    }
}

fn resp(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

/// A running lb.
pub struct Running {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub lb: lb::Lb,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), lb::LbError>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A config over `backends` with `algorithm`, short timeouts, no access log noise.
pub fn config(backends: &[&Backend], algorithm: lb::config::Algorithm) -> lb::Config {
    let mut c = lb::Config {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    c.upstream.algorithm = algorithm;
    c.upstream.servers = backends
        .iter()
        .map(|b| lb::config::ServerConfig {
            addr: b.addr.to_string(),
            ..Default::default()
        })
        .collect();
    c.timeouts.upstream_connect = lb::config::Dur(Duration::from_secs(2));
    c.timeouts.upstream_response = lb::config::Dur(Duration::from_secs(10));
    c.access_log.enabled = false;
    c
}

/// Starts lb (and its admin listener) on port 0.
pub async fn start(config: lb::Config) -> Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let admin = admin_listener.local_addr()?;
    let lb = lb::Lb::new(config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(lb.clone().serve_admin(admin_listener, shutdown.clone()));
    let task = tokio::spawn(lb.clone().serve(listener, shutdown.clone()));
    Ok(Running {
        addr,
        admin,
        lb,
        shutdown,
        task,
    })
}

/// A keep-alive HTTP/1.1 connection to lb from a chosen loopback source address.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(to: SocketAddr, from: &str) -> Result<Conn> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(format!("{from}:0").parse()?)
            .with_context(|| format!("bind {from}"))?;
        let stream = tokio::time::timeout(DEADLINE, sock.connect(to)).await??;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(Conn { sender })
    }

    /// Sends a request; returns status and body text.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<(StatusCode, String)> {
        tokio::time::timeout(DEADLINE, async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        })
        .await
        .map_err(|_| anyhow!("request timed out"))?
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, String)> {
        self.send(get(path)).await
    }
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "app.example")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// One GET on a fresh connection.
pub async fn get_once(to: SocketAddr, path: &str) -> Result<(StatusCode, String)> {
    Conn::open(to, "127.0.0.1").await?.get(path).await
}

/// Raw bytes in, everything until close (or `limit`) out.
pub async fn raw(to: SocketAddr, request: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(to).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Polls `f` until it returns `Some`, failing after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > DEADLINE {
            return Err(anyhow!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The text of lb's admin endpoint `path`.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    let raw = raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(raw))
}

/// A port nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    // Bound but never listening, and kept for the life of the test process: connections are
    // refused, and no other test's listener can take the port meanwhile (a dropped listener's
    // port could be reused by a server running in parallel, which would then answer).
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = s.local_addr().unwrap();
    std::mem::forget(s);
    addr
}

/// A backend that answers `NAME METHOD TARGET`, so a test sees where a request went and as
/// what; under `/headers` it adds ` proto=` and the X-Forwarded-Proto it got.
pub async fn echo(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let mut text = format!("{name} {} {}", req.method(), req.uri());
                    if req.uri().path().starts_with("/headers") {
                        let proto = req.headers().get("x-forwarded-proto");
                        let proto = proto.and_then(|v| v.to_str().ok()).unwrap_or("-");
                        text.push_str(&format!(" proto={proto}"));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
