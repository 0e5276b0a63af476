//! The `lb` configuration: TOML structs with defaults, durations in nginx notation, and validation
//! that names the offending key.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use common::ConfigError;

/// The most servers one upstream may hold; a request remembers the servers it tried in a `u64` bitset.
pub const MAX_SERVERS: usize = 64;

/// The `lb` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listener binds.
    pub listen: String,
    /// Address the admin listener (`/metrics`, `/status`, `/healthz`) binds; loopback by default.
    /// Off loopback it needs `admin_token` (or `admin_allow_open`), else lb refuses to start.
    pub admin_listen: String,
    /// Token the admin listener requires as `Authorization: Bearer <token>` on every request but
    /// reads (GET, HEAD), as dbproxy's `admin_token`; empty means none. Changing it needs a restart.
    pub admin_token: String,
    /// Serve the admin listener off loopback without `admin_token`, on purpose.
    pub admin_allow_open: bool,
    /// The servers requests are balanced over.
    pub upstream: UpstreamConfig,
    /// Client- and upstream-side timeouts.
    pub timeouts: Timeouts,
    /// Size and count limits.
    pub limits: Limits,
    /// Active health checking.
    pub health: HealthConfig,
    /// Retrying on the next server, like nginx's `proxy_next_upstream`.
    pub retry: RetryConfig,
    /// Request headers sent upstream.
    pub headers: HeadersConfig,
    /// The access log (tracing target `lb::access`).
    pub access_log: AccessLogConfig,
    /// Threads serving client connections, each with its own event loop and upstream
    /// keep-alive pool (like nginx's `worker_processes`); 0 means one per core.
    pub workers: usize,
    /// More upstream groups, named by `vhosts.locations.proxy_pass` (the main `upstream` is one
    /// too, by its `name`).
    pub upstreams: Vec<UpstreamConfig>,
    /// Virtual servers (nginx `server` blocks) chosen by listen address and Host; empty sends
    /// every request to `upstream`.
    pub vhosts: Vec<VhostConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".to_string(),
            admin_listen: "127.0.0.1:9100".to_string(),
            admin_token: String::new(),
            admin_allow_open: false,
            upstream: UpstreamConfig::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            health: HealthConfig::default(),
            retry: RetryConfig::default(),
            headers: HeadersConfig::default(),
            access_log: AccessLogConfig::default(),
            workers: 0,
            upstreams: Vec::new(),
            vhosts: Vec::new(),
        }
    }
}

impl Config {
    /// Every address to listen on: `listen`, then the virtual servers' own, without repeats.
    pub fn listen_addrs(&self) -> Vec<String> {
        let mut out = vec![self.listen.clone()];
        let tls = self
            .vhosts
            .iter()
            .filter_map(|v| v.tls.as_ref())
            .flat_map(|t| &t.listen);
        for a in self.vhosts.iter().flat_map(|v| &v.listen).chain(tls) {
            let same =
                |b: &String| b == a || (b.parse::<SocketAddr>().ok()).is_some_and(|b| a.parse() == Ok(b));
            if !out.iter().any(same) {
                out.push(a.clone());
            }
        }
        out
    }
}

/// One upstream group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name shown in metrics and `/status` (the nginx `upstream NAME`).
    pub name: String,
    /// How a server is picked.
    pub algorithm: Algorithm,
    /// The key of the `hash` algorithm in nginx notation: `$request_uri`, `$uri`, `$remote_addr`,
    /// `$http_NAME` (a header) or `$cookie_NAME`; several may be concatenated with literal text.
    pub hash_key: String,
    /// The servers, in order (order matters to `ip_hash`, as in nginx).
    pub servers: Vec<ServerConfig>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: "backend".to_string(),
            algorithm: Algorithm::RoundRobin,
            hash_key: "$request_uri".to_string(),
            servers: Vec::new(),
        }
    }
}

/// A balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// nginx's smooth weighted round robin.
    RoundRobin,
    /// nginx's `ip_hash`: the first three octets of an IPv4 client, the whole IPv6 address.
    IpHash,
    /// Fewest active requests relative to weight; ties broken by weighted round robin.
    LeastConn,
    /// nginx's `hash KEY consistent` (ketama points on CRC32, 160 per unit of weight).
    Hash,
}

