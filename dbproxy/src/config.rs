//! The `dbproxy` configuration: listeners, nodes, users, client authentication rules, health
//! checks, routing and limits. Loaded through `common`'s layered loader; every rule serde cannot
//! express is checked in [`Validate`](common::Validate) with the offending key named.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::ConfigError;
use serde::{Deserialize, Serialize};

/// The `dbproxy` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the PostgreSQL listener binds.
    pub listen: String,
    /// Address the admin HTTP listener (`/metrics`, `/status`) binds.
    pub admin_listen: String,
    /// Token the admin listener's POST endpoints (`/nodes/{id}/attach`, `/nodes/{id}/promote`)
    /// require as `Authorization: Bearer <token>`; empty leaves them open (then keep
    /// `admin_listen` on loopback). Reads (`/metrics`, `/status`, `/healthz`) never need it.
    /// Changing it needs a restart. With `admin_listen` off loopback it is required (dbproxy
    /// refuses to start without it) unless `admin_allow_open` is set.
    pub admin_token: String,
    /// Serve the admin listener off loopback without `admin_token`, on purpose.
    pub admin_allow_open: bool,
    /// The PostgreSQL servers, in pgpool's backend order. A reload (SIGHUP) may append nodes and
    /// change weights at once; changing an existing node's name, host or port, or removing one,
    /// needs a restart.
    pub nodes: Vec<NodeConfig>,
    /// Users clients may log in as, with their credentials.
    pub users: Vec<UserConfig>,
    /// Client authentication rules, first match wins (like pg_hba.conf). Empty means
    /// SCRAM-SHA-256 for every user from anywhere.
    pub hba: Vec<HbaRule>,
    /// Users without a `[[users]]` entry: pass-through to the primary, PgBouncer's
    /// `auth_query`.
    pub auth: crate::auth_query::AuthConfig,
    /// Node health checking (a reload applies it at once).
    pub health: HealthConfig,
    /// Read/write routing.
    pub routing: RoutingConfig,
    /// Size and time limits.
    pub limits: LimitsConfig,
    /// Automatic failover, fencing, rejoining and switchover.
    pub failover: crate::failover::FailoverConfig,
    /// Directory of the durable cluster record (`cluster.json`: the elected primary, its
    /// timeline, the term and the fenced nodes), written before routing changes and read at
    /// start-up; created if missing. One directory per cluster and dbproxy instance. Changing it
    /// needs a restart.
    pub state_dir: String,
    /// TLS for client connections.
    pub tls: TlsConfig,
    /// Several dbproxy instances sharing the cluster record and a leader lease in etcd.
    pub coordination: crate::coordination::CoordinationConfig,
    /// Threads serving client sessions, each with its own event loop; 0 means one per core.
    pub workers: usize,
    /// pgpool-II's PCP operator interface (`pcp_node_info`, `pcp_attach_node`, ...).
    pub pcp: PcpConfig,
    /// Server connection pooling (a reload applies it to later checkouts).
    pub pool: crate::pool::PoolConfig,
}

/// pgpool-II's PCP listener, so operators' `pcp_*` commands and scripts keep working.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PcpConfig {
    /// Address the PCP listener binds (pgpool's `pcp_listen_addresses` and `pcp_port`); empty
    /// turns it off. Changing it needs a restart.
    pub listen: String,
    /// pgpool's `pcp.conf`: `user:md5(password)` lines, the logins PCP accepts (read at start-up).
    pub users_file: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:9999".to_string(),
            admin_listen: "127.0.0.1:9930".to_string(),
            admin_token: String::new(),
            admin_allow_open: false,
            nodes: Vec::new(),
            users: Vec::new(),
            hba: Vec::new(),
            auth: crate::auth_query::AuthConfig::default(),
            health: HealthConfig::default(),
            routing: RoutingConfig::default(),
            limits: LimitsConfig::default(),
            failover: crate::failover::FailoverConfig::default(),
            state_dir: "/var/lib/dbproxy".to_string(),
            tls: TlsConfig::default(),
            coordination: crate::coordination::CoordinationConfig::default(),
            workers: 0,
            pcp: PcpConfig::default(),
            pool: crate::pool::PoolConfig::default(),
        }
    }
}

