//! Authentication that needs no password on disk: the `[auth]` section (pass-through to the
//! primary, PgBouncer's `auth_query`), the lookup that runs `auth_query` on the primary, and the
//! cache of what it found. The session decides what to do with a verifier (`session::login`)
//! and relays pass-through exchanges (`session::relay`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::ConfigError;
use serde::{Deserialize, Serialize};

use crate::auth::Credentials;
use crate::backend::{self, BackendError};
use crate::cluster::Cluster;
use crate::config::{check_secs, UserConfig};
use crate::protocol::{error as perror, extended, write_msg, BackendMessage};

/// PgBouncer's default `auth_query`.
pub const DEFAULT_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

/// How clients are authenticated when their user has no `[[users]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Pass-through: a client whose user has no `[[users]]` entry authenticates against the
    /// elected primary, dbproxy relaying the primary's exchange (trust, password, md5,
    /// SCRAM-SHA-256) as pgpool-II does with `enable_pool_hba = off` and no pool_passwd entry.
    /// Standby connections then log in with what the exchange revealed: nothing needed
    /// (trust), the password (password); after md5 or SCRAM all of that session's queries run
    /// on the primary, since neither reveals what another login needs (set `auth.user` for
    /// that: `auth_query` takes precedence). `[[hba]]` trust and reject rules still apply
    /// first. Off: such clients fail as a wrong password does.
    pub passthrough: bool,
    /// PgBouncer's `auth_user`: the user (listed in `[[users]]`, whose password or secret
    /// dbproxy logs in with) that runs `auth.query` on the primary to fetch the SCRAM or md5
    /// verifier of a user with no `[[users]]` entry; dbproxy then authenticates the client
    /// itself and logs in to every node with what the client proved. Empty: no `auth_query`.
    pub user: String,
    /// PgBouncer's `auth_query`: run with `$1` = the user name; its second column (the first
    /// when there is only one) is the verifier, as in `pg_authid.rolpassword`. No row, or
    /// NULL: the user is not found and fails as a wrong password does.
    pub query: String,
    /// PgBouncer's `auth_dbname`: the database `auth.query` runs in.
    pub dbname: String,
    /// Seconds a looked-up verifier (or a user not found) is kept before `auth.query` runs
    /// again for that user; 0 runs it at every login. A changed password (ALTER USER) is
    /// honoured after at most this long. A reload empties the cache.
    pub cache_ttl: f64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            passthrough: false,
            user: String::new(),
            query: DEFAULT_QUERY.to_string(),
            dbname: "postgres".to_string(),
            cache_ttl: 60.0,
        }
    }
}

impl AuthConfig {
    /// Whether `auth_query` is configured.
    pub fn query_on(&self) -> bool {
        !self.user.is_empty()
    }

    /// The rules serde cannot express, each error naming its `auth.*` key.
    pub fn validate(&self, users: &[UserConfig]) -> Result<(), ConfigError> {
        check_secs("auth.cache_ttl", self.cache_ttl, false)?;
        if !self.query_on() {
            return Ok(());
        }
        let Some(u) = users.iter().find(|u| u.name == self.user) else {
            return Err(ConfigError::invalid(
                "auth.user",
                format!(
                    "\"{}\" must be listed in [[users]] with its password (dbproxy logs in as it to run auth.query)",
                    self.user
                ),
            ));
        };
        if u.password.is_none() && u.password_env.is_none() && u.password_file.is_none() && u.secret.is_none()
        {
            return Err(ConfigError::invalid(
                "auth.user",
                format!(
                    "[[users]] \"{}\" has no password or secret to log in with",
                    self.user
                ),
            ));
        }
        if self.query.trim().is_empty() || !self.query.contains("$1") || self.query.contains('\0') {
            return Err(ConfigError::invalid(
                "auth.query",
                "must be a query taking the user name as $1",
            ));
        }
        if self.dbname.is_empty() {
            return Err(ConfigError::invalid("auth.dbname", "must name a database"));
        }
        Ok(())
    }
}

/// Why `auth_query` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No primary is elected.
    #[error("no primary server is available to run auth_query on")]
    NoPrimary,
    /// `auth.user` cannot log in to the primary (wrong or missing password).
    #[error("auth_user \"{user}\" cannot log in to the primary: {reason}")]
    Login {
        /// `auth.user`.
        user: String,
        /// What the server (or the login) said.
        reason: String,
    },
    /// The query failed.
    #[error("auth_query failed on the primary: {0}")]
    Query(String),
    /// The primary could not be reached or broke the protocol.
    #[error("auth_query could not reach the primary: {0}")]
    Backend(BackendError),
}

/// The most users whose lookup is kept: names come from unauthenticated clients, so the cache
/// cannot grow with them.
const MAX_ENTRIES: usize = 10_000;

struct Entry {
    at: Instant,
    secret: Option<String>,
}

/// Verifiers (or their absence) `auth_query` found, by user, for `auth.cache_ttl`.
#[derive(Default)]
pub struct VerifierCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl VerifierCache {
    /// A fresh entry for `user`: `Some(None)` when the user was not found.
    pub fn get(&self, user: &str, ttl: Duration) -> Option<Option<String>> {
        let entries = self.entries.lock().expect("verifier cache poisoned");
        entries
            .get(user)
            .filter(|e| e.at.elapsed() < ttl)
            .map(|e| e.secret.clone())
    }

    /// Keeps what a lookup found for `user`.
    pub fn put(&self, user: &str, secret: Option<String>, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("verifier cache poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.at.elapsed() < ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            user.to_string(),
            Entry {
                at: Instant::now(),
                secret,
            },
        );
    }
}