/// One upstream server, with nginx's `server` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `host:port` (port 80 when omitted); a host name is resolved at start and on reload.
    pub addr: String,
    /// Relative weight (nginx `weight=`).
    pub weight: u32,
    /// Failures within `fail_timeout` that disable the server for `fail_timeout`; 0 disables the
    /// passive check (nginx `max_fails=`).
    pub max_fails: u32,
    /// Window for counting failures and time a disabled server rests (nginx `fail_timeout=`).
    pub fail_timeout: Dur,
    /// Used only while every primary server is unavailable (nginx `backup`).
    pub backup: bool,
    /// Never used (nginx `down`).
    pub down: bool,
    /// After a recovery the weight ramps from 1 to `weight` over this time; 0 turns it off.
    pub slow_start: Dur,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: String::new(),
            weight: 1,
            max_fails: 1,
            fail_timeout: Dur(Duration::from_secs(10)),
            backup: false,
            down: false,
            slow_start: Dur(Duration::ZERO),
        }
    }
}

/// Timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time a client has to send a complete request head (against slowloris).
    pub header_read: Dur,
    /// A client connection with no request in flight for this long is closed.
    pub client_idle: Dur,
    /// Connecting to an upstream server.
    pub upstream_connect: Dur,
    /// From sending a request upstream to receiving the response head (504 past it).
    pub upstream_response: Dur,
    /// How long shutdown waits for in-flight requests and websockets before closing them.
    pub shutdown_grace: Dur,
    /// Idle upstream keep-alive connections are closed after this.
    pub upstream_idle: Dur,
    /// An upgraded (websocket) connection with no bytes either way for this long is closed.
    pub upgraded_idle: Dur,
    /// A write to a client that makes no progress for this long (the client stopped reading)
    /// closes the connection and frees the upstream response (nginx `send_timeout`); 0: never.
    pub client_send: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Dur(Duration::from_secs(10)),
            client_idle: Dur(Duration::from_secs(65)),
            upstream_connect: Dur(Duration::from_secs(5)),
            upstream_response: Dur(Duration::from_secs(60)),
            shutdown_grace: Dur(Duration::from_secs(10)),
            upstream_idle: Dur(Duration::from_secs(60)),
            upgraded_idle: Dur(Duration::from_secs(3600)),
            client_send: Dur(Duration::from_secs(60)),
        }
    }
}

/// Limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request head in bytes (431 past it); at least 8192 (hyper's smallest buffer).
    pub max_header_bytes: usize,
    /// Largest request body in bytes (413 past it); 0 means unlimited.
    pub max_body_bytes: u64,
    /// Most client connections open at once; further connections wait in the accept queue.
    pub max_connections: usize,
    /// Idle keep-alive connections kept per upstream server.
    pub upstream_keepalive: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 0,
            max_connections: 10_000,
            upstream_keepalive: 64,
        }
    }
}

/// Active HTTP health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Whether probes run at all (nginx's open-source build has none, so off for `--nginx-conf`).
    pub enabled: bool,
    /// Path requested with GET.
    pub path: String,
    /// Time between probes of one server.
    pub interval: Dur,
    /// Time one probe may take.
    pub timeout: Dur,
    /// Status a healthy server answers with.
    pub expected_status: u16,
    /// Consecutive passes that bring a server up.
    pub rise: u32,
    /// Consecutive failures that take a server down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: false,
            path: "/".to_string(),
            interval: Dur(Duration::from_secs(2)),
            timeout: Dur(Duration::from_secs(1)),
            expected_status: 200,
            rise: 2,
            fall: 3,
        }
    }
}

/// Retrying on the next server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Most servers one request is sent to (nginx `proxy_next_upstream_tries`); 0 means every server.
    pub tries: u32,
    /// Total time for all tries (nginx `proxy_next_upstream_timeout`); 0 means unbounded.
    pub timeout: Dur,
    /// Also retry idempotent requests answered with 502, 503 or 504.
    pub on_status: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            tries: 0,
            timeout: Dur(Duration::ZERO),
            on_status: false,
        }
    }
}

/// Headers sent upstream.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadersConfig {
    /// Replaces the client's Host header when set; empty keeps Host as sent.
    pub host: String,
}

