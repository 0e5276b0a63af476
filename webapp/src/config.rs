//! The webapp's configuration: listener, instance name, database, timeouts and the status URLs the
//! dashboard reads.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `webapp` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the main listener binds.
    pub listen: String,
    /// Name shown as "served by" on every page; empty means the machine's hostname.
    pub instance: String,
    /// The database, as a URL or libpq `key=value` string; in production it points at dbproxy.
    pub database_url: String,
    /// Most pooled database connections.
    pub pool_size: usize,
    /// Bound on each database query (and on connecting), in milliseconds.
    pub query_timeout_ms: u64,
    /// How many recent samples of each host the page shows.
    pub history: u32,
    /// lb's `/status` URL, read by the dashboard; empty hides lb from it.
    pub lb_status_url: String,
    /// dbproxy's `/status` URL, read by the dashboard; empty hides dbproxy from it. With several
    /// dbproxy instances coordinated through etcd, list every one's, separated by commas: the
    /// dashboard shows each, which one holds the leader lease and what each knows of etcd.
    pub dbproxy_status_url: String,
    /// dbproxy's admin base URL; when set, the dashboard shows a switchover button that POSTs to
    /// `{dbproxy_admin_url}/nodes/{id}/promote`. With several dbproxy instances coordinated
    /// through etcd, list every one's, separated by commas: only the holder of the leader lease
    /// accepts a switchover, so the dashboard reads each one's `{url}/status` and sends it to the
    /// one that leads (and, when a follower answers 409 naming another leader, to that one).
    pub dbproxy_admin_url: String,
    /// The token dbproxy's admin listener requires for the switchover (its `admin_token`), sent
    /// as `Authorization: Bearer <token>`; empty sends none. With several instances every one
    /// gets the same token.
    pub dbproxy_admin_token: String,
    /// The operator password: the dashboard's switchover needs a login with it (a session cookie
    /// and a CSRF token). Empty (the default) makes the dashboard read-only: no switchover button,
    /// and the switchover endpoint answers 404. At least 8 bytes when set; every instance behind
    /// one lb should have the same one, so a login made on one is valid on all.
    pub operator_password: String,
    /// Marks the operator session cookie `Secure` (sent over https only): set it when browsers
    /// reach the dashboard through https.
    pub operator_cookie_secure: bool,
    /// How often the dashboard re-reads the status URLs while someone watches, in milliseconds.
    pub dashboard_interval_ms: u64,
    /// Bound on each status fetch, in milliseconds.
    pub status_timeout_ms: u64,
    /// Bound on reading a request's head from a client, in milliseconds.
    pub header_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8000".to_string(),
            instance: String::new(),
            database_url: "postgresql://app@127.0.0.1:9999/app".to_string(),
            pool_size: 8,
            query_timeout_ms: 3000,
            history: 10,
            lb_status_url: "http://127.0.0.1:9100/status".to_string(),
            dbproxy_status_url: "http://127.0.0.1:9930/status".to_string(),
            dbproxy_admin_url: String::new(),
            dbproxy_admin_token: String::new(),
            operator_password: String::new(),
            operator_cookie_secure: false,
            dashboard_interval_ms: 1000,
            status_timeout_ms: 1000,
            header_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// The query timeout as a duration.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }

    /// The dbproxy instances' `/status` URLs (`dbproxy_status_url`, split at commas).
    pub fn dbproxy_status_urls(&self) -> Vec<&str> {
        self.dbproxy_status_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The dbproxy instances' admin base URLs (`dbproxy_admin_url`, split at commas, without a
    /// trailing slash).
    pub fn dbproxy_admin_urls(&self) -> Vec<&str> {
        self.dbproxy_admin_url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/'))
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The instance name: the configured one, or the hostname, or `webapp` when neither is known.
    pub fn instance_name(&self) -> String {
        if !self.instance.is_empty() {
            return self.instance.clone();
        }
        // /proc is always there on Linux; HOSTNAME covers shells that export it elsewhere.
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "webapp".to_string())
    }

    /// The parsed database settings.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, common::ConfigError> {
        tokio_postgres::Config::from_str(&self.database_url)
            .map_err(|e| common::ConfigError::invalid("database_url", format!("cannot parse it: {e}")))
    }
}

/// Checks that `url` is an `http://host:port/...` URL (the status fetcher speaks plain HTTP only).
fn check_http_url(key: &str, url: &str) -> Result<(), common::ConfigError> {
    if url.is_empty() {
        return Ok(());
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| common::ConfigError::invalid(key, format!("`{url}` is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(common::ConfigError::invalid(
            key,
            format!("`{url}` must be an http:// URL with a host"),
        ));
    }
    Ok(())
}

