//! The memory of a dbproxy process whose sessions each sent one large query (issue 21): starts a
//! PostgreSQL server (testkit) and the `dbproxy` binary built beside this example, opens SESSIONS
//! client connections (default 1000), sends each one `select length('<MIB MiB of x>')` (default
//! 32), IN_FLIGHT at a time (default 4), keeps every session open, and prints dbproxy's VmRSS
//! (now, all sessions idle) and VmHWM (the peak) from /proc. The clients speak the protocol over
//! plain sockets and share one encoded query, so they hold no 32 MiB buffer each; the run stops
//! when the machine has less than 4 GiB available or after TIME_LIMIT seconds (default 900).
//! Run the binary optimised, e.g. `cargo build -p dbproxy --config
//! 'profile.dev.package.dbproxy.opt-level=2' --bin dbproxy --example rss_big_queries &&
//! target/debug/examples/rss_big_queries`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use dbproxy::protocol::{decode, put_cstr, startup::PROTOCOL_3_0, BackendMessage, Frame};
use testkit::{free_port, PgCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS and VmHWM of `pid`, in MiB.
fn memory(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: f64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// MemAvailable of the machine, in MiB.
fn available_mib() -> Result<f64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kb: f64 = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no MemAvailable in /proc/meminfo")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// A StartupMessage for user and database `postgres`.
fn startup() -> BytesMut {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0);
    for s in ["user", "postgres", "database", "postgres", ""] {
        put_cstr(&mut body, s);
    }
    let mut msg = BytesMut::with_capacity(body.len() + 4);
    msg.put_i32(body.len() as i32 + 4);
    msg.extend_from_slice(&body);
    msg
}

/// Reads a session's messages up to ReadyForQuery; the first column of the last DataRow.
async fn until_ready(stream: &mut TcpStream) -> Result<Option<String>> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut value = None;
    loop {
        while let Some(frame) = decode(&mut buf, 1 << 20)? {
            match BackendMessage::parse(&frame)? {
                BackendMessage::ReadyForQuery { .. } => return Ok(value),
                BackendMessage::ErrorResponse(e) => bail!("error from dbproxy: {:?}", e.message()),
                BackendMessage::DataRow(row) => value = row.first_text().map(str::to_string),
                _ => {}
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("dbproxy closed the connection");
        }
    }
}

struct Dbproxy(Child);

impl Drop for Dbproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let sessions = env("SESSIONS", 1000);
    let mib = env("MIB", 32);
    let in_flight = env("IN_FLIGHT", 4);
    let cluster = PgCluster::builder().setting("max_connections", "1100").start()?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut config = dbproxy::Config::loopback(cluster.nodes().iter().map(|n| (n.name(), n.port())), None);
    config.listen = format!("127.0.0.1:{port}");
    config.admin_listen = format!("127.0.0.1:{}", free_port()?);
    config.state_dir = dir.path().join("state").display().to_string();
    config.limits.max_connections = sessions + 10;
    // Each session keeps its server connection (session pooling).
    config.pool.size = sessions + 10;
    // A thousand logins and 32 MiB parses on a busy machine: slow answers are not a failure.
    config.pool.connect_timeout = 60.0;
    config.health.timeout = 30.0;
    config.health.fall = 10;
    config.users.clear();
    config.hba = vec![dbproxy::config::HbaRule {
        method: dbproxy::config::AuthMethod::Trust,
        ..Default::default()
    }];
    let file = dir.path().join("dbproxy.toml");
    std::fs::write(&file, toml::to_string(&config)?)?;
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .context("no target directory")?
        .join("dbproxy");
    let proxy = Dbproxy(
        Command::new(&bin)
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let pid = proxy.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("dbproxy did not accept connections within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (rss0, _) = memory(pid)?;

    let body = format!("select length('{}')\0", "x".repeat(mib << 20));
    // One encoded Query shared by every session: the clients hold no copy of their own.
    let query = Frame::new(b'Q', body.as_bytes()).raw().clone();
    drop(body);
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let logins = Arc::new(tokio::sync::Semaphore::new(8));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..sessions {
        let (query, gate, logins) = (query.clone(), gate.clone(), logins.clone());
        tasks.spawn(async move {
            let login = logins.acquire_owned().await?;
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(&startup()).await?;
            until_ready(&mut stream).await?;
            drop(login);
            let permit = gate.acquire_owned().await?;
            stream.write_all(&query).await?;
            let n = until_ready(&mut stream).await?;
            drop(permit);
            anyhow::ensure!(n.as_deref() == Some(&(mib << 20).to_string()[..]), "answer {n:?}");
            Ok::<_, anyhow::Error>(stream)
        });
    }
    let limit = Duration::from_secs(env("TIME_LIMIT", 900) as u64);
    let mut streams = Vec::new();
    while !tasks.is_empty() {
        if started.elapsed() > limit {
            bail!("{} of {sessions} sessions done within {limit:?}", streams.len());
        }
        // Stop before the machine runs short of memory (the PostgreSQL servers hold some too).
        let free = available_mib()?;
        if free < 4096.0 {
            bail!(
                "only {free:.0} MiB of memory left after {} sessions: stopped",
                streams.len()
            );
        }
        if let Ok(Some(done)) = tokio::time::timeout(Duration::from_millis(200), tasks.join_next()).await {
            streams.push(done??);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Every session is open and idle; give freed memory a moment to go back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, hwm) = memory(pid)?;
    println!(
        "sessions={sessions} query_mib={mib} in_flight={in_flight} secs={secs:.1} \
         rss_start_mib={rss0:.1} rss_after_mib={rss:.1} peak_rss_mib={hwm:.1}"
    );
    drop(streams);
    Ok(())
}