/// The access log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Whether every request is logged.
    pub enabled: bool,
    /// Line format.
    pub format: AccessLogFormat,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            format: AccessLogFormat::Combined,
        }
    }
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// nginx's `combined` format as the message.
    Combined,
    /// Structured fields (rendered as JSON with `--log-format json`).
    Json,
}

/// A virtual server (nginx `server { ... }`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VhostConfig {
    /// Addresses it answers on (nginx `listen`); empty means the main `listen`. Every address
    /// named here is listened on.
    pub listen: Vec<String>,
    /// Host names (nginx `server_name`): exact, `*.example.com`, `.example.com`, `mail.*`, or a
    /// regular expression after `~`.
    pub names: Vec<String>,
    /// Chosen for a Host no server names on its address (nginx `default_server`); otherwise the
    /// first server on the address is.
    pub default_server: bool,
    /// Rewrites run before a location is chosen (nginx `rewrite` in `server`).
    pub rewrites: Vec<RewriteConfig>,
    /// Answer every request with this instead (nginx `return` in `server`).
    #[serde(rename = "return")]
    pub return_: Option<ReturnConfig>,
    /// Locations, matched in nginx's order.
    pub locations: Vec<LocationConfig>,
    /// Directory files are served from by locations without `proxy_pass` (nginx `root`).
    pub root: String,
    /// TLS termination on some of its addresses (nginx `listen ... ssl` and `ssl_*`).
    pub tls: Option<TlsConfig>,
}

impl VhostConfig {
    /// Its plain-text addresses: `listen`, or the main `listen` when it names none at all.
    pub fn plain_listen<'a>(&'a self, main: &'a str) -> Vec<&'a str> {
        if self.listen.is_empty() && self.tls.is_none() {
            vec![main]
        } else {
            self.listen.iter().map(String::as_str).collect()
        }
    }
}

/// TLS on a virtual server's addresses (rustls; HTTP/2 and HTTP/1.1 offered by ALPN).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses of this server that speak TLS (nginx `listen ADDR ssl`); listened on.
    pub listen: Vec<String>,
    /// PEM certificate chain, leaf first (nginx `ssl_certificate`); re-read on SIGHUP.
    pub certificate: String,
    /// PEM private key (nginx `ssl_certificate_key`); re-read on SIGHUP.
    pub key: String,
    /// Versions offered: `TLSv1.2`, `TLSv1.3` (nginx `ssl_protocols`); empty means both.
    pub protocols: Vec<String>,
    /// A DER OCSP response stapled to every handshake (nginx `ssl_stapling_file`); re-read on
    /// SIGHUP. Empty staples nothing.
    pub ocsp_file: String,
}

/// How a location's `path` matches (nginx's location modifiers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationMatch {
    /// The longest matching prefix wins, unless a regular expression matches (no modifier).
    #[default]
    Prefix,
    /// The URI equals `path` (`=`); wins at once.
    Exact,
    /// A prefix that, when longest, stops the regular-expression search (`^~`).
    PrefixNoRegex,
    /// A regular expression, case-sensitive (`~`); the first that matches in order wins.
    Regex,
    /// A regular expression, case-insensitive (`~*`).
    RegexCaseless,
}

/// A location (nginx `location [modifier] path { ... }`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocationConfig {
    /// How `path` matches.
    #[serde(rename = "match")]
    pub match_: LocationMatch,
    /// The prefix, exact URI or regular expression.
    pub path: String,
    /// `http://UPSTREAM[/uri]`: the upstream by name (or a `host:port` given in `upstreams`)
    /// and, when present, the URI part that replaces the matched prefix, as nginx does.
    /// `grpc://UPSTREAM` (no URI part) speaks HTTP/2 cleartext to it, trailers included, as
    /// nginx's `grpc_pass`.
    pub proxy_pass: String,
    /// Rewrites run in this location (nginx `rewrite`).
    pub rewrites: Vec<RewriteConfig>,
    /// Answer with this instead of proxying (nginx `return`).
    #[serde(rename = "return")]
    pub return_: Option<ReturnConfig>,
    /// Serve files from this directory plus the URI (nginx `root`); without `proxy_pass`.
    /// Empty takes the server's `root`.
    pub root: String,
    /// Serve files from this directory plus the URI after the location's prefix (nginx `alias`).
    pub alias: String,
    /// Files tried in order (nginx `try_files`): `$uri`, `$uri/` (its `index.html`), other
    /// paths; the last is `=CODE` or a file answered when none exists.
    pub try_files: Vec<String>,
}