impl common::Validate for Config {
    fn validate(self) -> Result<Self, common::ConfigError> {
        use common::ConfigError;
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "listen",
                format!("`{}` is not an address:port", self.listen),
            ));
        }
        if self.instance.len() > 200 {
            return Err(ConfigError::invalid("instance", "longer than 200 bytes"));
        }
        self.pg_config()?;
        if self.pool_size == 0 || self.pool_size > 1000 {
            return Err(ConfigError::invalid("pool_size", "must be between 1 and 1000"));
        }
        if self.query_timeout_ms == 0 || self.query_timeout_ms > 600_000 {
            return Err(ConfigError::invalid(
                "query_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        if self.history == 0 || self.history > 1000 {
            return Err(ConfigError::invalid("history", "must be between 1 and 1000"));
        }
        if self.dashboard_interval_ms < 50 || self.dashboard_interval_ms > 3_600_000 {
            return Err(ConfigError::invalid(
                "dashboard_interval_ms",
                "must be between 50 and 3600000",
            ));
        }
        if self.status_timeout_ms == 0 || self.status_timeout_ms > 600_000 {
            return Err(ConfigError::invalid(
                "status_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        if self.header_timeout_ms == 0 || self.header_timeout_ms > 600_000 {
            return Err(ConfigError::invalid(
                "header_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        if !self.operator_password.is_empty() && self.operator_password.len() < 8 {
            return Err(ConfigError::invalid(
                "operator_password",
                "shorter than 8 bytes: choose a longer one, or leave it empty for a read-only dashboard",
            ));
        }
        check_http_url("lb_status_url", &self.lb_status_url)?;
        if self.dbproxy_status_url.split(',').any(|u| u.trim().is_empty())
            && !self.dbproxy_status_url.is_empty()
        {
            return Err(ConfigError::invalid(
                "dbproxy_status_url",
                "an empty entry in the comma-separated list",
            ));
        }
        for url in self.dbproxy_status_urls() {
            check_http_url("dbproxy_status_url", url)?;
        }
        if self.dbproxy_admin_url.split(',').any(|u| u.trim().is_empty())
            && !self.dbproxy_admin_url.is_empty()
        {
            return Err(ConfigError::invalid(
                "dbproxy_admin_url",
                "an empty entry in the comma-separated list",
            ));
        }
        for url in self.dbproxy_admin_urls() {
            check_http_url("dbproxy_admin_url", url)?;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::Validate;

    fn invalid(c: Config) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::default().validate().unwrap();
        assert_eq!(c.listen, "0.0.0.0:8000");
        assert!(!c.instance_name().is_empty());
    }

    #[test]
    fn several_dbproxy_status_urls_are_each_checked() {
        let c = Config {
            dbproxy_status_url: "http://a:9930/status, http://b:9930/status".into(),
            ..Config::default()
        }
        .validate()
        .unwrap();
        assert_eq!(
            c.dbproxy_status_urls(),
            ["http://a:9930/status", "http://b:9930/status"]
        );
        for bad in [
            "http://a/status,ftp://b/status",
            "http://a/status,,http://b/status",
            "http://a/status,",
        ] {
            let e = invalid(Config {
                dbproxy_status_url: bad.into(),
                ..Config::default()
            });
            assert!(e.contains("dbproxy_status_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn several_dbproxy_admin_urls_are_each_checked() {
        let c = Config {
            dbproxy_admin_url: "http://a:9930/, http://b:9930".into(),
            ..Config::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.dbproxy_admin_urls(), ["http://a:9930", "http://b:9930"]);
        for bad in ["http://a,https://b", "http://a,,http://b", ",http://a"] {
            let e = invalid(Config {
                dbproxy_admin_url: bad.into(),
                ..Config::default()
            });
            assert!(e.contains("dbproxy_admin_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = invalid(Config {
            listen: "nope".into(),
            ..Config::default()
        });
        assert!(e.contains("listen"), "{e}");
        let e = invalid(Config {
            database_url: "postgresql://a@b:notaport/x".into(),
            ..Config::default()
        });
        assert!(e.contains("database_url"), "{e}");
        let e = invalid(Config {
            pool_size: 0,
            ..Config::default()
        });
        assert!(e.contains("pool_size"), "{e}");
        let e = invalid(Config {
            query_timeout_ms: 0,
            ..Config::default()
        });
        assert!(e.contains("query_timeout_ms"), "{e}");
        let e = invalid(Config {
            lb_status_url: "https://x/status".into(),
            ..Config::default()
        });
        assert!(e.contains("lb_status_url"), "{e}");
        let e = invalid(Config {
            dbproxy_admin_url: "not a url".into(),
            ..Config::default()
        });
        assert!(e.contains("dbproxy_admin_url"), "{e}");
        let e = invalid(Config {
            history: 5000,
            ..Config::default()
        });
        assert!(e.contains("history"), "{e}");
        let e = invalid(Config {
            operator_password: "short".into(),
            ..Config::default()
        });
        assert!(e.contains("operator_password"), "{e}");
    }

    #[test]
    fn instance_name_prefers_the_configured_one() {
        let c = Config {
            instance: "web-a".into(),
            ..Config::default()
        };
        assert_eq!(c.instance_name(), "web-a");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = serde_json::from_str::<Config>(r#"{"lisen": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }
}
