//! The live upstream: resolved servers with their health, passive failure counts, slow-start
//! ramp and in-flight counters, and the selector that picks among them. Built from the config at
//! start and on every reload; servers whose address and parameters did not change keep their state.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{HealthState, Thresholds, Transition};

use crate::config::{split_host_port, Algorithm, Config, ServerConfig};
use crate::select::{self, crc32_update, Attempt, Key, Peers, Select};

/// What can go wrong building an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A server's host name did not resolve.
    #[error("cannot resolve upstream server `{host}`: {message}")]
    Resolve {
        /// The host as written.
        host: String,
        /// The resolver's message.
        message: String,
    },
    /// The hash key is not understood.
    #[error("{0}")]
    HashKey(#[from] HashKeyError),
    /// Resolving produced more servers than supported.
    #[error("upstream has {0} server addresses after resolving; at most {max} are supported", max = crate::config::MAX_SERVERS)]
    TooMany(usize),
}

/// A `hash` key that is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported hash key `{0}`: use literal text with $request_uri, $uri, $args, $remote_addr, $host, $http_NAME or $cookie_NAME")]
pub struct HashKeyError(pub String);

/// One piece of a hash key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// Literal text.
    Lit(String),
    /// Path and query.
    RequestUri,
    /// Path only.
    Uri,
    /// Query only.
    Args,
    /// The client address.
    RemoteAddr,
    /// The Host header.
    Host,
    /// A request header (lower-case name).
    Header(String),
    /// A cookie value.
    Cookie(String),
}

/// A parsed `hash` key, e.g. `$request_uri` or `$cookie_session`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashKey(pub Vec<KeyPart>);

impl HashKey {
    /// Parses nginx variable notation.
    pub fn parse(text: &str) -> Result<HashKey, HashKeyError> {
        let bad = || HashKeyError(text.to_string());
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(var) = rest.strip_prefix('$') {
                let (name, after) = if let Some(braced) = var.strip_prefix('{') {
                    let end = braced.find('}').ok_or_else(bad)?;
                    (&braced[..end], &braced[end + 1..])
                } else {
                    let end = var
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(var.len());
                    (&var[..end], &var[end..])
                };
                let part = match name {
                    "request_uri" => KeyPart::RequestUri,
                    "uri" | "document_uri" => KeyPart::Uri,
                    "args" | "query_string" => KeyPart::Args,
                    "remote_addr" | "binary_remote_addr" => KeyPart::RemoteAddr,
                    "host" | "http_host" => KeyPart::Host,
                    n if n.starts_with("http_") && n.len() > 5 => {
                        KeyPart::Header(n[5..].replace('_', "-").to_ascii_lowercase())
                    }
                    n if n.starts_with("cookie_") && n.len() > 7 => KeyPart::Cookie(n[7..].to_string()),
                    _ => return Err(bad()),
                };
                parts.push(part);
                rest = after;
            } else {
                let end = rest.find('$').unwrap_or(rest.len());
                parts.push(KeyPart::Lit(rest[..end].to_string()));
                rest = &rest[end..];
            }
        }
        if parts.is_empty() {
            return Err(bad());
        }
        Ok(HashKey(parts))
    }

    /// The CRC32 of the key's value for one request, fed piece by piece (no allocation).
    pub fn hash(&self, parts: &http::request::Parts, client: IpAddr) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        let mut feed = |b: &[u8]| crc = crc32_update(crc, b);
        for part in &self.0 {
            match part {
                KeyPart::Lit(s) => feed(s.as_bytes()),
                KeyPart::RequestUri => feed(
                    parts
                        .uri
                        .path_and_query()
                        .map_or(parts.uri.path(), |pq| pq.as_str())
                        .as_bytes(),
                ),
                KeyPart::Uri => feed(parts.uri.path().as_bytes()),
                KeyPart::Args => feed(parts.uri.query().unwrap_or("").as_bytes()),
                KeyPart::RemoteAddr => {
                    // Formatting into a stack buffer keeps this allocation-free.
                    let mut buf = [0u8; 64];
                    let n = {
                        use std::io::Write;
                        let mut cur = std::io::Cursor::new(&mut buf[..]);
                        let _ = write!(cur, "{client}");
                        cur.position() as usize
                    };
                    feed(&buf[..n]);
                }
                KeyPart::Host => {
                    let host = parts.headers.get(http::header::HOST).map(|v| v.as_bytes());
                    feed(
                        host.or_else(|| parts.uri.host().map(str::as_bytes))
                            .unwrap_or(b""),
                    );
                }
                KeyPart::Header(name) => {
                    if let Some(v) = parts.headers.get(name.as_str()) {
                        feed(v.as_bytes());
                    }
                }
                KeyPart::Cookie(name) => {
                    if let Some(v) = cookie(&parts.headers, name) {
                        feed(v.as_bytes());
                    }
                }
            }
        }
        !crc
    }
}

