//! Shared pieces of the dbproxy integration tests: a proxy running in its own thread and runtime
//! in front of a testkit cluster, and small raw-protocol helpers.
#![allow(dead_code)]

pub mod pooling;
pub mod writers;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use dbproxy::config::Config;
use dbproxy::protocol::{self, error, startup, Frame};
use testkit::{PgCluster, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A dbproxy serving on loopback; dropping it shuts it down.
pub struct Proxy {
    /// The PostgreSQL listener.
    pub addr: SocketAddr,
    /// The admin HTTP listener.
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<Config>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts dbproxy with `config` (validated here).
    pub fn start(config: Config) -> Result<Proxy> {
        let config = common::Validate::validate(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let admin_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        admin_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let admin = admin_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let a = tokio::net::TcpListener::from_std(admin_listener).expect("admin listener");
                if let Err(e) = dbproxy::run_with(l, Some(a), config, token, Some(reloads)).await {
                    eprintln!("dbproxy failed: {e}");
                }
            });
        });
        Ok(Proxy {
            addr,
            admin,
            shutdown,
            reload,
            thread: Some(thread),
        })
    }

    /// Hands dbproxy a new configuration (validated here), as the binary does on SIGHUP.
    pub async fn reload(&self, config: Config) -> Result<()> {
        let config = common::Validate::validate(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.reload.send(config).await.context("dbproxy is gone")
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A tokio-postgres connection string for `user`/`password`.
    pub fn conn_string(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=postgres connect_timeout=10",
            self.port()
        )
    }

    /// Connects with tokio-postgres and drives the connection in the background.
    pub async fn connect(&self, user: &str, password: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_string(user, password), tokio_postgres::NoTls)
                .await
                .context("connecting through dbproxy")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Sends `method path` to the admin listener; returns the status code and the body.
    pub fn admin(&self, method: &str, path: &str) -> Result<(u16, String)> {
        admin_request(self.admin, method, path)
    }

    /// GETs `/status` as JSON.
    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.admin_get("/status")?)?)
    }

    /// GETs `path` from the admin listener and returns the body.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `method path` (no body) to an admin listener; returns the status code and the body.
pub fn admin_request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line from the admin listener")?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A config for `cluster`, superuser `postgres` with `password`, fast health checks.
pub fn config_for(cluster: &PgCluster, password: Option<&str>) -> Config {
    let mut cfg = Config::loopback(cluster.nodes().iter().map(|n| (n.name(), n.port())), password);
    cfg.limits.startup_timeout = 1.0;
    cfg
}

/// Runs a PostgreSQL client program (psql, pgbench) from the server's bin directory.
pub fn pg_program(name: &str) -> Result<Command> {
    let mut cmd = Command::new(testkit::pg_bindir()?.join(name));
    cmd.env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .env("PGCONNECT_TIMEOUT", "10");
    Ok(cmd)
}

/// Runs psql through the proxy and returns its trimmed stdout, or stderr as the error.
pub fn psql(proxy: &Proxy, user: &str, password: &str, sql: &str) -> Result<String> {
    let out = pg_program("psql")?
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
        .arg(proxy.port().to_string())
        .args(["-U", user, "-d", "postgres", "-c", sql])
        .env("PGPASSWORD", password)
        .output()?;
    if !out.status.success() {
        anyhow::bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The SQLSTATE of a tokio-postgres error.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// Runs a test body with an overall time limit, so a hang fails the test instead of stalling CI.
pub async fn bounded<T>(body: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(240), body)
        .await
        .context("the test did not finish within 240 s")?
}

/// A raw protocol client.
pub struct Raw {
    /// The socket.
    pub s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(proxy: &Proxy) -> Result<Raw> {
        Ok(Raw {
            s: TcpStream::connect(proxy.addr).await?,
            buf: BytesMut::new(),
        })
    }

    /// Logs in as postgres (the proxy trusts it) and reads up to ReadyForQuery.
    pub async fn login(proxy: &Proxy) -> Result<Raw> {
        let mut r = Raw::connect(proxy).await?;
        let mut out = BytesMut::new();
        startup::encode_startup([("user", "postgres"), ("database", "postgres")], &mut out);
        r.send(&out).await?;
        loop {
            let f = r.frame().await?.context("closed during login")?;
            match f.tag() {
                b'Z' => return Ok(r),
                b'E' => bail!("login failed: {:?}", error::field(f.body(), b'M')),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, b: &[u8]) -> Result<()> {
        self.s.write_all(b).await?;
        Ok(())
    }

    /// The next frame, or None at end of stream; bounded by the test deadline.
    pub async fn frame(&mut self) -> Result<Option<Frame>> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(f) = protocol::decode(&mut self.buf, 1 << 20)? {
                    return Ok(Some(f));
                }
                if self.s.read_buf(&mut self.buf).await? == 0 {
                    return Ok(None);
                }
            }
        })
        .await
        .context("no answer from dbproxy")?
    }

    /// Runs `sql`, whose result has one column, as a simple Query and returns the value in its
    /// last row (None when it returns no row; a NULL reads as empty); an ErrorResponse fails.
    pub async fn value(&mut self, sql: &str) -> Result<Option<Vec<u8>>> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send(&msg(b'Q', &body)).await?;
        // DataRow: column count (2 bytes), then the first column's length (4).
        self.last_until_ready(b'D', 6).await
    }

    /// Reads up to ReadyForQuery and returns the body of the last `tag` message from byte `skip`
    /// on (None when none came); an ErrorResponse fails.
    pub async fn last_until_ready(&mut self, tag: u8, skip: usize) -> Result<Option<Vec<u8>>> {
        let mut got = None;
        loop {
            let f = self.frame().await?.context("closed before ReadyForQuery")?;
            match f.tag() {
                b'Z' => return Ok(got),
                b'E' => bail!("error: {:?}", error::field(f.body(), b'M')),
                t if t == tag => got = Some(f.body().get(skip..).context("short message")?.to_vec()),
                _ => {}
            }
        }
    }

    /// Reads until an ErrorResponse and returns its SQLSTATE; then expects the connection closed.
    pub async fn fatal_code(&mut self) -> Result<String> {
        loop {
            let f = self.frame().await?.context("closed without an error")?;
            if f.tag() == b'E' {
                let code = error::sqlstate(f.body()).unwrap_or("").to_string();
                assert_eq!(error::field(f.body(), b'S'), Some("FATAL"));
                assert!(self.frame().await?.is_none(), "connection closed after FATAL");
                return Ok(code);
            }
        }
    }
}

/// Encodes one tagged message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b.to_vec()
}
