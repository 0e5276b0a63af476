//! Database access: a pre-pinging connection pool, a timeout on every query, the page's queries, and
//! migrations retried with backoff until the database can be reached.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::Serialize;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why a database request failed; every variant maps to a 503 for the user.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No pooled connection could be had (the database is down, refusing, or unreachable).
    #[error("no database connection: {0}")]
    Connect(String),
    /// The query (or getting a connection) took longer than the configured bound.
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error or the connection broke mid-query.
    #[error("database error: {0}")]
    Query(String),
    /// Migrations have not been applied yet.
    #[error("the schema is not ready yet")]
    NotMigrated,
}

impl DbError {
    /// A short label for the `kind` of `webapp_db_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::Connect(_) => "connect",
            DbError::Timeout(_) => "timeout",
            DbError::Query(_) => "query",
            DbError::NotMigrated => "not_migrated",
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Query(schema::describe(&e))
    }
}

impl From<schema::SchemaError> for DbError {
    fn from(e: schema::SchemaError) -> Self {
        DbError::Query(e.to_string())
    }
}

/// The database node that answered, as it describes itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its `cluster_name` setting (testkit sets `node0`, `node1`, ...); empty when unset.
    pub name: String,
    /// `inet_server_port()`; None over a Unix socket.
    pub port: Option<i32>,
    /// `inet_server_addr()`; None over a Unix socket.
    pub addr: Option<String>,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `primary` or `standby`, from `in_recovery`.
    pub role: &'static str,
}

/// One host's newest sample and its short history (newest first, the newest included).
#[derive(Debug, Clone, Serialize)]
pub struct HostSamples {
    /// The host name.
    pub host: String,
    /// Its newest sample.
    pub latest: schema::Sample,
    /// Its newest samples, newest first.
    pub history: Vec<schema::Sample>,
}

/// Everything the front page shows, read in one read-only transaction on one connection.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The node that answered.
    pub node: NodeInfo,
    /// Every host that reported, by name.
    pub hosts: Vec<HostSamples>,
}

/// What the migration step did, for `/api/info` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Versions this instance applied.
    pub applied: Vec<i32>,
    /// Known versions that were already there.
    pub already: usize,
    /// Versions in the database this build does not know.
    pub unknown: Vec<i32>,
    /// How many attempts it took.
    pub attempts: u32,
}

const NODE_SQL: &str = "SELECT current_setting('cluster_name'), inet_server_port(), \
     host(inet_server_addr()), pg_is_in_recovery()";

// A lateral join per host walks the (host, sampled_at) unique index backwards, so the cost follows
// the number of hosts times `history`, not the size of the table; at most 200 hosts are shown.
const HISTORY_SQL: &str = "SELECT s.host, s.sampled_at, s.cpu_percent, s.load1, s.load5, s.load15, \
     s.mem_total_bytes, s.mem_used_bytes, s.swap_total_bytes, s.swap_used_bytes, s.disks, s.net, \
     s.uptime_seconds, s.process_count \
     FROM (SELECT DISTINCT host FROM samples ORDER BY host LIMIT 200) h \
     CROSS JOIN LATERAL (SELECT * FROM samples x WHERE x.host = h.host \
                         ORDER BY x.sampled_at DESC LIMIT $1) s \
     ORDER BY s.host, s.sampled_at DESC";

/// The pool and the migration state, shared by every request.
pub struct Db {
    pool: Pool,
    pg: tokio_postgres::Config,
    timeout: Duration,
    migrated: OnceLock<MigrationReport>,
    metrics: Arc<Metrics>,
}

impl Db {
    /// Builds the pool; no connection is opened until the first request (or migration).
    pub fn new(
        mut pg: tokio_postgres::Config,
        pool_size: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Db, DbError> {
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("webapp");
        }
        // Verified recycling runs an empty query before handing a pooled connection out, so a
        // connection the failover killed is replaced instead of failing a user's request.
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            // A ping answers in well under a second on any healthy server; a pooled connection
            // that takes longer is half-dead (a partition, a hung backend) and gets replaced.
            .recycle_timeout(Some(timeout.min(Duration::from_secs(1))))
            .build()
            .map_err(|e| DbError::Connect(format!("cannot build the pool: {e}")))?;
        Ok(Db {
            pool,
            pg,
            timeout,
            migrated: OnceLock::new(),
            metrics,
        })
    }

    /// What the migration step did, once it is done.
    pub fn migrations(&self) -> Option<&MigrationReport> {
        self.migrated.get()
    }

    async fn conn(&self) -> Result<Object, DbError> {
        use deadpool_postgres::PoolError;
        // Bounded as a whole: several half-dead pooled connections must not add up their
        // recycle timeouts.
        let got = tokio::time::timeout(self.timeout, self.pool.get())
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?;
        got.map_err(|e| match e {
            PoolError::Timeout(_) => DbError::Timeout(self.timeout),
            PoolError::Backend(e) => DbError::Connect(schema::describe(&e)),
            other => DbError::Connect(other.to_string()),
        })
    }