impl Config {
    /// A config for servers on 127.0.0.1, given as `(name, port)`, with one user `postgres` whose
    /// password (if any) also serves the health checks, which are fast (every 0.2 s, up after one
    /// pass, down after three failed probes): what tests and local set-ups in front of testkit need.
    pub fn loopback<'a>(nodes: impl IntoIterator<Item = (&'a str, u16)>, password: Option<&str>) -> Config {
        Config {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            admin_token: String::new(),
            admin_allow_open: false,
            nodes: nodes
                .into_iter()
                .map(|(name, port)| NodeConfig {
                    name: name.to_string(),
                    host: "127.0.0.1".into(),
                    port,
                    weight: 1,
                    data_dir: String::new(),
                    tls: None,
                })
                .collect(),
            users: vec![UserConfig {
                name: "postgres".into(),
                password: password.map(str::to_string),
                ..UserConfig::default()
            }],
            health: HealthConfig {
                // Quick to notice a dead node (three refused probes 0.2 s apart), yet not flapping
                // on one slow probe on a busy machine (each may take 5 s).
                period: 0.2,
                timeout: 5.0,
                max_retries: 2,
                retry_delay: 0.2,
                rise: 1,
                fall: 1,
                password: password.unwrap_or("").to_string(),
                ..HealthConfig::default()
            },
            limits: LimitsConfig {
                startup_timeout: 2.0,
                ..LimitsConfig::default()
            },
            state_dir: fresh_state_dir(),
            ..Config::default()
        }
    }
}

/// A directory under the system's temporary directory no other [`Config::loopback`] of any
/// process uses, so proxies started side by side never share a cluster record.
fn fresh_state_dir() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir()
        .join(format!("dbproxy-state-{}-{n}-{nanos}", std::process::id()))
        .display()
        .to_string()
}

/// TLS for client connections (the answer to a client's SSLRequest) and for dbproxy's own
/// connections to the PostgreSQL servers (`backend*`; changing those needs a restart).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate (and its chain); TLS is off while empty.
    pub cert_file: String,
    /// PEM file with the certificate's private key.
    pub key_file: String,
    /// Refuse clients that do not use TLS (as `hostssl`-only pg_hba.conf rules do).
    pub require: bool,
    /// TLS on every connection dbproxy opens to a server (sessions, pool, health checks,
    /// failover steps), as libpq's `sslmode`; a node's own `tls` overrides it.
    pub backend: BackendTlsMode,
    /// PEM file with the certificates of the authorities that sign the servers' certificates;
    /// needed by `verify-full`.
    pub backend_ca_file: String,
    /// Answer a server's request for a clear-text password (pg_hba.conf method `password`)
    /// on a connection that is not encrypted; refused otherwise, so the password never crosses
    /// the network in the clear.
    pub backend_allow_cleartext_password: bool,
}

/// How a connection to a PostgreSQL server uses TLS (libpq's `sslmode` values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Clear text.
    Disable,
    /// TLS when the server offers it (no certificate check), clear text otherwise.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked (it protects against eavesdropping,
    /// not against an active man in the middle).
    Require,
    /// TLS with the certificate checked against `tls.backend_ca_file` and the node's host name
    /// (or address).
    VerifyFull,
}

/// One PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// A name for logs and metrics (defaults to `nodeN`).
    pub name: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Load-balancing weight among standbys; 0 means never balanced to.
    pub weight: u32,
    /// The server's data directory on its host (pgpool's `backend_data_directoryN`), for the
    /// `%D`/`%R`/`{data_dir}` placeholders of failover, follow and rejoin commands.
    pub data_dir: String,
    /// TLS to this node when it differs from `tls.backend`.
    pub tls: Option<BackendTlsMode>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: String::new(),
            host: "127.0.0.1".to_string(),
            port: 5432,
            weight: 1,
            data_dir: String::new(),
            tls: None,
        }
    }
}

/// A user and where its password comes from. At most one source may be set; a user with none
/// can only log in where an hba rule says `trust`, and only if the backends trust it too.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// The role name.
    pub name: String,
    /// The password in clear text.
    pub password: Option<String>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<String>,
    /// A stored secret: `SCRAM-SHA-256$...` (as in pg_authid) or `md5...`; lets clients log in
    /// without the proxy knowing the password (an md5 secret also serves md5 backend logins).
    pub secret: Option<String>,
}