/// nginx `rewrite REGEX REPLACEMENT [FLAG]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewriteConfig {
    /// Regular expression matched against the URI (without arguments).
    pub regex: String,
    /// The new URI; `$1`..`$9` and variables such as `$host` are expanded; starting with
    /// `http://`, `https://` or `$scheme` makes it a redirect.
    pub replacement: String,
    /// What happens after a match.
    pub flag: RewriteFlag,
}

/// What a matching rewrite does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewriteFlag {
    /// Go on with the next rewrite; a changed URI then chooses the location again.
    #[default]
    None,
    /// Stop rewriting and choose the location again with the new URI.
    Last,
    /// Stop rewriting and stay in this location.
    Break,
    /// Answer 302 with the new URI as `Location`.
    Redirect,
    /// Answer 301 with the new URI as `Location`.
    Permanent,
}

/// nginx `return CODE [TEXT|URL]` or `return URL`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReturnConfig {
    /// The status (301, 302, 303, 307 and 308 take `text` as the `Location`).
    pub status: u16,
    /// The body, or for redirects the URL; variables such as `$host` and `$request_uri` are expanded.
    pub text: String,
}

/// A duration written as in nginx: `30s`, `500ms`, `1m`, `2h`, `1d`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// A duration that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration (use e.g. 30s, 500ms, 1m or a number of seconds)")]
pub struct BadDuration(pub String);

/// Parses nginx time notation; several units may be combined (`1m30s`).
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_string());
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad);
        let part = match unit {
            "" | "s" => secs(1)?,
            "ms" => Duration::from_millis(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86_400)?,
            "w" => secs(7 * 86_400)?,
            _ => return Err(bad()),
        };
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Dur(Duration::from_secs(n))),
            Raw::Float(f) if (0.0..1e12).contains(&f) => Ok(Dur(Duration::from_secs_f64(f))),
            Raw::Float(f) => Err(serde::de::Error::custom(BadDuration(f.to_string()))),
            Raw::Text(t) => parse_duration(&t).map(Dur).map_err(serde::de::Error::custom),
        }
    }
}

/// Splits `host:port` (or `[v6]:port`, or a bare host meaning port 80) into its parts.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        let _ = sa;
        let (h, p) = addr.rsplit_once(':')?;
        return Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse().ok()?));
    }
    if addr.is_empty() || addr.contains(char::is_whitespace) || addr.contains('/') {
        return None;
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h, p.parse().ok()?)),
        Some(_) => {
            // A bare IPv6 literal without a port.
            let ip: std::net::Ipv6Addr = addr.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
            let _ = ip;
            Some((addr.trim_start_matches('[').trim_end_matches(']'), 80))
        }
        None => Some((addr, 80)),
    }
}

/// Checks one upstream group; `prefix` is its key (`upstream` or `upstreams[N]`).
fn validate_upstream(prefix: &str, up: &UpstreamConfig) -> Result<(), ConfigError> {
    if up.servers.is_empty() {
        return Err(ConfigError::invalid(
            format!("{prefix}.servers"),
            "at least one server is needed",
        ));
    }
    if up.servers.len() > MAX_SERVERS {
        return Err(ConfigError::invalid(
            format!("{prefix}.servers"),
            format!(
                "at most {MAX_SERVERS} servers are supported, got {}",
                up.servers.len()
            ),
        ));
    }
    for (i, s) in up.servers.iter().enumerate() {
        let key = |k: &str| format!("{prefix}.servers[{i}].{k}");
        if split_host_port(&s.addr).is_none() {
            return Err(ConfigError::invalid(
                key("addr"),
                format!("`{}` is not host:port", s.addr),
            ));
        }
        if s.weight == 0 || s.weight > 1000 {
            return Err(ConfigError::invalid(key("weight"), "must be between 1 and 1000"));
        }
        if s.backup && matches!(up.algorithm, Algorithm::IpHash | Algorithm::Hash) {
            return Err(ConfigError::invalid(
                key("backup"),
                "backup servers cannot be used with ip_hash or hash (as in nginx)",
            ));
        }
    }
    if up.servers.iter().all(|s| s.backup) {
        return Err(ConfigError::invalid(
            format!("{prefix}.servers"),
            "every server is a backup",
        ));
    }
    if up.algorithm == Algorithm::Hash {
        crate::upstream::HashKey::parse(&up.hash_key)
            .map_err(|e| ConfigError::invalid(format!("{prefix}.hash_key"), e.to_string()))?;
    }
    Ok(())
}