/// What dbproxy needs to run `auth_query`.
pub struct Lookup<'a> {
    /// The `[auth]` section.
    pub config: &'a AuthConfig,
    /// The node table (the query runs on the elected primary).
    pub cluster: &'a Cluster,
    /// `auth.user`'s credentials.
    pub creds: Option<&'a Credentials>,
    /// The largest message accepted from the server.
    pub max_message: usize,
    /// The time the whole lookup may take.
    pub timeout: Duration,
}

impl Lookup<'_> {
    /// The verifier of `user` (`None`: not found), from the cache or the primary.
    pub async fn verifier(&self, cache: &VerifierCache, user: &str) -> Result<Option<String>, LookupError> {
        let ttl = Duration::from_secs_f64(self.config.cache_ttl);
        if let Some(found) = cache.get(user, ttl) {
            return Ok(found);
        }
        let found = tokio::time::timeout(self.timeout, self.run(user))
            .await
            .map_err(|_| LookupError::Backend(BackendError::Timeout))??;
        cache.put(user, found.clone(), ttl);
        Ok(found)
    }

    async fn run(&self, user: &str) -> Result<Option<String>, LookupError> {
        let p = self.cluster.elected().ok_or(LookupError::NoPrimary)?;
        let params = [
            ("user".to_string(), self.config.user.clone()),
            ("database".to_string(), self.config.dbname.clone()),
            ("application_name".to_string(), "dbproxy auth_query".to_string()),
        ];
        let login = backend::connect(
            p,
            self.cluster.target(p),
            &params,
            &self.config.user,
            self.creds,
            self.max_message,
            self.timeout,
        )
        .await;
        let (mut b, _) = login.map_err(|e| match e {
            BackendError::Refused(f) => LookupError::Login {
                user: self.config.user.clone(),
                reason: perror::field(f.body(), b'M').unwrap_or("refused").to_string(),
            },
            BackendError::Auth(reason) => LookupError::Login {
                user: self.config.user.clone(),
                reason,
            },
            other => LookupError::Backend(other),
        })?;
        let conn = &mut b.conn;
        extended::encode_parse("", &self.config.query, &mut conn.wbuf);
        extended::encode_bind_text("", "", &[user], &mut conn.wbuf);
        extended::encode_execute("", &mut conn.wbuf);
        extended::encode_sync(&mut conn.wbuf);
        conn.flush().await.map_err(|e| LookupError::Backend(e.into()))?;
        let mut found = None;
        let mut failed = None;
        loop {
            let f = conn
                .read_frame()
                .await
                .map_err(LookupError::Backend)?
                .ok_or(LookupError::Backend(BackendError::Closed))?;
            match BackendMessage::parse(&f).map_err(|e| LookupError::Backend(e.into()))? {
                BackendMessage::DataRow(row) if found.is_none() => {
                    found = Some(row.text(1).or_else(|| row.text(0)).map(str::to_string));
                }
                BackendMessage::ErrorResponse(e) => {
                    failed = Some(e.message().unwrap_or("error").to_string());
                }
                BackendMessage::ReadyForQuery { .. } => break,
                _ => {}
            }
        }
        // Terminate, so the server logs a clean disconnection.
        write_msg(&mut conn.wbuf, b'X', |_| {});
        let _ = conn.flush().await;
        match failed {
            Some(e) => Err(LookupError::Query(e)),
            None => Ok(found.flatten()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_entries_for_their_ttl() {
        let cache = VerifierCache::default();
        let ttl = Duration::from_secs(60);
        assert_eq!(cache.get("u", ttl), None);
        cache.put("u", Some("md5x".into()), ttl);
        cache.put("ghost", None, ttl);
        assert_eq!(cache.get("u", ttl), Some(Some("md5x".into())));
        assert_eq!(cache.get("ghost", ttl), Some(None), "not found is kept too");
        assert_eq!(cache.get("u", Duration::ZERO), None, "expired");
        cache.put("v", Some("x".into()), Duration::ZERO);
        assert_eq!(cache.get("v", ttl), None, "ttl 0 keeps nothing");
        for i in 0..MAX_ENTRIES + 5 {
            cache.put(&format!("probe{i}"), None, ttl);
        }
        assert!(cache.entries.lock().unwrap().len() <= MAX_ENTRIES, "bounded");
    }

    #[test]
    fn validation_names_the_key() {
        let users = vec![UserConfig {
            name: "authenticator".into(),
            password: Some("x".into()),
            ..UserConfig::default()
        }];
        let ok = AuthConfig {
            user: "authenticator".into(),
            ..AuthConfig::default()
        };
        ok.validate(&users).unwrap();
        AuthConfig::default().validate(&[]).unwrap();
        let err = |c: AuthConfig, u: &[UserConfig]| c.validate(u).unwrap_err().to_string();
        let e = err(ok.clone(), &[]);
        assert!(e.contains("auth.user") && e.contains("[[users]]"), "{e}");
        let e = err(
            ok.clone(),
            &[UserConfig {
                name: "authenticator".into(),
                ..UserConfig::default()
            }],
        );
        assert!(e.contains("auth.user") && e.contains("no password"), "{e}");
        let e = err(
            AuthConfig {
                query: "select 1".into(),
                ..ok.clone()
            },
            &users,
        );
        assert!(e.contains("auth.query"), "{e}");
        let e = err(
            AuthConfig {
                cache_ttl: -1.0,
                ..ok
            },
            &users,
        );
        assert!(e.contains("auth.cache_ttl"), "{e}");
    }
}