/// The value of cookie `name` in the request's Cookie headers.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|line| {
            line.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then_some(v)
            })
        })
}

/// Passive failure accounting, as nginx's `max_fails`/`fail_timeout`.
#[derive(Debug, Default)]
struct Passive {
    fails: AtomicU32,
    /// Milliseconds since the upstream epoch of the last failure.
    checked_ms: AtomicU64,
}

/// One upstream server and its live state.
#[derive(Debug)]
pub struct Server {
    /// Its configuration.
    pub config: ServerConfig,
    /// The resolved address.
    pub addr: SocketAddr,
    /// `addr` as text, the label in metrics.
    pub label: Arc<str>,
    /// `addr` as a URI authority, built once for every request sent to it.
    pub authority: http::uri::Authority,
    /// The name nginx would hash for consistent hashing (the `server` text).
    pub name: String,
    /// Requests in flight.
    pub active: AtomicU32,
    /// Requests sent, ever.
    pub requests: AtomicU64,
    /// Failures seen, ever.
    pub failures: AtomicU64,
    /// What the active health check concluded (true when checks are off).
    healthy: AtomicBool,
    /// The rise/fall state of active checks.
    health: Mutex<HealthState>,
    passive: Passive,
    /// When the server last came back, for slow start.
    recovered_at: Mutex<Option<Instant>>,
    epoch: Instant,
    /// Idle keep-alive connections of the fast path, newest last, one list per serving thread
    /// (a connection belongs to the runtime it was opened on, as in nginx each worker process
    /// keeps its own `keepalive` connections).
    idle: Box<[Mutex<Vec<Pooled>>]>,
}

/// An idle upstream connection and its read buffer.
#[derive(Debug)]
pub(crate) struct Pooled {
    /// The connection.
    pub stream: tokio::net::TcpStream,
    /// Its read buffer (kept with the connection, so client connections need none of their own).
    pub buf: bytes::BytesMut,
    /// When it went idle.
    pub idle_since: Instant,
}

