//! Helpers shared by the collector's integration tests: a real PostgreSQL, a collector run in a task,
//! and polling with deadlines.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use collector::{Config, Mode, RunError, Stats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const INTERVAL: Duration = Duration::from_millis(200);

pub async fn start_db() -> Result<Arc<testkit::PgCluster>> {
    let c = tokio::task::spawn_blocking(|| testkit::PgCluster::builder().start())
        .await?
        .context("starting postgres")?;
    Ok(Arc::new(c))
}

pub fn config(db: &testkit::PgNode, spool: &Path, host: &str) -> Config {
    Config {
        interval: INTERVAL,
        database_url: db.conn_string(),
        host: Some(host.to_string()),
        spool_file: spool.to_path_buf(),
        connect_timeout: Duration::from_secs(2),
        query_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

pub struct Running {
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), RunError>>,
}

pub fn spawn(config: Config) -> Running {
    spawn_with_admin(None, config)
}

pub fn spawn_with_admin(admin: Option<tokio::net::TcpListener>, config: Config) -> Running {
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(collector::run(
        admin,
        config,
        Mode::default(),
        stats.clone(),
        shutdown.clone(),
    ));
    Running {
        stats,
        shutdown,
        task,
    }
}

impl Running {
    /// Shuts the collector down as SIGTERM would and waits (bounded) for `run` to return.
    pub async fn stop(self) -> Result<Arc<Stats>> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("collector did not stop")??
            .context("collector returned an error")?;
        Ok(self.stats)
    }
}

/// Polls `f` off the async threads until it yields a value or `testkit::DEADLINE` passes.
pub async fn wait_for<T: Send + 'static>(
    what: &'static str,
    f: impl FnMut() -> Result<Option<T>> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || testkit::wait_for(what, testkit::DEADLINE, f)).await?
}

/// Rows of `host` as (id, sampled_at in µs since the epoch), in arrival order.
pub fn rows(db: &testkit::PgNode, host: &str) -> Result<Vec<(i64, i64)>> {
    let out = db.psql(&format!(
        "select id, (extract(epoch from sampled_at) * 1000000)::bigint from samples \
         where host = '{host}' order by id"
    ))?;
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (a, b) = l.split_once('|').context("bad psql row")?;
            Ok((a.parse()?, b.parse()?))
        })
        .collect()
}

pub fn count(db: &testkit::PgNode, host: &str) -> Result<u64> {
    let n = db.psql(&format!("select count(*) from samples where host = '{host}'"));
    match n {
        Ok(n) => Ok(n.parse()?),
        // The table appears with the collector's first connection.
        Err(e) if e.to_string().contains("does not exist") => Ok(0),
        Err(e) => Err(e),
    }
}

/// Asserts arrival order equals sampling order and that no sample is stored twice.
pub fn assert_in_order_once(rows: &[(i64, i64)]) {
    for w in rows.windows(2) {
        assert!(
            w[1].1 > w[0].1,
            "sample {} (t={}) arrived after {} (t={}): out of order or duplicated",
            w[1].0,
            w[1].1,
            w[0].0,
            w[0].1
        );
    }
}

/// A plain HTTP/1.1 GET over a real socket; returns the whole response (status line, headers, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8(out)?)
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("admin request timed out")?
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
