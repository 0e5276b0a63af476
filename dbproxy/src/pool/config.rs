//! The `[pool]` configuration: how server connections are kept and shared between clients.

use common::ConfigError;

use crate::config::check_secs;
use serde::{Deserialize, Serialize};

/// When a client gives its server connections back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps its server connections until it leaves; they are then reset and pooled.
    #[default]
    Session,
    /// A client holds a server connection only while a transaction (or an autocommit request)
    /// runs; it goes back to the pool at ReadyForQuery `I`. Session state is carried over
    /// (settings replayed, prepared statements prepared lazily) or pins the client to its
    /// connection (temporary tables, LISTEN, session advisory locks, WITH HOLD cursors, SQL
    /// PREPARE).
    Transaction,
}

/// Server connection pooling (PgBouncer's pool settings). Pools are keyed by node, user,
/// database and every startup parameter (`application_name` included).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// `session` (the default): a client keeps its server connections until it leaves, then they
    /// are reset and given to the next client with the same key. `transaction`: a client holds
    /// a server connection only while a transaction or an autocommit request runs, and is given
    /// a process id of dbproxy's (its server connection changes); what needs a session (a
    /// temporary table, LISTEN, a session advisory lock, a WITH HOLD cursor, SQL PREPARE) pins
    /// the client to its connection until it leaves.
    pub mode: PoolMode,
    /// Server connections per pool key and node, idle and in use together (all serving threads
    /// count against one limit); a client that needs one more waits.
    pub size: usize,
    /// Idle server connections each serving thread keeps open per pool key and node once that
    /// key has been used (opened ahead of clients, within `size`); 0 opens none ahead.
    pub min_idle: usize,
    /// Seconds an idle server connection stays pooled before it is closed (0 = forever).
    pub idle_timeout: f64,
    /// Seconds after its login a server connection is closed instead of pooled again (0 = no
    /// limit).
    pub max_lifetime: f64,
    /// Seconds to connect to and log into a backend for the pool (and to run the reset query).
    pub connect_timeout: f64,
    /// Seconds a client waits for a server connection when its pool is full; then it gets
    /// SQLSTATE 53300.
    pub checkout_timeout: f64,
    /// Run on a server connection before another client gets it; empty turns pooling off
    /// (connections are closed when their client leaves).
    pub server_reset_query: String,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            size: 100,
            min_idle: 0,
            idle_timeout: 600.0,
            max_lifetime: 3600.0,
            connect_timeout: 5.0,
            checkout_timeout: 15.0,
            server_reset_query: "DISCARD ALL".to_string(),
        }
    }
}

impl PoolConfig {
    /// The rules serde cannot express, each error naming its `pool.*` key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mode == PoolMode::Transaction && self.server_reset_query.is_empty() {
            return Err(ConfigError::invalid(
                "pool.server_reset_query",
                "must not be empty with pool.mode = \"transaction\" (connections are shared)",
            ));
        }
        if self.size == 0 {
            return Err(ConfigError::invalid("pool.size", "must be at least 1"));
        }
        if self.min_idle > self.size {
            return Err(ConfigError::invalid(
                "pool.min_idle",
                format!("must not exceed pool.size ({})", self.size),
            ));
        }
        check_secs("pool.idle_timeout", self.idle_timeout, false)?;
        check_secs("pool.max_lifetime", self.max_lifetime, false)?;
        check_secs("pool.connect_timeout", self.connect_timeout, true)?;
        check_secs("pool.checkout_timeout", self.checkout_timeout, true)?;
        if self.server_reset_query.len() > 4096 || self.server_reset_query.contains('\0') {
            return Err(ConfigError::invalid(
                "pool.server_reset_query",
                "must be at most 4096 bytes without NUL",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        PoolConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let err = |c: PoolConfig| c.validate().unwrap_err().to_string();
        PoolConfig {
            mode: PoolMode::Transaction,
            ..PoolConfig::default()
        }
        .validate()
        .unwrap();
        let e = err(PoolConfig {
            mode: PoolMode::Transaction,
            server_reset_query: String::new(),
            ..PoolConfig::default()
        });
        assert!(
            e.contains("pool.server_reset_query") && e.contains("transaction"),
            "{e}"
        );
        let e = err(PoolConfig {
            size: 0,
            ..PoolConfig::default()
        });
        assert!(e.contains("pool.size"), "{e}");
        let e = err(PoolConfig {
            min_idle: 200,
            ..PoolConfig::default()
        });
        assert!(e.contains("pool.min_idle"), "{e}");
        let e = err(PoolConfig {
            checkout_timeout: 0.0,
            ..PoolConfig::default()
        });
        assert!(e.contains("pool.checkout_timeout"), "{e}");
        let e = err(PoolConfig {
            idle_timeout: f64::NAN,
            ..PoolConfig::default()
        });
        assert!(e.contains("pool.idle_timeout"), "{e}");
        assert!(toml::from_str::<PoolConfig>("mode = \"statement\"").is_err());
    }
}