impl Server {
    fn new(
        config: ServerConfig,
        addr: SocketAddr,
        name: String,
        thresholds: Thresholds,
        workers: usize,
    ) -> Server {
        Server {
            label: Arc::from(addr.to_string()),
            authority: http::uri::Authority::try_from(addr.to_string().as_str())
                .expect("a socket address is a valid authority"),
            config,
            addr,
            name,
            active: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            health: Mutex::new(HealthState::new(thresholds, true)),
            passive: Passive::default(),
            recovered_at: Mutex::new(None),
            epoch: Instant::now(),
            idle: (0..workers.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Takes the newest idle connection that is neither older than `max_idle` nor closed or
    /// spoken to by the upstream while idle. The lock is held only to pop; the checks and the
    /// closing of stale connections happen outside it.
    pub(crate) fn pool_take(&self, max_idle: Duration, now: Instant) -> Option<Pooled> {
        let idle = self.idle_here();
        loop {
            let mut c = idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if now.saturating_duration_since(c.idle_since) > max_idle {
                // The rest are older still.
                let stale = std::mem::take(&mut *idle.lock().unwrap_or_else(|p| p.into_inner()));
                drop(stale);
                return None;
            }
            // Idle, the upstream has nothing to say: anything readable is a close or junk.
            c.buf.clear();
            c.buf.reserve(4096);
            match c.stream.try_read_buf(&mut c.buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(c),
                _ => continue,
            }
        }
    }

    /// Returns a connection to the idle list, keeping at most `cap` (the oldest goes first).
    pub(crate) fn pool_put(&self, conn: Pooled, cap: usize) {
        if cap == 0 {
            return;
        }
        let evicted = {
            let mut idle = self.idle_here().lock().unwrap_or_else(|p| p.into_inner());
            idle.push(conn);
            (idle.len() > cap).then(|| idle.remove(0))
        };
        drop(evicted);
    }

    /// This serving thread's idle list.
    fn idle_here(&self) -> &Mutex<Vec<Pooled>> {
        &self.idle[common::workers::current_index() % self.idle.len()]
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether the active check says the server is up.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive failures currently rest the server.
    pub fn passively_failed(&self, now: Instant) -> bool {
        let max = self.config.max_fails;
        if max == 0 || self.passive.fails.load(Ordering::Relaxed) < max {
            return false;
        }
        let since = self
            .now_ms(now)
            .saturating_sub(self.passive.checked_ms.load(Ordering::Relaxed));
        since <= self.config.fail_timeout.get().as_millis() as u64
    }

    /// Whether the server may take requests at all right now.
    pub fn available(&self, now: Instant) -> bool {
        !self.config.down && self.is_healthy() && !self.passively_failed(now)
    }

    /// Records a failed attempt (connect error, timeout, or a retried 5xx).
    pub fn record_failure(&self, now: Instant) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let now_ms = self.now_ms(now);
        let last = self.passive.checked_ms.swap(now_ms, Ordering::Relaxed);
        // Failures older than fail_timeout no longer count, as in nginx.
        if now_ms.saturating_sub(last) > self.config.fail_timeout.get().as_millis() as u64 {
            self.passive.fails.store(0, Ordering::Relaxed);
        }
        let fails = self.passive.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if self.config.max_fails > 0 && fails == self.config.max_fails {
            tracing::warn!(server = %self.label, fails, "upstream server temporarily disabled");
        }
    }

    /// Records a successful response; a server that was resting starts its slow start.
    pub fn record_success(&self, now: Instant) {
        let before = self.passive.fails.swap(0, Ordering::Relaxed);
        if self.config.max_fails > 0 && before >= self.config.max_fails {
            self.mark_recovered(now);
        }
    }

    fn mark_recovered(&self, now: Instant) {
        if !self.config.slow_start.get().is_zero() {
            *self.recovered_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        }
    }

    /// Feeds one active probe result; returns the transition, if any.
    pub fn observe_probe(&self, passed: bool, now: Instant) -> Option<Transition> {
        let t = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(passed);
        match t {
            Some(Transition::Up) => {
                self.healthy.store(true, Ordering::Relaxed);
                self.mark_recovered(now);
                tracing::info!(server = %self.label, "upstream server is healthy again");
            }
            Some(Transition::Down) => {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(server = %self.label, "upstream server failed its health checks");
            }
            None => {}
        }
        t
    }

    /// Marks the server healthy regardless of probes (health checks were turned off).
    pub fn force_healthy(&self) {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).force(true);
        self.healthy.store(true, Ordering::Relaxed);
    }

    /// The weight in force: ramps linearly from 1 to the configured weight during slow start.
    pub fn effective_weight(&self, now: Instant) -> u32 {
        let w = self.config.weight;
        let ramp = self.config.slow_start.get();
        if ramp.is_zero() {
            return w;
        }
        let since = match *self.recovered_at.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(t) => now.saturating_duration_since(t),
            None => return w,
        };
        slow_start_weight(w, since, ramp)
    }
}

/// The slow-start weight `since` after recovery with a ramp of `ramp`.
pub fn slow_start_weight(weight: u32, since: Duration, ramp: Duration) -> u32 {
    if ramp.is_zero() || since >= ramp {
        return weight;
    }
    let frac = since.as_secs_f64() / ramp.as_secs_f64();
    ((f64::from(weight) * frac).ceil() as u32).clamp(1, weight)
}

/// One resolved server group and its selector.
pub struct Upstream {
    /// The group's name.
    pub name: String,
    /// The algorithm in force.
    pub algorithm: Algorithm,
    /// Every server, primaries first, then backups.
    pub servers: Vec<Arc<Server>>,
    /// How many of `servers` are primaries.
    pub primaries: usize,
    primary_select: Box<dyn Select>,
    backup_select: select::RoundRobin,
    hash_key: Option<HashKey>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("servers", &self.servers)
            .finish()
    }
}

/// A tier (primaries or backups) as the selector sees it for one request.
struct Tier<'a> {
    servers: &'a [Arc<Server>],
    offset: usize,
    tried: u64,
    now: Instant,
}

impl Peers for Tier<'_> {
    fn len(&self) -> usize {
        self.servers.len()
    }
    fn weight(&self, i: usize) -> u32 {
        self.servers[i].config.weight
    }
    fn effective_weight(&self, i: usize) -> u32 {
        self.servers[i].effective_weight(self.now)
    }
    fn usable(&self, i: usize) -> bool {
        self.tried & (1 << (i + self.offset)) == 0 && self.servers[i].available(self.now)
    }
    fn active(&self, i: usize) -> u32 {
        self.servers[i].active.load(Ordering::Relaxed)
    }
}

/// What a request carries through its tries.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestPick {
    /// Servers already tried (bit = index in `Upstream::servers`).
    pub tried: u64,
    /// Selector state.
    pub attempt: Attempt,
}