/// A client authentication method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (the default).
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 password challenge.
    #[serde(rename = "md5")]
    Md5,
    /// No password.
    #[serde(rename = "trust")]
    Trust,
    /// Refuse the connection.
    #[serde(rename = "reject")]
    Reject,
}

/// One client authentication rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HbaRule {
    /// The user it applies to, or `all`.
    pub user: String,
    /// The database it applies to, or `all`.
    pub database: String,
    /// The client network in CIDR notation (`10.0.0.0/8`, `::1/128`), or `all`.
    pub network: String,
    /// What to do with a matching connection.
    pub method: AuthMethod,
}

impl Default for HbaRule {
    fn default() -> Self {
        HbaRule {
            user: "all".to_string(),
            database: "all".to_string(),
            network: "all".to_string(),
            method: AuthMethod::ScramSha256,
        }
    }
}

/// How node health is checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between checks. A connection to a node that fails on the data path triggers a
    /// check at once.
    pub period: f64,
    /// Seconds one probe may take (connect plus query); a node that accepts the connection but
    /// never answers (a stopped postmaster) fails by this timeout.
    pub timeout: f64,
    /// Probes retried after a failed one within a check: a check fails only when its first probe
    /// and all `max_retries` retries fail, so one blip never takes a node down.
    pub max_retries: u32,
    /// Seconds between those probes.
    pub retry_delay: f64,
    /// Consecutive passing checks that bring a node up.
    pub rise: u32,
    /// Consecutive failing checks that take a node down (and trigger failover for the primary).
    pub fall: u32,
    /// Role the checker logs in as.
    pub user: String,
    /// Its password (empty when the nodes trust it).
    pub password: String,
    /// Database the checker connects to.
    pub database: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            period: 1.0,
            timeout: 2.0,
            max_retries: 2,
            retry_delay: 0.25,
            rise: 2,
            fall: 1,
            user: "postgres".to_string(),
            password: String::new(),
            database: "postgres".to_string(),
        }
    }
}

/// When reads stop being balanced after a write (pgpool's `disable_load_balance_on_write`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteStickiness {
    /// An explicit transaction's reads run on a standby until its first statement that may
    /// write; from then on the transaction runs on the primary (opened there with the same
    /// BEGIN). Reads outside transactions are balanced.
    Transaction,
    /// Like `transaction`, and once a transaction has written, every later explicit
    /// transaction of the session runs wholly on the primary (reads outside transactions stay
    /// balanced).
    TransTransaction,
    /// After a session's first write, everything of that session goes to the primary.
    Always,
    /// Like `transaction` (pgpool keeps balancing a transaction's reads after its first write,
    /// where they cannot see that write; dbproxy sends them to the primary).
    Off,
    /// pgpool's per-table tracking: not implemented; refused with a pointer to `transaction`.
    DmlAdaptive,
}

/// Read/write routing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Send sure reads to standbys (pgpool's `load_balance_mode`).
    pub load_balance: bool,
    /// What a write does to later reads of the session (pgpool's modes): `transaction` (a
    /// transaction's reads run on a standby until its first statement that may write, the rest
    /// on the primary), `trans_transaction` (also: once a transaction wrote, later transactions
    /// run on the primary), `always` (after any write, everything on the primary), `off` (as
    /// `transaction`); `dml_adaptive` is refused.
    pub disable_load_balance_on_write: WriteStickiness,
    /// A standby further behind the primary than this many bytes of WAL gets no reads (0 = no limit).
    pub max_replica_lag_bytes: u64,
    /// A standby whose last replayed transaction is older than this many milliseconds while it
    /// still has WAL to replay gets no reads (0 = no limit).
    pub max_replica_lag_ms: u64,
    /// When no standby qualifies, run reads on the primary instead of failing.
    pub fallback_to_primary: bool,
    /// Milliseconds after a session's write during which its reads go to the primary (0 = off).
    pub read_your_writes: u64,
    /// Causal reads: a session's read goes only to a standby that has replayed the WAL position
    /// of the session's last write (its commit) and of what it read before (monotonic reads:
    /// it never sees older data than it already saw), else to the primary. The position is
    /// learnt by one extra statement pipelined behind each write (inside a transaction block,
    /// behind what ends it; and behind a read that could have gone to a standby but ran on the
    /// primary), whose answer the next read waits for.
    /// Standbys' positions come from the health checks and, when a session needs a newer one,
    /// from the standby itself (one poll at a time per standby, shared by the sessions). On by
    /// default. A commit made with `synchronous_commit = off` reaches the standbys only once the
    /// WAL writer writes it (up to `wal_writer_delay` later), so the reads after it run on the
    /// primary until then.
    pub read_your_writes_by_lsn: bool,
    /// With `read_your_writes_by_lsn`: milliseconds a read waits for a standby to replay the
    /// session's position before it goes to the primary instead (0: never waits).
    pub causal_wait_ms: u64,
    /// Functions known not to write, so statements calling them may go to a standby.
    pub read_only_functions: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            load_balance: true,
            disable_load_balance_on_write: WriteStickiness::Transaction,
            max_replica_lag_bytes: 0,
            max_replica_lag_ms: 0,
            fallback_to_primary: true,
            read_your_writes: 0,
            read_your_writes_by_lsn: true,
            causal_wait_ms: 20,
            read_only_functions: Vec::new(),
        }
    }
}

