//! What the pooling tests (`tests/pooling.rs`, `tests/transaction_pooling.rs`) share: a cluster
//! with a password, a proxy with pools of a given size, one-value queries, metrics, pgbench runs
//! through the proxy, and a sampler of the most server connections pgbench held on each node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use dbproxy::config::Config;
use testkit::PgCluster;

use super::{config_for, pg_program, Proxy};

/// A primary and `standbys` standbys, password `pw`.
pub async fn cluster(standbys: usize) -> Result<Arc<PgCluster>> {
    let c =
        tokio::task::spawn_blocking(move || PgCluster::builder().standbys(standbys).password("pw").start())
            .await??;
    Ok(Arc::new(c))
}

/// A proxy on `c` with one serving thread (consecutive clients share its pools) and pools of
/// `size`, changed by `tweak`.
pub fn proxy(c: &PgCluster, size: usize, tweak: impl FnOnce(&mut Config)) -> Result<Proxy> {
    let mut cfg = config_for(c, Some("pw"));
    cfg.workers = 1;
    cfg.pool.size = size;
    tweak(&mut cfg);
    Proxy::start(cfg)
}

/// The first column of the first row of `sql`.
pub async fn one(client: &tokio_postgres::Client, sql: &str) -> Result<String> {
    let rows = client.simple_query(sql).await?;
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or("").to_string());
        }
    }
    bail!("no row for {sql}")
}

/// The value of the first `/metrics` line that starts with `line_prefix` (0 when none does).
pub fn metric(proxy: &Proxy, line_prefix: &str) -> Result<f64> {
    let m = proxy.admin_get("/metrics")?;
    Ok(m.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

/// Runs pgbench against `port` with `args`; its stdout, or an error with its output.
pub fn pgbench(port: u16, args: &[&str]) -> Result<String> {
    let out = pg_program("pgbench")?
        .args(args)
        .args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-U", "postgres", "postgres"])
        .env("PGPASSWORD", "pw")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("pgbench failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

/// `pgbench -i -s 1` on the primary, replicated to every standby.
pub fn pgbench_init(c: &PgCluster) -> Result<()> {
    pgbench(c.primary().port(), &["-i", "-q", "-s", "1"])?;
    c.wait_replicated()
}

/// Samples, on each of the first two nodes, how many server connections pgbench
/// (`application_name = 'pgbench'`) holds, until stopped; dropping it stops it too, so a blocking
/// task still running cannot keep the test's runtime from shutting down however the test ends.
pub struct MaxConnections {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<Result<Vec<usize>>>>,
}

impl MaxConnections {
    pub fn start(c: &Arc<PgCluster>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            let c = c.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<usize>> {
                let mut max = vec![0usize; 2];
                while !stop.load(Ordering::Relaxed) {
                    for (i, m) in max.iter_mut().enumerate() {
                        let n: usize = c
                            .node(i)
                            .psql("select count(*) from pg_stat_activity where application_name = 'pgbench'")?
                            .parse()?;
                        *m = (*m).max(n);
                    }
                }
                Ok(max)
            })
        };
        MaxConnections {
            stop,
            task: Some(task),
        }
    }

    /// Stops sampling: the most connections seen on each node.
    pub async fn finish(mut self) -> Result<Vec<usize>> {
        self.stop.store(true, Ordering::Relaxed);
        let task = self.task.take().expect("finished once");
        task.await?
    }
}

impl Drop for MaxConnections {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
