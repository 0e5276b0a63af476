//! Helpers shared by the webapp's integration tests: start the library on port 0, plain HTTP
//! requests with timeouts, polling with a deadline, and a tiny HTTP peer serving fake `/status` JSON.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A webapp started with `webapp::run` on a loopback port.
pub struct App {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), webapp::WebappError>>,
}

impl App {
    pub async fn start(config: webapp::Config) -> Result<App> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(webapp::run(listener, config, shutdown.clone()));
        Ok(App { addr, shutdown, task })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> Result<Reply> {
        request(Method::GET, &self.url(path), &[]).await
    }

    /// Stops the app and checks that it drained and exited cleanly.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .context("webapp did not stop within 15 s")?
            .context("webapp task panicked")?
            .context("webapp returned an error")
    }
}

/// A configuration for tests: loopback, short timeouts, no status URLs unless set.
pub fn config(instance: &str, database_url: &str) -> webapp::Config {
    webapp::Config {
        listen: "127.0.0.1:0".into(),
        instance: instance.into(),
        database_url: database_url.into(),
        pool_size: 4,
        query_timeout_ms: 2000,
        lb_status_url: String::new(),
        dbproxy_status_url: String::new(),
        dashboard_interval_ms: 100,
        status_timeout_ms: 500,
        ..webapp::Config::default()
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not json: {}", self.body))
    }
}

/// One request on a fresh connection, bounded by 10 s.
pub async fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    request_with_body(method, url, headers, "").await
}

/// The operator password the tests configure.
pub const OPERATOR_PASSWORD: &str = "operator pass phrase";

/// A logged-in operator: the `Cookie` header value and the session's CSRF token.
#[derive(Debug, Clone)]
pub struct Operator {
    pub cookie: String,
    pub csrf: String,
}

/// Logs in through `base`'s login form (a webapp, or lb in front of webapps) and reads the CSRF
/// token from the dashboard page, as the browser's script does.
pub async fn login(base: &str, password: &str) -> Result<Operator> {
    let r = request_with_body(
        Method::POST,
        &format!("{base}/dashboard/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("password={}", password.replace(' ', "+")),
    )
    .await?;
    if r.status != StatusCode::SEE_OTHER {
        bail!("login refused: {r:?}");
    }
    let set = r
        .headers
        .get("set-cookie")
        .context("no set-cookie")?
        .to_str()?
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        if !set.split("; ").any(|a| a == attr) {
            bail!("the session cookie lacks {attr}: {set}");
        }
    }
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    let page = request(Method::GET, &format!("{base}/dashboard"), &[("cookie", &cookie)]).await?;
    let needle = "<meta name=\"csrf-token\" content=\"";
    let start = page.body.find(needle).context("no csrf token on the page")? + needle.len();
    let csrf = page.body[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Operator { cookie, csrf })
}

/// One request with `body` on a fresh connection, bounded by 10 s.
pub async fn request_with_body(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply> {
    let uri: hyper::Uri = url.parse()?;
    let host = uri.authority().context("no authority")?.to_string();
    let fut = async {
        let stream = tokio::net::TcpStream::connect(&host).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header("host", &host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::from(body.to_string())))?)
            .await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("{url}: no answer within 10 s"))?
}

/// Polls `f` every 50 ms until it returns Some, failing after `deadline`.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > deadline {
            bail!("{what}: not within {deadline:?} (last error: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/readyz` answers 200.
pub async fn wait_ready(app: &App) -> Result<()> {
    poll("webapp ready", Duration::from_secs(60), || async {
        let r = app.get("/readyz").await?;
        Ok((r.status == StatusCode::OK).then_some(()))
    })
    .await
}

/// A tiny HTTP peer standing in for lb's and dbproxy's admin listeners: serves whatever
/// (status, body) is set for a path and records every request it gets.
#[derive(Clone, Default)]
pub struct FakePeer {
    routes: Arc<Mutex<HashMap<String, (u16, String)>>>,
    pub seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl FakePeer {
    pub fn set(&self, path: &str, status: u16, body: &str) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_string(), (status, body.to_string()));
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }

    /// Serves on a loopback port until `shutdown`; returns the address.
    pub async fn serve(&self, shutdown: CancellationToken) -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let me = me.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            me.seen
                                .lock()
                                .unwrap()
                                .push((req.method().to_string(), path.clone()));
                            let (code, body) = me
                                .routes
                                .lock()
                                .unwrap()
                                .get(&path)
                                .cloned()
                                .unwrap_or((404, "no such path".into()));
                            let html = body.starts_with('<');
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            if html {
                                r.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static("text/html"),
                                );
                            }
                            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    // A stopped peer also drops its kept-alive connections, as a dead process would.
                    tokio::select! {
                        _ = conn => {}
                        _ = shutdown.cancelled() => {}
                    }
                });
            }
        });
        Ok(addr)
    }
}

/// Inserts one sample of `host` at `secs` seconds after the epoch with `cpu` percent.
pub async fn insert_sample(conn_string: &str, host: &str, secs: u64, cpu: f64) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(conn_string, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let stmt = schema::samples::prepare_insert(&client).await?;
    let s = schema::Sample {
        host: host.into(),
        sampled_at: std::time::UNIX_EPOCH + Duration::from_secs(secs),
        cpu_percent: Some(cpu),
        load1: 0.5,
        load5: 0.25,
        load15: 0.125,
        mem_total_bytes: 8 << 30,
        mem_used_bytes: 3 << 30,
        swap_total_bytes: 1 << 30,
        swap_used_bytes: 0,
        disks: vec![schema::Disk {
            mount: "/".into(),
            fs_type: "ext4".into(),
            total_bytes: 100 << 30,
            used_bytes: 40 << 30,
        }],
        net: vec![schema::NetIface {
            iface: "eth0".into(),
            rx_bytes: 123_456,
            tx_bytes: 654_321,
        }],
        uptime_seconds: 93_784.0,
        process_count: 142,
    };
    schema::samples::insert(&client, &stmt, &s).await?;
    drop(client);
    let _ = task.await;
    Ok(())
}