/// Size and time limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest message accepted from a client or a backend, in bytes.
    pub max_message_size: usize,
    /// Seconds a client has to finish startup and authentication (a pass-through exchange with
    /// the primary and an `auth_query` lookup included).
    pub startup_timeout: f64,
    /// Seconds to connect to and log into a backend.
    pub connect_timeout: f64,
    /// Client connections served at once; more are refused with 53300.
    pub max_connections: usize,
    /// Seconds an idle client (outside a transaction) may stay silent (0 = forever).
    pub client_idle_timeout: f64,
    /// Seconds a write to a client may make no progress (the client stopped reading, its socket
    /// buffer is full) before the session ends and frees its server connections (0 = forever).
    pub client_write_timeout: f64,
    /// Named prepared statements one session may keep (dbproxy stores each one's Parse to
    /// prepare it lazily on any server); a Parse of one more ends the session with 53400
    /// (configuration_limit_exceeded). 0 = no limit.
    pub max_prepared_statements: usize,
    /// Bytes that client messages larger than 1 MiB may hold at once, over all sessions: each
    /// is charged twice its size (it is read whole, then copied towards the server) until the
    /// session has sent it on. A message that would take the total past this ends its session
    /// with 53200 (out of memory). 0 = no limit; otherwise at least twice `max_message_size`.
    pub max_message_memory: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 64 * 1024 * 1024,
            startup_timeout: 10.0,
            connect_timeout: 5.0,
            max_connections: 1000,
            client_idle_timeout: 0.0,
            client_write_timeout: 60.0,
            max_prepared_statements: 10_000,
            max_message_memory: 1 << 30,
        }
    }
}

/// Seconds as a [`Duration`] (the value was validated finite and non-negative).
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
}