impl common::Validate for Config {
    fn validate(self) -> Result<Self, ConfigError> {
        for (key, value) in [("listen", &self.listen), ("admin_listen", &self.admin_listen)] {
            if value.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    key,
                    format!("`{value}` is not an address:port"),
                ));
            }
        }
        common::admin::check_exposure(&self.admin_listen, &self.admin_token, self.admin_allow_open)
            .map_err(|e| ConfigError::invalid("admin_listen", e))?;
        validate_upstream("upstream", &self.upstream)?;
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            validate_upstream(&key, up)?;
            if up.name == self.upstream.name || self.upstreams[..i].iter().any(|u| u.name == up.name) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("`{}` is used twice", up.name),
                ));
            }
        }
        for (i, v) in self.vhosts.iter().enumerate() {
            let Some(t) = &v.tls else { continue };
            let key = |k: &str| format!("vhosts[{i}].tls.{k}");
            if t.listen.is_empty() {
                return Err(ConfigError::invalid(
                    key("listen"),
                    "at least one address is needed",
                ));
            }
            for (k, path) in [("certificate", &t.certificate), ("key", &t.key)] {
                if path.is_empty() {
                    return Err(ConfigError::invalid(key(k), "a PEM file is needed"));
                }
            }
            if let Some(p) = t
                .protocols
                .iter()
                .find(|p| !matches!(p.as_str(), "TLSv1.2" | "TLSv1.3"))
            {
                return Err(ConfigError::invalid(
                    key("protocols"),
                    format!("`{p}` is not supported (TLSv1.2 and TLSv1.3 are)"),
                ));
            }
            let plain: Vec<&str> = self
                .vhosts
                .iter()
                .flat_map(|v| v.plain_listen(&self.listen))
                .collect();
            if let Some(a) = t.listen.iter().find(|a| plain.contains(&a.as_str())) {
                return Err(ConfigError::invalid(
                    key("listen"),
                    format!("`{a}` is also a plain-text address of a virtual server"),
                ));
            }
        }
        crate::route::Router::build(&self).map_err(|e| ConfigError::invalid(e.key, e.message))?;
        let t = &self.timeouts;
        for (key, d) in [
            ("timeouts.header_read", t.header_read),
            ("timeouts.client_idle", t.client_idle),
            ("timeouts.upstream_connect", t.upstream_connect),
            ("timeouts.upstream_response", t.upstream_response),
            ("timeouts.upgraded_idle", t.upgraded_idle),
            ("health.interval", self.health.interval),
            ("health.timeout", self.health.timeout),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::invalid(key, "must be greater than zero"));
            }
        }
        if self.limits.max_header_bytes < 8192 {
            return Err(ConfigError::invalid(
                "limits.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(ConfigError::invalid(
                "limits.max_connections",
                "must be at least 1",
            ));
        }
        if !self.health.path.starts_with('/') {
            return Err(ConfigError::invalid("health.path", "must start with /"));
        }
        if http::StatusCode::from_u16(self.health.expected_status).is_err() {
            return Err(ConfigError::invalid(
                "health.expected_status",
                "is not an HTTP status",
            ));
        }
        if !self.headers.host.is_empty() && http::HeaderValue::from_str(&self.headers.host).is_err() {
            return Err(ConfigError::invalid(
                "headers.host",
                "is not a valid header value",
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{ConfigSource, Validate};

    #[test]
    fn durations_in_nginx_notation() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("86400").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("web1:5000"), Some(("web1", 5000)));
        assert_eq!(split_host_port("web1"), Some(("web1", 80)));
        assert_eq!(split_host_port("[::1]:81"), Some(("::1", 81)));
        assert_eq!(split_host_port("web1:notaport"), None);
        assert_eq!(split_host_port(""), None);
    }

    #[test]
    fn loads_toml_and_names_bad_keys() {
        let t: toml::Table = toml::from_str(
            r#"
            [upstream]
            algorithm = "least_conn"
            servers = [{ addr = "127.0.0.1:1", weight = 3, fail_timeout = "30s" }, { addr = "127.0.0.1:2" }]
            [timeouts]
            header_read = "2s"
            "#,
        )
        .unwrap();
        let c: Config = ConfigSource::new().base(t).load().unwrap();
        assert_eq!(c.upstream.algorithm, Algorithm::LeastConn);
        assert_eq!(c.upstream.servers[0].weight, 3);
        assert_eq!(c.upstream.servers[0].fail_timeout.get(), Duration::from_secs(30));
        assert_eq!(c.timeouts.header_read.get(), Duration::from_secs(2));

        let bad: toml::Table =
            toml::from_str("[upstream]\nservers = [{ addr = \"x:1\", weight = 0 }]").unwrap();
        let e = ConfigSource::new()
            .base(bad)
            .load::<Config>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.servers[0].weight"), "{e}");
        let bad: toml::Table = toml::from_str("[timeouts]\nheader_read = \"soon\"").unwrap();
        let e = ConfigSource::new()
            .base(bad)
            .load::<Config>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeouts.header_read"), "{e}");
        let e = Config::default().validate().unwrap_err().to_string();
        assert!(e.contains("upstream.servers"), "{e}");
    }

    #[test]
    fn routing_in_toml() {
        let t: toml::Table = toml::from_str(
            r#"
            listen = "127.0.0.1:8080"
            [upstream]
            name = "app"
            servers = [{ addr = "127.0.0.1:1" }]
            [[upstreams]]
            name = "api"
            servers = [{ addr = "127.0.0.1:2" }]
            [[vhosts]]
            names = ["example.com"]
            rewrites = [{ regex = "^/old/(.*)$", replacement = "/$1", flag = "last" }]
            locations = [
                { path = "/", proxy_pass = "http://app" },
                { match = "prefix_no_regex", path = "/api/", proxy_pass = "http://api/v1/" },
                { match = "exact", path = "/ping", return = { status = 200, text = "pong" } },
            ]
            [[vhosts]]
            listen = ["127.0.0.1:8081"]
            return = { status = 301, text = "https://$host$request_uri" }
            "#,
        )
        .unwrap();
        let c: Config = ConfigSource::new().base(t).load().unwrap();
        assert_eq!(c.listen_addrs(), ["127.0.0.1:8080", "127.0.0.1:8081"]);
        assert_eq!(c.vhosts[0].locations[1].match_, LocationMatch::PrefixNoRegex);
        assert_eq!(c.vhosts[0].rewrites[0].flag, RewriteFlag::Last);
        assert_eq!(c.vhosts[1].return_.as_ref().unwrap().status, 301);

        let bad: toml::Table = toml::from_str(
            "[upstream]\nservers = [{ addr = \"x:1\" }]\n[[vhosts]]\nlocations = [{ path = \"/\", proxy_pass = \"http://nope\" }]",
        )
        .unwrap();
        let e = ConfigSource::new()
            .base(bad)
            .load::<Config>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vhosts[0].locations[0].proxy_pass") && e.contains("nope"),
            "{e}"
        );
        let bad: toml::Table = toml::from_str(
            "[upstream]\nservers = [{ addr = \"x:1\" }]\n[[upstreams]]\nname = \"backend\"\nservers = [{ addr = \"x:2\" }]",
        )
        .unwrap();
        let e = ConfigSource::new()
            .base(bad)
            .load::<Config>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstreams[0].name"), "{e}");
    }

    #[test]
    fn backup_with_ip_hash_is_refused() {
        let mut c = Config::default();
        c.upstream.algorithm = Algorithm::IpHash;
        c.upstream.servers = vec![
            ServerConfig {
                addr: "127.0.0.1:1".into(),
                ..Default::default()
            },
            ServerConfig {
                addr: "127.0.0.1:2".into(),
                backup: true,
                ..Default::default()
            },
        ];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("upstream.servers[1].backup"), "{e}");
    }
}