impl Upstream {
    /// Resolves the configured servers, reusing the state of unchanged servers from `previous`.
    pub fn build(config: &Config, previous: Option<&Upstream>) -> Result<Upstream, UpstreamError> {
        Upstream::build_group(config, &config.upstream, previous)
    }

    /// Resolves one group (`upstream` or one of `upstreams`), reusing the state of unchanged
    /// servers from `previous`.
    pub fn build_group(
        config: &Config,
        up: &crate::config::UpstreamConfig,
        previous: Option<&Upstream>,
    ) -> Result<Upstream, UpstreamError> {
        let thresholds = Thresholds {
            rise: config.health.rise,
            fall: config.health.fall,
        };
        let mut primaries = Vec::new();
        let mut backups = Vec::new();
        for sc in &up.servers {
            let (host, port) = split_host_port(&sc.addr).ok_or_else(|| UpstreamError::Resolve {
                host: sc.addr.clone(),
                message: "not host:port".to_string(),
            })?;
            let addrs = resolve(host, port)?;
            for addr in addrs {
                let reuse = previous.and_then(|p| {
                    p.servers
                        .iter()
                        .find(|s| s.addr == addr && s.config == *sc && s.name == sc.addr)
                        .cloned()
                });
                let server = match reuse {
                    Some(s) => {
                        s.health
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .set_thresholds(thresholds);
                        s
                    }
                    None => Arc::new(Server::new(
                        sc.clone(),
                        addr,
                        sc.addr.clone(),
                        thresholds,
                        common::workers::resolve(config.workers),
                    )),
                };
                if sc.backup {
                    backups.push(server);
                } else {
                    primaries.push(server);
                }
            }
        }
        let n_primary = primaries.len();
        let total = n_primary + backups.len();
        if total > crate::config::MAX_SERVERS {
            return Err(UpstreamError::TooMany(total));
        }
        let primary_select: Box<dyn Select> = match up.algorithm {
            Algorithm::RoundRobin => Box::new(select::RoundRobin::new(n_primary)),
            Algorithm::IpHash => Box::new(select::IpHash::new(n_primary)),
            Algorithm::LeastConn => Box::new(select::LeastConn::new(n_primary)),
            Algorithm::Hash => {
                let names: Vec<(&str, u32)> = primaries
                    .iter()
                    .map(|s| (s.name.as_str(), s.config.weight))
                    .collect();
                Box::new(select::ConsistentHash::new(&names))
            }
        };
        let hash_key = match up.algorithm {
            Algorithm::Hash => Some(HashKey::parse(&up.hash_key)?),
            _ => None,
        };
        let n_backup = backups.len();
        primaries.extend(backups);
        Ok(Upstream {
            name: up.name.clone(),
            algorithm: up.algorithm,
            servers: primaries,
            primaries: n_primary,
            primary_select,
            backup_select: select::RoundRobin::new(n_backup),
            hash_key,
        })
    }

    /// Picks the next server for a request, primaries first, backups only when no primary can
    /// take it; `None` when every server is down, resting or already tried.
    pub fn pick(
        &self,
        parts: &http::request::Parts,
        client: IpAddr,
        state: &mut RequestPick,
        now: Instant,
    ) -> Option<usize> {
        let mut addr_buf = [0u8; 16];
        let key = match self.algorithm {
            Algorithm::IpHash => {
                let n = select::ip_hash_addr_bytes(client, &mut addr_buf);
                Key::Addr(&addr_buf[..n])
            }
            Algorithm::Hash => match (&self.hash_key, state.attempt.hash) {
                // The key hash only matters for the first pick; retries walk the ring from there.
                (Some(k), None) => Key::Hash(k.hash(parts, client)),
                _ => Key::Hash(0),
            },
            _ => Key::None,
        };
        let primaries = Tier {
            servers: &self.servers[..self.primaries],
            offset: 0,
            tried: state.tried,
            now,
        };
        if let Some(i) = self.primary_select.pick(&primaries, key, &mut state.attempt) {
            state.tried |= 1 << i;
            return Some(i);
        }
        let backups = Tier {
            servers: &self.servers[self.primaries..],
            offset: self.primaries,
            tried: state.tried,
            now,
        };
        let i = self
            .backup_select
            .pick(&backups, Key::None, &mut Attempt::default())?
            + self.primaries;
        state.tried |= 1 << i;
        Some(i)
    }
}