/// An IP network parsed from CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `all`, an address, or `address/prefix`.
    pub fn parse(s: &str) -> Option<Network> {
        if s == "all" {
            return Some(Network {
                addr: IpAddr::from([0u8; 16]),
                prefix: 0,
            });
        }
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max)?,
            None => max,
        };
        Some(Network { addr, prefix })
    }

    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.prefix == 0 {
            return true;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX << (32 - self.prefix as u32);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX << (128 - self.prefix as u32);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

pub(crate) fn check_secs(key: &str, v: f64, positive: bool) -> Result<(), ConfigError> {
    if !v.is_finite() || v < 0.0 || (positive && v == 0.0) || v > 86400.0 {
        return Err(ConfigError::invalid(
            key,
            format!(
                "`{v}` is not a number of seconds between 0 and 86400{}",
                if positive { " (exclusive)" } else { "" }
            ),
        ));
    }
    Ok(())
}

impl common::Validate for Config {
    fn validate(mut self) -> Result<Self, ConfigError> {
        if self.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "listen",
                format!("`{}` is not an address:port", self.listen),
            ));
        }
        if self.admin_listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "admin_listen",
                format!("`{}` is not an address:port", self.admin_listen),
            ));
        }
        common::admin::check_exposure(&self.admin_listen, &self.admin_token, self.admin_allow_open)
            .map_err(|e| ConfigError::invalid("admin_listen", e))?;
        if self.routing.disable_load_balance_on_write == WriteStickiness::DmlAdaptive {
            return Err(ConfigError::invalid(
                "routing.disable_load_balance_on_write",
                "dml_adaptive is not implemented by dbproxy: use `transaction` (stricter: every \
                 read of a transaction after its first write goes to the primary, whatever table \
                 it reads)",
            ));
        }
        if self.nodes.is_empty() {
            return Err(ConfigError::invalid("nodes", "at least one node is required"));
        }
        if !self.pcp.listen.is_empty() {
            if self.pcp.listen.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    "pcp.listen",
                    format!("`{}` is not an address:port", self.pcp.listen),
                ));
            }
            if self.pcp.users_file.is_empty() {
                return Err(ConfigError::invalid(
                    "pcp.users_file",
                    "the PCP listener needs a pcp.conf with its logins",
                ));
            }
        }
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if n.name.is_empty() {
                n.name = format!("node{i}");
            }
            if n.host.is_empty() {
                return Err(ConfigError::invalid(
                    format!("nodes.{i}.host"),
                    "must not be empty",
                ));
            }
            if n.port == 0 {
                return Err(ConfigError::invalid(format!("nodes.{i}.port"), "must not be 0"));
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("users.{i}.name"),
                    "must not be empty",
                ));
            }
            let sources = [&u.password, &u.password_env, &u.password_file, &u.secret]
                .iter()
                .filter(|s| s.is_some())
                .count();
            if sources > 1 {
                return Err(ConfigError::invalid(
                    format!("users.{i}"),
                    "set only one of password, password_env, password_file, secret",
                ));
            }
            if let Some(s) = &u.secret {
                if crate::auth::ScramSecret::parse(s).is_none() && !crate::auth::is_md5_secret(s) {
                    return Err(ConfigError::invalid(
                        format!("users.{i}.secret"),
                        "is neither a SCRAM-SHA-256$... nor an md5... secret",
                    ));
                }
            }
        }
        for (i, r) in self.hba.iter().enumerate() {
            if Network::parse(&r.network).is_none() {
                return Err(ConfigError::invalid(
                    format!("hba.{i}.network"),
                    format!("`{}` is not `all` or an address/prefix", r.network),
                ));
            }
        }
        let h = &self.health;
        check_secs("health.period", h.period, true)?;
        check_secs("health.timeout", h.timeout, true)?;
        check_secs("health.retry_delay", h.retry_delay, false)?;
        if h.rise == 0 {
            return Err(ConfigError::invalid("health.rise", "must be at least 1"));
        }
        if h.fall == 0 {
            return Err(ConfigError::invalid("health.fall", "must be at least 1"));
        }
        self.failover.validate(&self.nodes)?;
        self.coordination.validate()?;
        self.pool.validate()?;
        self.auth.validate(&self.users)?;
        if self.state_dir.trim().is_empty() {
            return Err(ConfigError::invalid("state_dir", "must name a directory"));
        }
        let t = &self.tls;
        if t.cert_file.is_empty() != t.key_file.is_empty() {
            return Err(ConfigError::invalid(
                "tls",
                "set both cert_file and key_file, or neither",
            ));
        }
        if t.require && t.cert_file.is_empty() {
            return Err(ConfigError::invalid(
                "tls.require",
                "needs tls.cert_file and tls.key_file",
            ));
        }
        let verify_full = std::iter::once(t.backend)
            .chain(self.nodes.iter().filter_map(|n| n.tls))
            .any(|m| m == BackendTlsMode::VerifyFull);
        if verify_full && t.backend_ca_file.is_empty() {
            return Err(ConfigError::invalid(
                "tls.backend_ca_file",
                "verify-full needs the certificate authority that signs the servers' certificates",
            ));
        }
        if !t.backend_ca_file.is_empty() {
            crate::backend_tls::BackendTls::new(t)
                .map_err(|e| ConfigError::invalid("tls.backend_ca_file", e.to_string()))?;
        }
        let l = &self.limits;
        if l.max_message_size < 1024 || l.max_message_size > 1 << 30 {
            return Err(ConfigError::invalid(
                "limits.max_message_size",
                "must be between 1024 and 1073741824 bytes",
            ));
        }
        if l.max_message_memory != 0 && l.max_message_memory < 2 * l.max_message_size {
            return Err(ConfigError::invalid(
                "limits.max_message_memory",
                "must be 0 (no limit) or at least twice limits.max_message_size",
            ));
        }
        check_secs("limits.startup_timeout", l.startup_timeout, true)?;
        check_secs("limits.connect_timeout", l.connect_timeout, true)?;
        check_secs("limits.client_idle_timeout", l.client_idle_timeout, false)?;
        check_secs("limits.client_write_timeout", l.client_write_timeout, false)?;
        if l.max_connections == 0 {
            return Err(ConfigError::invalid(
                "limits.max_connections",
                "must be at least 1",
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::Validate;

    fn base() -> Config {
        Config {
            nodes: vec![NodeConfig::default()],
            ..Config::default()
        }
    }

    #[test]
    fn defaults_validate_and_name_nodes() {
        let c = base().validate().unwrap();
        assert_eq!(c.nodes[0].name, "node0");
        assert_eq!(c.listen, "0.0.0.0:9999");
        assert_eq!(c.admin_listen, "127.0.0.1:9930");
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = base();
        c.health.period = 0.0;
        assert!(c.validate().unwrap_err().to_string().contains("health.period"));
        let mut c = base();
        c.hba.push(HbaRule {
            network: "10.0.0.0/33".into(),
            ..HbaRule::default()
        });
        assert!(c.validate().unwrap_err().to_string().contains("hba.0.network"));
        let mut c = base();
        c.users.push(UserConfig {
            name: "a".into(),
            password: Some("x".into()),
            password_env: Some("X".into()),
            ..UserConfig::default()
        });
        assert!(c.validate().unwrap_err().to_string().contains("users.0"));
        let mut c = base();
        c.limits.max_message_memory = c.limits.max_message_size;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.max_message_memory"), "{e}");
        let mut c = base();
        c.limits.max_message_memory = 0;
        assert!(c.validate().is_ok(), "0: no limit");
        assert!(Config::default()
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nodes"));
    }

    #[test]
    fn verify_full_needs_a_readable_ca_file() {
        let mut c = base();
        c.nodes[0].tls = Some(BackendTlsMode::VerifyFull);
        let e = c.clone().validate().unwrap_err().to_string();
        assert!(
            e.contains("tls.backend_ca_file") && e.contains("verify-full"),
            "{e}"
        );
        c.tls.backend_ca_file = "/nonexistent/ca.pem".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("tls.backend_ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn toml_with_every_section() {
        let text = r#"
            listen = "127.0.0.1:6000"
            [[nodes]]
            host = "db1"
            port = 5433
            weight = 0
            [[users]]
            name = "app"
            password_env = "APP_PW"
            [[hba]]
            user = "app"
            network = "10.0.0.0/8"
            method = "md5"
            [routing]
            disable_load_balance_on_write = "always"
            [limits]
            startup_timeout = 0.5
        "#;
        let c: Config = toml::from_str(text).unwrap();
        let c = c.validate().unwrap();
        assert_eq!(c.hba[0].method, AuthMethod::Md5);
        assert_eq!(c.routing.disable_load_balance_on_write, WriteStickiness::Always);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let modes = text.replace("\"always\"", "\"trans_transaction\"");
        let c: Config = toml::from_str(&modes).unwrap();
        assert_eq!(
            c.validate().unwrap().routing.disable_load_balance_on_write,
            WriteStickiness::TransTransaction
        );
        let adaptive = text.replace("\"always\"", "\"dml_adaptive\"");
        let c: Config = toml::from_str(&adaptive).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("routing.disable_load_balance_on_write") && e.contains("not implemented"),
            "{e}"
        );
        let bogus = text.replace("\"always\"", "\"sometimes\"");
        assert!(toml::from_str::<Config>(&bogus).is_err());
    }

    #[test]
    fn networks() {
        let n = Network::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Network::parse("all").unwrap().contains("::1".parse().unwrap()));
        assert!(Network::parse("::1/128")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(Network::parse("127.0.0.1")
            .unwrap()
            .contains("127.0.0.1".parse().unwrap()));
        assert!(Network::parse("x/8").is_none());
    }
}