    /// Runs `f` on a pooled connection within the timeout; a connection that failed or timed out
    /// is dropped rather than returned to the pool, so it can never answer the next request.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: for<'c> FnOnce(
            &'c mut Object,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, DbError>> + Send + 'c>,
        >,
    {
        let started = Instant::now();
        let result = async {
            if self.migrated.get().is_none() {
                return Err(DbError::NotMigrated);
            }
            let mut conn = self.conn().await?;
            match tokio::time::timeout(self.timeout, f(&mut conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    drop(Object::take(conn));
                    Err(e)
                }
                Err(_) => {
                    // A backend blocked on a lock does not notice its client hanging up, so
                    // dropping the connection alone would leave the session waiting on the
                    // server; cancel the query too (in the background: the user has waited
                    // long enough).
                    let cancel = conn.cancel_token();
                    drop(Object::take(conn));
                    let bound = self.timeout;
                    tokio::spawn(async move {
                        if let Ok(Err(e)) = tokio::time::timeout(bound, cancel.cancel_query(NoTls)).await {
                            tracing::warn!(error = %schema::describe(&e), "cannot cancel a timed-out query");
                        }
                    });
                    Err(DbError::Timeout(self.timeout))
                }
            }
        }
        .await;
        self.metrics.db_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics.db_errors.with_label_values(&[e.kind()]).inc();
        }
        result
    }

    /// `SELECT 1` through the pool: what `/readyz` asks.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.with_conn(|c| {
            Box::pin(async move {
                c.simple_query("SELECT 1").await?;
                Ok(())
            })
        })
        .await
    }

    /// The front page's data: the answering node and each host's recent samples, read in one
    /// read-only transaction so that both come from the same server even through dbproxy.
    pub async fn overview(&self, history: u32) -> Result<Overview, DbError> {
        let limit = i64::from(history);
        self.with_conn(move |c| {
            Box::pin(async move {
                let node_stmt = c.prepare_cached(NODE_SQL).await?;
                let history_stmt = c.prepare_cached(HISTORY_SQL).await?;
                let tx = c.build_transaction().read_only(true).start().await?;
                let row = tx.query_one(&node_stmt, &[]).await?;
                let in_recovery: bool = row.try_get(3)?;
                let node = NodeInfo {
                    name: row.try_get(0)?,
                    port: row.try_get(1)?,
                    addr: row.try_get(2)?,
                    in_recovery,
                    role: if in_recovery { "standby" } else { "primary" },
                };
                let rows = tx.query(&history_stmt, &[&limit]).await?;
                tx.commit().await?;
                let mut hosts: Vec<HostSamples> = Vec::new();
                for row in &rows {
                    let s = schema::samples::from_row(row)?;
                    match hosts.last_mut() {
                        Some(h) if h.host == s.host => h.history.push(s),
                        _ => hosts.push(HostSamples {
                            host: s.host.clone(),
                            latest: s.clone(),
                            history: vec![s],
                        }),
                    }
                }
                Ok(Overview { node, hosts })
            })
        })
        .await
    }

    /// Applies the migrations, retrying with backoff while the database cannot be reached, until it
    /// succeeds or `shutdown` fires. Uses its own connection (not a pooled one) so that dropping it
    /// on a timeout releases the advisory lock.
    pub async fn migrate_until_done(&self, shutdown: &CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.migrate_once().await {
                Ok(applied) => {
                    tracing::info!(
                        applied = ?applied.applied,
                        already = applied.already,
                        attempts,
                        "schema is ready"
                    );
                    let _ = self.migrated.set(MigrationReport {
                        applied: applied.applied,
                        already: applied.already,
                        unknown: applied.unknown,
                        attempts,
                    });
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempts, retry_in = ?backoff, "cannot migrate yet");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn migrate_once(&self) -> Result<schema::Applied, DbError> {
        // Named apart from the pool's sessions so operators (and tests) can tell them apart.
        let mut pg = self.pg.clone();
        pg.application_name("webapp-migrate");
        let (client, connection) = pg
            .connect(NoTls)
            .await
            .map_err(|e| DbError::Connect(schema::describe(&e)))?;
        let conn_task = tokio::spawn(async move {
            let _ = connection.await;
        });
        // Other instances may hold the lock for as long as their migration takes: allow far more
        // than a query, but still give up (and drop the session, freeing any lock) eventually.
        let bound = (self.timeout * 20).max(Duration::from_secs(30));
        let result = match tokio::time::timeout(bound, migrate_or_check(&client)).await {
            Ok(r) => r,
            Err(_) => Err(DbError::Timeout(bound)),
        };
        drop(client);
        let _ = conn_task.await;
        result
    }
}

/// Whether a migration failed because the server is read-only (a standby).
fn is_read_only_refusal(e: &schema::SchemaError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(db) = err.downcast_ref::<tokio_postgres::Error>() {
            if db.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Migrates on a primary; on a standby (read-only: no DDL, no advisory locks) only checks that the
/// primary's migrations have replicated, so a webapp pointed at a replica waits instead of failing.
///
/// The migration is tried first: through dbproxy its advisory lock pins the session to the primary,
/// whereas a bare `pg_is_in_recovery()` would be balanced to a standby. Only a server that refuses
/// it as read-only (SQLSTATE 25006, i.e. a standby reached directly) gets the check instead.
async fn migrate_or_check(client: &tokio_postgres::Client) -> Result<schema::Applied, DbError> {
    match schema::migrate(client).await {
        Ok(applied) => return Ok(applied),
        Err(e) if !is_read_only_refusal(&e) => return Err(e.into()),
        Err(_) => {}
    }
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Err(DbError::Query(
            "the server is a standby and the primary has not migrated yet".into(),
        ));
    }
    let rows = client.query("SELECT version FROM schema_migrations", &[]).await?;
    let mut recorded = Vec::with_capacity(rows.len());
    for r in &rows {
        recorded.push(r.try_get::<_, i32>(0)?);
    }
    let missing: Vec<i32> = schema::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .filter(|v| !recorded.contains(v))
        .collect();
    if !missing.is_empty() {
        return Err(DbError::Query(format!(
            "the server is a standby and lacks migrations {missing:?}; waiting for the primary"
        )));
    }
    Ok(schema::Applied {
        applied: Vec::new(),
        already: schema::MIGRATIONS.len(),
        unknown: recorded
            .into_iter()
            .filter(|v| !schema::MIGRATIONS.iter().any(|m| m.version == *v))
            .collect(),
    })
}