/// Resolves `host:port` to every address, as nginx makes one peer per address.
fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let err = |message: String| UpstreamError::Resolve {
        host: host.to_string(),
        message,
    };
    let mut out: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .collect();
    // Keep the resolver's order (it decides ip_hash positions) but drop duplicates.
    let mut seen = Vec::with_capacity(out.len());
    out.retain(|a| {
        let new = !seen.contains(a);
        seen.push(*a);
        new
    });
    if out.is_empty() {
        return Err(err("no addresses".to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hash_keys_parse_and_hash() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let k = HashKey::parse("$request_uri").unwrap();
        let p = parts("/a?b=1", &[]);
        assert_eq!(k.hash(&p, ip), crate::select::crc32(b"/a?b=1"));
        let k = HashKey::parse("$cookie_sid").unwrap();
        let p = parts("/", &[("cookie", "x=1; sid=abc")]);
        assert_eq!(k.hash(&p, ip), crate::select::crc32(b"abc"));
        let k = HashKey::parse("u:$http_x_user:$remote_addr").unwrap();
        let p = parts("/", &[("x-user", "bob")]);
        assert_eq!(k.hash(&p, ip), crate::select::crc32(b"u:bob:10.1.2.3"));
        assert!(HashKey::parse("$nope").is_err());
        assert!(HashKey::parse("").is_err());
        assert!(HashKey::parse("${unclosed").is_err());
    }

    #[test]
    fn slow_start_ramps_from_one_to_weight() {
        let ramp = Duration::from_secs(10);
        assert_eq!(slow_start_weight(10, Duration::ZERO, ramp), 1);
        assert_eq!(slow_start_weight(10, Duration::from_secs(5), ramp), 5);
        assert_eq!(slow_start_weight(10, Duration::from_secs(10), ramp), 10);
        assert_eq!(slow_start_weight(10, Duration::from_secs(99), Duration::ZERO), 10);
    }

    fn config(servers: &[(&str, bool, bool)]) -> Config {
        let mut c = Config::default();
        c.upstream.servers = servers
            .iter()
            .map(|(a, backup, down)| ServerConfig {
                addr: a.to_string(),
                backup: *backup,
                down: *down,
                max_fails: 2,
                fail_timeout: crate::config::Dur(Duration::from_secs(10)),
                ..Default::default()
            })
            .collect();
        c
    }

    #[test]
    fn backups_only_when_every_primary_is_out_and_down_never() {
        let c = config(&[
            ("127.0.0.1:1", false, false),
            ("127.0.0.1:2", false, true),
            ("127.0.0.1:3", true, false),
        ]);
        let up = Upstream::build(&c, None).unwrap();
        let p = parts("/", &[]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        let mut picks = Vec::new();
        for _ in 0..4 {
            let mut st = RequestPick::default();
            picks.push(up.pick(&p, ip, &mut st, now).unwrap());
        }
        assert_eq!(
            picks,
            vec![0, 0, 0, 0],
            "down server 1 and backup 2 unused while 0 is up"
        );
        // Two failures within fail_timeout rest server 0: the backup takes over.
        up.servers[0].record_failure(now);
        up.servers[0].record_failure(now);
        let mut st = RequestPick::default();
        assert_eq!(up.pick(&p, ip, &mut st, now), Some(2));
        assert_eq!(up.pick(&p, ip, &mut st, now), None, "everything tried");
        // After fail_timeout server 0 is tried again, and a success clears it.
        let later = now + Duration::from_secs(11);
        let mut st = RequestPick::default();
        assert_eq!(up.pick(&p, ip, &mut st, later), Some(0));
        up.servers[0].record_success(later);
        assert!(!up.servers[0].passively_failed(later));
    }

    #[test]
    fn unresolvable_host_is_named() {
        let c = config(&[("no-such-host.invalid:5000", false, false)]);
        let e = Upstream::build(&c, None).unwrap_err().to_string();
        assert!(e.contains("no-such-host.invalid"), "{e}");
    }

    #[test]
    fn reload_keeps_state_of_unchanged_servers() {
        let c = config(&[("127.0.0.1:1", false, false), ("127.0.0.1:2", false, false)]);
        let a = Upstream::build(&c, None).unwrap();
        a.servers[1].requests.store(7, Ordering::Relaxed);
        let c2 = config(&[("127.0.0.1:2", false, false), ("127.0.0.1:3", false, false)]);
        let b = Upstream::build(&c2, Some(&a)).unwrap();
        assert_eq!(b.servers[0].requests.load(Ordering::Relaxed), 7);
        assert_eq!(b.servers[1].requests.load(Ordering::Relaxed), 0);
    }
}
