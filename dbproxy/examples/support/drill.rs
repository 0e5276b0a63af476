//! What the failover drills (`failover_drill`, `chain_drill`) share: dbproxy run in-process on
//! loopback ports with its admin listener, polling with a deadline, and the summary figures.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dbproxy::config::Config;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The password of every drill cluster's `postgres` user.
/// The replication mode a drill runs the cluster in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Asynchronous streaming replication.
    Async,
    /// Synchronous replication (`synchronous_standby_names = '*'`).
    Sync,
}

impl Mode {
    /// The name the reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
        }
    }
}

pub const PASSWORD: &str = "pw";
/// How often a wait polls.
pub const POLL: Duration = Duration::from_millis(25);

/// dbproxy on its own thread and runtime, as the binary runs it.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(config: Config) -> Result<Proxy> {
        let config = common::Validate::validate(config).map_err(|e| anyhow!("{e}"))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let admin_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        admin_listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let admin = admin_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("dbproxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("dbproxy runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let l = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("dbproxy listener: {e}"),
                    };
                    let a = match tokio::net::TcpListener::from_std(admin_listener) {
                        Ok(a) => a,
                        Err(e) => return eprintln!("dbproxy admin listener: {e}"),
                    };
                    if let Err(e) = dbproxy::run_with_admin(l, Some(a), config, token).await {
                        eprintln!("dbproxy failed: {e}");
                    }
                });
                // Do not wait for stray tasks (e.g. a probe stuck in connect) beyond a moment.
                rt.shutdown_timeout(Duration::from_secs(5));
            })?;
        Ok(Proxy {
            addr,
            admin,
            shutdown,
            thread: Some(thread),
        })
    }

    /// A libpq connection string to dbproxy naming the drill as `application_name`.
    pub fn conn_string(&self, application_name: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres \
             application_name={application_name} connect_timeout=5",
            self.addr.port()
        )
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> Result<Value> {
        status_at(self.admin)
    }

    /// Cancels dbproxy and waits (bounded) for its thread.
    pub fn stop(&mut self) -> bool {
        self.shutdown.cancel();
        let Some(t) = self.thread.take() else {
            return true;
        };
        if !poll_until(Instant::now() + Duration::from_secs(30), || t.is_finished()) {
            eprintln!("dbproxy did not stop within 30 s; leaving its thread behind");
            return false;
        }
        let _ = t.join();
        true
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET /status` of the dbproxy whose admin listener is `admin`, as JSON.
pub fn status_at(admin: SocketAddr) -> Result<Value> {
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.take(8 << 20).read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {out:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /status: {}", head.lines().next().unwrap_or(""));
    }
    serde_json::from_str(body).context("parsing /status")
}

/// Polls `f` until it returns true or `deadline` passes; returns whether it did.
pub fn poll_until(deadline: Instant, mut f: impl FnMut() -> bool) -> bool {
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Median (mean of the two middle values for an even count) and maximum.
pub fn median_max(mut xs: Vec<f64>) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let med = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    Some((med, xs[n - 1]))
}

/// "median / max" in whole milliseconds, or a dash.
pub fn fmt_pair(p: Option<(f64, f64)>) -> String {
    match p {
        Some((a, b)) => format!("{a:.0} / {b:.0}"),
        None => "–".into(),
    }
}
