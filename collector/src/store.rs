//! Writes samples to PostgreSQL (through dbproxy in production) with tokio-postgres: one
//! connection, re-opened after any failure, migrations applied on the first connection, and a
//! timeout on every connect and query.

use std::time::Duration;

use schema::{describe, samples, Sample, SchemaError};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the session failed.
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    /// A connect, migration or insert took longer than its timeout.
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    /// Applying the schema failed.
    #[error(transparent)]
    Migrate(#[from] SchemaError),
    /// The insert failed for a reason that may pass (connection lost, read-only node, shutdown).
    #[error("insert failed: {0}")]
    Transient(String),
    /// The database refused this sample's data itself; sending it again cannot succeed.
    #[error("the database rejected the sample: {0}")]
    Rejected(String),
}

impl StoreError {
    /// Whether the sample should be dropped rather than retried.
    pub fn is_rejection(&self) -> bool {
        matches!(self, StoreError::Rejected(_))
    }
}

/// Timeouts for [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For opening a connection (TCP, startup, authentication).
    pub connect: Duration,
    /// For each statement, migrations included.
    pub query: Duration,
}

struct Conn {
    client: Client,
    insert: Statement,
}

/// A lazily (re)connected writer.
pub struct Store {
    config: tokio_postgres::Config,
    timeouts: Timeouts,
    conn: Option<Conn>,
    migrated: bool,
}

impl Store {
    /// A store for `config`; nothing connects until the first write.
    pub fn new(mut config: tokio_postgres::Config, timeouts: Timeouts) -> Self {
        config.connect_timeout(timeouts.connect);
        if config.get_application_name().is_none() {
            config.application_name("ha-stack-collector");
        }
        Store {
            config,
            timeouts,
            conn: None,
            migrated: false,
        }
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.client.is_closed())
    }

    /// Writes one sample; Ok(false) when the database already had it.
    pub async fn write(&mut self, s: &Sample) -> Result<bool, StoreError> {
        let query = self.timeouts.query;
        let conn = self.connection().await?;
        let result = tokio::time::timeout(query, samples::insert(&conn.client, &conn.insert, s)).await;
        match result {
            Ok(Ok(inserted)) => Ok(inserted),
            Ok(Err(e)) => {
                if is_data_error(&e) {
                    return Err(StoreError::Rejected(describe(&e)));
                }
                self.conn = None;
                Err(StoreError::Transient(describe(&e)))
            }
            Err(_) => {
                // The session's state is unknown after an abandoned query: cancel it on the
                // server (where it would otherwise keep waiting, e.g. on a lock) and start afresh.
                if let Some(conn) = self.conn.take() {
                    cancel(&conn.client, self.timeouts.connect).await;
                }
                Err(StoreError::Timeout("insert", query))
            }
        }
    }

    async fn connection(&mut self) -> Result<&Conn, StoreError> {
        if !self.is_connected() {
            self.conn = None;
            let conn = self.connect().await?;
            self.conn = Some(conn);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::Connect("no connection".into()))
    }

    async fn connect(&mut self) -> Result<Conn, StoreError> {
        let t = self.timeouts;
        let (client, connection) = tokio::time::timeout(t.connect, self.config.connect(NoTls))
            .await
            .map_err(|_| StoreError::Timeout("connect", t.connect))?
            .map_err(|e| StoreError::Connect(describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %describe(&e), "database connection closed");
            }
        });
        if !self.migrated {
            let applied = match tokio::time::timeout(t.query, schema::migrate(&client)).await {
                Ok(r) => r?,
                Err(_) => {
                    cancel(&client, t.connect).await;
                    return Err(StoreError::Timeout("applying migrations", t.query));
                }
            };
            if !applied.applied.is_empty() {
                tracing::info!(versions = ?applied.applied, "applied schema migrations");
            }
            self.migrated = true;
        }
        let insert = match tokio::time::timeout(t.query, samples::prepare_insert(&client)).await {
            Ok(r) => r.map_err(|e| StoreError::Transient(describe(&e)))?,
            Err(_) => {
                cancel(&client, t.connect).await;
                return Err(StoreError::Timeout("prepare", t.query));
            }
        };
        Ok(Conn { client, insert })
    }
}

/// Asks the server to cancel whatever `client`'s session is running. Dropping the connection alone
/// is not enough: a backend waiting on a lock does not notice its client left, and would linger
/// (and write the row later) until the lock is released.
async fn cancel(client: &Client, limit: Duration) {
    let token = client.cancel_token();
    match tokio::time::timeout(limit, token.cancel_query(NoTls)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %describe(&e), "cancel request failed"),
        Err(_) => tracing::debug!("cancel request timed out"),
    }
}

/// Data exceptions (class 22) and integrity violations (class 23) are about the row itself.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    // A unique violation cannot happen (ON CONFLICT); if it does, the row is there already.
    if *code == SqlState::UNIQUE_VIOLATION {
        return true;
    }
    let c = code.code();
    c.starts_with("22") || c.starts_with("23")
}
