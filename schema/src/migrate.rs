//! The migration runner: embedded SQL files applied in version order, each in its own transaction,
//! under a session-level advisory lock so concurrent starters never race.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// One embedded migration: `migrations/NNNN_name.sql`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The version, the `NNNN` of the file name; strictly increasing through [`MIGRATIONS`].
    pub version: i32,
    /// The `name` part of the file name, recorded for humans.
    pub name: &'static str,
    /// The SQL text; it must not contain its own BEGIN/COMMIT (the runner wraps it in one transaction).
    pub sql: &'static str,
}

impl Migration {
    /// The SHA-256 of the SQL text, hex-encoded: what `schema_migrations.checksum` records.
    pub fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        hex
    }
}

/// Every migration this build knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "samples",
    sql: include_str!("../migrations/0001_samples.sql"),
}];

/// The advisory-lock key every ha-stack instance takes while migrating (ASCII "hastack" + 1).
pub const LOCK_KEY: i64 = 0x6861_7374_6163_6b01;

/// What one call of [`migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Versions this call applied, in order.
    pub applied: Vec<i32>,
    /// How many known migrations were already recorded (and whose checksums matched).
    pub already: usize,
    /// Versions recorded in the database that this build does not know (a newer instance ran first).
    pub unknown: Vec<i32>,
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A statement of the runner itself failed (lock, bookkeeping table, unlock).
    #[error("database error while {doing}: {}", describe(.source))]
    Db {
        /// What the runner was doing.
        doing: &'static str,
        /// The client's error.
        source: tokio_postgres::Error,
    },
    /// A migration's SQL failed; its transaction was rolled back.
    #[error("migration {version} ({name}) failed: {}", describe(.source))]
    Apply {
        /// The migration's version.
        version: i32,
        /// The migration's name.
        name: &'static str,
        /// The client's error.
        source: tokio_postgres::Error,
    },
    /// An applied migration was edited afterwards: the database and this build disagree about it.
    #[error(
        "migration {version} ({name}) changed after it was applied: the database recorded checksum \
         {recorded}, this build has {embedded}"
    )]
    ChecksumMismatch {
        /// The migration's version.
        version: i32,
        /// The migration's name.
        name: &'static str,
        /// The checksum in `schema_migrations`.
        recorded: String,
        /// The checksum of the embedded SQL.
        embedded: String,
    },
    /// The embedded list is not in strictly increasing version order (a build mistake).
    #[error("embedded migrations are out of order at version {0}")]
    OutOfOrder(i32),
    /// A row read back from the database could not be decoded.
    #[error("cannot decode column `{column}`: {}", describe(.source))]
    Decode {
        /// The column that failed.
        column: &'static str,
        /// The client's error.
        source: tokio_postgres::Error,
    },
}

/// A client error as one line with the server's message and SQLSTATE when there is one
/// (`tokio_postgres::Error`'s own Display says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            text
        }
    }
}

const CREATE_BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Applies every embedded migration the database lacks, under the advisory lock [`LOCK_KEY`].
///
/// Blocks while another instance holds the lock. Callers wanting a bound wrap this in a timeout and
/// drop the client on expiry: closing the session releases the lock.
pub async fn migrate(client: &Client) -> Result<Applied, SchemaError> {
    migrate_list(client, MIGRATIONS).await
}

/// [`migrate`] with an explicit list (tests use it to check the checksum guard).
pub async fn migrate_list(client: &Client, migrations: &[Migration]) -> Result<Applied, SchemaError> {
    check_order(migrations)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|source| SchemaError::Db {
            doing: "taking the migration lock",
            source,
        })?;
    let result = apply_locked(client, migrations).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let applied = result?;
    unlock.map_err(|source| SchemaError::Db {
        doing: "releasing the migration lock",
        source,
    })?;
    Ok(applied)
}

fn check_order(migrations: &[Migration]) -> Result<(), SchemaError> {
    for pair in migrations.windows(2) {
        if pair[1].version <= pair[0].version {
            return Err(SchemaError::OutOfOrder(pair[1].version));
        }
    }
    Ok(())
}

async fn apply_locked(client: &Client, migrations: &[Migration]) -> Result<Applied, SchemaError> {
    // Look before creating: when everything is applied already, no DDL runs at all, so a migrated
    // database can be checked on a hot standby (where even CREATE ... IF NOT EXISTS is refused).
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|source| SchemaError::Db {
            doing: "looking for schema_migrations",
            source,
        })?;
    if !exists {
        client
            .batch_execute(CREATE_BOOKKEEPING)
            .await
            .map_err(|source| SchemaError::Db {
                doing: "creating schema_migrations",
                source,
            })?;
    }
    let rows = client
        .query(
            "SELECT version, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(|source| SchemaError::Db {
            doing: "reading schema_migrations",
            source,
        })?;
    let mut recorded = Vec::with_capacity(rows.len());
    for row in &rows {
        let version: i32 = row.try_get(0).map_err(|source| SchemaError::Decode {
            column: "version",
            source,
        })?;
        let checksum: String = row.try_get(1).map_err(|source| SchemaError::Decode {
            column: "checksum",
            source,
        })?;
        recorded.push((version, checksum));
    }

    let mut out = Applied::default();
    for (version, _) in &recorded {
        if !migrations.iter().any(|m| m.version == *version) {
            out.unknown.push(*version);
        }
    }
    if !out.unknown.is_empty() {
        tracing::warn!(versions = ?out.unknown, "the database has migrations this build does not know");
    }
    for m in migrations {
        let embedded = m.checksum();
        if let Some((_, sum)) = recorded.iter().find(|(v, _)| *v == m.version) {
            if *sum != embedded {
                return Err(SchemaError::ChecksumMismatch {
                    version: m.version,
                    name: m.name,
                    recorded: sum.clone(),
                    embedded,
                });
            }
            out.already += 1;
            continue;
        }
        apply_one(client, m, &embedded).await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        out.applied.push(m.version);
    }
    Ok(out)
}

async fn apply_one(client: &Client, m: &Migration, checksum: &str) -> Result<(), SchemaError> {
    let fail = |source| SchemaError::Apply {
        version: m.version,
        name: m.name,
        source,
    };
    // BEGIN/COMMIT by hand because the runner only borrows the client (`transaction()` needs `&mut`).
    client.batch_execute("BEGIN").await.map_err(fail)?;
    let body = async {
        client.batch_execute(m.sql).await?;
        client
            .execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                &[&m.version, &m.name, &checksum],
            )
            .await?;
        client.batch_execute("COMMIT").await
    };
    if let Err(e) = body.await {
        // The session may be gone too; the server rolls back on disconnect in that case.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(fail(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_migrations_are_ordered_and_named_like_their_files() {
        check_order(MIGRATIONS).unwrap();
        for m in MIGRATIONS {
            assert!(!m.sql.trim().is_empty(), "migration {} is empty", m.version);
            assert!(
                !m.sql.to_ascii_uppercase().contains("COMMIT;"),
                "migration {} must not manage its own transaction",
                m.version
            );
        }
    }

    #[test]
    fn out_of_order_lists_are_refused() {
        let list = [
            Migration {
                version: 2,
                name: "b",
                sql: "SELECT 1",
            },
            Migration {
                version: 2,
                name: "c",
                sql: "SELECT 1",
            },
        ];
        assert!(matches!(check_order(&list), Err(SchemaError::OutOfOrder(2))));
    }

    #[test]
    fn checksum_is_sha256_hex_of_the_sql() {
        let m = Migration {
            version: 1,
            name: "x",
            sql: "abc",
        };
        assert_eq!(
            m.checksum(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
