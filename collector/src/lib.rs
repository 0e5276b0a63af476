//! Samples host metrics from /proc every `interval` and writes them through dbproxy, spooling them
//! (in memory and in a file) while the database is unreachable so that no sample is lost.
//!
//! Two tasks share the [`spool::Spool`]: the sampler appends a sample each interval and never waits
//! for the database; the writer flushes the spool in order whenever the database answers.
//!
//! - `sample.rs`: pure parsers of /proc text (stat, loadavg, meminfo, mounts, net/dev, uptime,
//!   hostname) and the [`sample::Sampler`] that reads them (plus statvfs) off the async threads.
//! - `spool.rs`: the bounded queue and its JSON-lines file; torn or garbage lines are skipped.
//! - `store.rs`: one tokio-postgres connection, migrations on first connect, a timeout on every
//!   statement, and a server-side cancel of any statement it abandons.
//! - `metrics.rs`: `/metrics` on the optional admin listener.
//!
//! Writes are `INSERT ... ON CONFLICT (host, sampled_at) DO NOTHING`, so re-sending after a crash
//! or a lost acknowledgement never stores a sample twice; stamps are strictly increasing per host.

pub mod metrics;
pub mod sample;
pub mod spool;
pub mod store;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sample::Sampler;
use crate::spool::Spool;
use crate::store::{Store, Timeouts};

/// The `collector` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Time between samples: a number of seconds (`60`, `0.2`) or text with a unit (`200ms`, `5m`).
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Where samples are written: a libpq `key=value` string or a `postgres://` URL (dbproxy).
    pub database_url: String,
    /// The host name stored with each sample; the machine's host name when unset.
    pub host: Option<String>,
    /// The spool file (JSON lines) holding samples not yet written, kept across restarts.
    pub spool_file: PathBuf,
    /// At most this many unwritten samples are kept; beyond it the oldest are dropped.
    pub spool_capacity: usize,
    /// Time limit for opening a database connection.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time limit for each statement (migrations included).
    #[serde(with = "duration")]
    pub query_timeout: Duration,
    /// On shutdown, how long to keep flushing the spool before leaving the rest in the file.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Where procfs is mounted.
    pub proc_root: PathBuf,
    /// Address of the admin listener (`/metrics`, `/healthz`), e.g. `127.0.0.1:9940`; none when unset.
    /// Off loopback it needs `admin_token` (or `admin_allow_open`), else the collector refuses to start.
    pub admin_listen: Option<String>,
    /// Token the admin listener requires as `Authorization: Bearer <token>` on every request but
    /// reads (GET, HEAD), as dbproxy's `admin_token`; empty means none. Changing it needs a restart.
    pub admin_token: String,
    /// Serve the admin listener off loopback without `admin_token`, on purpose.
    pub admin_allow_open: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interval: Duration::from_secs(60),
            database_url: "host=127.0.0.1 port=9999 user=postgres dbname=postgres".into(),
            host: None,
            spool_file: PathBuf::from("collector-spool.jsonl"),
            // A week of samples at the default interval.
            spool_capacity: 10_080,
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            proc_root: PathBuf::from("/proc"),
            admin_listen: None,
            admin_token: String::new(),
            admin_allow_open: false,
        }
    }
}

impl common::Validate for Config {
    fn validate(self) -> Result<Self, common::ConfigError> {
        use common::ConfigError;
        for (key, d) in [
            ("interval", self.interval),
            ("connect_timeout", self.connect_timeout),
            ("query_timeout", self.query_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if d < Duration::from_millis(1) {
                return Err(ConfigError::invalid(key, "must be at least 1ms"));
            }
            // Far beyond any sensible value, and far below where instant arithmetic overflows.
            if d > Duration::from_secs(7 * 24 * 3600) {
                return Err(ConfigError::invalid(key, "must be at most 7 days"));
            }
        }
        if let Err(e) = self.database_url.parse::<tokio_postgres::Config>() {
            return Err(ConfigError::invalid(
                "database_url",
                format!("not a connection string: {e}"),
            ));
        }
        if let Some(h) = &self.host {
            if sample::parse_hostname(h).is_err() {
                return Err(ConfigError::invalid(
                    "host",
                    format!("`{h}` is not a host name (empty, or has spaces)"),
                ));
            }
        }
        if let Some(a) = &self.admin_listen {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    "admin_listen",
                    format!("`{a}` is not an address:port"),
                ));
            }
            common::admin::check_exposure(a, &self.admin_token, self.admin_allow_open)
                .map_err(|e| ConfigError::invalid("admin_listen", e))?;
        }
        if self.spool_capacity == 0 {
            return Err(ConfigError::invalid("spool_capacity", "must be at least 1"));
        }
        if self.spool_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("spool_file", "must not be empty"));
        }
        Ok(self)
    }
}

/// How `run` behaves, from the command line rather than the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Take one sample, write it, and return.
    pub once: bool,
    /// Print samples as JSON lines on stdout instead of writing them (no database, no spool).
    pub print: bool,
}

/// Counters a running collector keeps; tests and logs read them.
#[derive(Debug, Default)]
pub struct Stats {
    produced: AtomicU64,
    written: AtomicU64,
    already_stored: AtomicU64,
    rejected: AtomicU64,
    sample_errors: AtomicU64,
    write_errors: AtomicU64,
    recovered: AtomicU64,
    pending: AtomicU64,
    dropped: AtomicU64,
}

macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident),*) => {
        impl Stats {
            $($(#[$doc])* pub fn $name(&self) -> u64 { self.$name.load(Ordering::Relaxed) })*
        }
    };
}

getters!(
    /// Samples taken by this process.
    produced,
    /// Samples the database stored.
    written,
    /// Samples the database already had (re-sent from the spool file after a restart).
    already_stored,
    /// Samples the database refused as invalid (dropped).
    rejected,
    /// Sampling attempts that failed (unreadable /proc).
    sample_errors,
    /// Failed write attempts (each is retried).
    write_errors,
    /// Samples found in the spool file at start.
    recovered,
    /// Samples waiting in the spool.
    pending,
    /// Samples dropped because the spool was full.
    dropped
);

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why the collector stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Sampling failed in `--once` or `--print --once` mode, or the host name could not be read.
    #[error(transparent)]
    Sample(#[from] sample::SampleError),
    /// The spool file could not be opened.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    /// The database URL did not parse (config validation normally catches it first).
    #[error("invalid database_url: {0}")]
    DatabaseUrl(String),
    /// `--once` could not write its sample; it stays in the spool file.
    #[error("{0} sample(s) could not be written and remain in the spool file {1}")]
    Unwritten(usize, PathBuf),
    /// Writing to stdout failed in `--print` mode.
    #[error("cannot print the sample: {0}")]
    Print(std::io::Error),
    /// A task died.
    #[error("internal task failed: {0}")]
    Task(String),
    /// The metrics registry could not be built.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs the collector until `shutdown` (or after one sample with `mode.once`), serving `/metrics`
/// and `/healthz` on `admin` when given.
///
/// On shutdown the sampler stops, the writer finishes its current write and keeps flushing for at
/// most `drain_timeout`, and whatever is left is synced to the spool file.
pub async fn run(
    admin: Option<TcpListener>,
    config: Config,
    mode: Mode,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (_keep, updates) = watch::channel(config);
    run_with_reload(admin, updates, mode, stats, shutdown).await
}

/// [`run`], taking configuration updates (SIGHUP) from `updates`.
///
/// `interval`, `database_url`, the timeouts take effect at once; `host`, `spool_file`,
/// `spool_capacity`, `proc_root`, `admin_listen` and `admin_token` need a restart (a warning says so).
pub async fn run_with_reload(
    admin: Option<TcpListener>,
    updates: watch::Receiver<Config>,
    mode: Mode,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let admin_stop = shutdown.child_token();
    let mut admin_task = None;
    if let Some(listener) = admin {
        let registry = metrics::registry(stats.clone())?;
        let stop = admin_stop.clone();
        let token = updates.borrow().admin_token.clone();
        admin_task = Some(tokio::spawn(async move {
            let routes = Arc::new(common::admin::TokenOnly(token));
            if let Err(e) = common::admin::serve(listener, registry, routes, stop).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        }));
    }
    let result = collect(updates, mode, stats, shutdown).await;
    admin_stop.cancel();
    if let Some(task) = admin_task {
        // The listener is closed once this returns; a stuck scrape cannot hold up the exit.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    result
}

async fn collect(
    mut updates: watch::Receiver<Config>,
    mode: Mode,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut config = updates.borrow_and_update().clone();
    let host = match &config.host {
        Some(h) => h.clone(),
        None => Sampler::hostname(&config.proc_root)?,
    };
    let mut sampler = Sampler::new(config.proc_root.clone(), host);
    let (s, primed) = blocking(sampler, |s| s.prime()).await?;
    sampler = s;
    primed?;

    if mode.print {
        return print_loop(sampler, &config, mode, &stats, &shutdown).await;
    }

    let db: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(|e: tokio_postgres::Error| RunError::DatabaseUrl(e.to_string()))?;
    let path = config.spool_file.clone();
    let capacity = config.spool_capacity;
    let (spool, recovered) = tokio::task::spawn_blocking(move || Spool::open(&path, capacity))
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
    if recovered.samples > 0 || recovered.bad_lines > 0 {
        tracing::info!(
            samples = recovered.samples,
            bad_lines = recovered.bad_lines,
            dropped_over_capacity = recovered.over_capacity,
            "resuming from the spool file"
        );
    }
    stats.recovered.store(recovered.samples as u64, Ordering::Relaxed);
    stats.pending.store(spool.len() as u64, Ordering::Relaxed);
    if let Some(t) = spool.newest() {
        sampler.not_before(t);
    }
    let spool = Arc::new(Mutex::new(spool));
    let wake = Arc::new(Notify::new());
    let stop_writer = CancellationToken::new();
    let store = Store::new(
        db,
        Timeouts {
            connect: config.connect_timeout,
            query: config.query_timeout,
        },
    );
    let mut writer_ctx = WriterCtx {
        store,
        spool: spool.clone(),
        wake: wake.clone(),
        stats: stats.clone(),
        stop: stop_writer.clone(),
        retry: Duration::ZERO,
        max_retry: Duration::ZERO,
        drain: Duration::ZERO,
        updates: updates.clone(),
        reload_open: true,
        config: config.clone(),
    };
    writer_ctx.set_pacing();
    let writer = tokio::spawn(write_loop(writer_ctx));
    let mut reload_open = true;

    let mut next = Instant::now() + config.interval.min(Duration::from_secs(1));
    let mut first_error = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
            changed = updates.changed(), if reload_open => {
                if changed.is_err() {
                    reload_open = false;
                    continue;
                }
                let new = updates.borrow_and_update().clone();
                warn_restart_only(&config, &new);
                if new.interval != config.interval {
                    tracing::info!(interval = ?new.interval, "sampling interval changed");
                    next = Instant::now() + new.interval;
                }
                config.interval = new.interval;
                continue;
            }
        }
        next += config.interval;
        // A filesystem that hangs statvfs (a dead NFS server) must not hold up shutdown.
        let (s, result) = tokio::select! {
            r = blocking(sampler, |s| s.sample()) => r?,
            _ = shutdown.cancelled() => break,
        };
        sampler = s;
        match result {
            Ok(sample) => {
                let (spool, st) = (spool.clone(), stats.clone());
                let push = tokio::task::spawn_blocking(move || {
                    let mut q = spool.lock().unwrap_or_else(|p| p.into_inner());
                    let r = q.push(sample);
                    bump(&st.produced);
                    st.pending.store(q.len() as u64, Ordering::Relaxed);
                    st.dropped.store(q.dropped(), Ordering::Relaxed);
                    r
                })
                .await
                .map_err(|e| RunError::Task(e.to_string()))?;
                if let Err(e) = push {
                    tracing::error!(error = %e, "cannot append to the spool file; the sample is kept in memory");
                }
                wake.notify_one();
            }
            Err(e) => {
                bump(&stats.sample_errors);
                tracing::warn!(error = %e, "sampling failed");
                if mode.once {
                    first_error = Some(e);
                }
            }
        }
        if mode.once {
            break;
        }
        let now = Instant::now();
        if next < now {
            // Sampling fell behind (a stalled filesystem): skip the missed ticks, keep the pace.
            next = now + config.interval;
        }
    }
    stop_writer.cancel();
    writer.await.map_err(|e| RunError::Task(e.to_string()))?;
    if let Some(e) = first_error {
        return Err(e.into());
    }
    let left = spool.lock().unwrap_or_else(|p| p.into_inner()).len();
    if mode.once && left > 0 {
        return Err(RunError::Unwritten(left, config.spool_file.clone()));
    }
    Ok(())
}

/// Runs `f` on the sampler in a blocking thread (file reads and statvfs block) and hands it back.
async fn blocking<T: Send + 'static>(
    sampler: Sampler,
    f: impl FnOnce(&mut Sampler) -> T + Send + 'static,
) -> Result<(Sampler, T), RunError> {
    tokio::task::spawn_blocking(move || {
        let mut s = sampler;
        let out = f(&mut s);
        (s, out)
    })
    .await
    .map_err(|e| RunError::Task(e.to_string()))
}

async fn print_loop(
    mut sampler: Sampler,
    config: &Config,
    mode: Mode,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut next = Instant::now() + config.interval.min(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(next) => {}
        }
        next = (next + config.interval).max(Instant::now());
        let (s, result) = blocking(sampler, |s| s.sample()).await?;
        sampler = s;
        match result {
            Ok(sample) => {
                bump(&stats.produced);
                let mut line = serde_json::to_vec(&sample).unwrap_or_default();
                line.push(b'\n');
                let mut out = std::io::stdout().lock();
                out.write_all(&line)
                    .and_then(|_| out.flush())
                    .map_err(RunError::Print)?;
            }
            Err(e) if mode.once => return Err(e.into()),
            Err(e) => {
                bump(&stats.sample_errors);
                tracing::warn!(error = %e, "sampling failed");
            }
        }
        if mode.once {
            return Ok(());
        }
    }
}

/// Logs the changed keys a running collector cannot apply.
fn warn_restart_only(old: &Config, new: &Config) {
    let keys = [
        ("host", old.host != new.host),
        ("spool_file", old.spool_file != new.spool_file),
        ("spool_capacity", old.spool_capacity != new.spool_capacity),
        ("proc_root", old.proc_root != new.proc_root),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("admin_token", old.admin_token != new.admin_token),
    ];
    for (key, changed) in keys {
        if changed {
            tracing::warn!(key, "this setting changed but only takes effect after a restart");
        }
    }
}

struct WriterCtx {
    store: Store,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    retry: Duration,
    max_retry: Duration,
    drain: Duration,
    updates: watch::Receiver<Config>,
    reload_open: bool,
    /// The configuration in force.
    config: Config,
}

impl WriterCtx {
    /// Derives the retry pacing from the interval: first retry within a second (or an interval),
    /// then backing off to at most the interval (capped at 30 s).
    fn set_pacing(&mut self) {
        let i = self.config.interval;
        self.retry = i.min(Duration::from_secs(1));
        self.max_retry = i.max(Duration::from_secs(1)).min(Duration::from_secs(30));
        self.drain = self.config.drain_timeout;
    }

    /// Applies a configuration update; a new database address or timeouts mean a new connection.
    fn reload(&mut self, changed: Result<(), watch::error::RecvError>) {
        if changed.is_err() {
            self.reload_open = false;
            return;
        }
        let new = self.updates.borrow_and_update().clone();
        let db_changed = new.database_url != self.config.database_url
            || new.connect_timeout != self.config.connect_timeout
            || new.query_timeout != self.config.query_timeout;
        if db_changed {
            match new.database_url.parse::<tokio_postgres::Config>() {
                Ok(db) => {
                    self.store = Store::new(
                        db,
                        Timeouts {
                            connect: new.connect_timeout,
                            query: new.query_timeout,
                        },
                    );
                    tracing::info!("database settings changed; reconnecting");
                }
                Err(e) => {
                    tracing::error!(error = %e, "ignoring an invalid database_url");
                    return;
                }
            }
        }
        self.config = new;
        self.set_pacing();
    }
}

enum Flush {
    /// The spool is empty.
    Done,
    /// A write failed; retry later.
    Failed,
    /// Shutdown began between two writes.
    Stopped,
}

async fn write_loop(mut ctx: WriterCtx) {
    let mut backoff = ctx.retry;
    let mut outage = false;
    loop {
        match flush(&mut ctx, true, &mut outage).await {
            Flush::Done => {
                backoff = ctx.retry;
                tokio::select! {
                    _ = ctx.wake.notified() => continue,
                    _ = ctx.stop.cancelled() => break,
                    r = ctx.updates.changed(), if ctx.reload_open => ctx.reload(r),
                }
            }
            Flush::Failed => {
                // Retry after a growing pause, or as soon as a new sample arrives: at most about one
                // attempt per interval, so an outage costs the database nothing when it returns.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ctx.wake.notified() => {}
                    _ = ctx.stop.cancelled() => break,
                    r = ctx.updates.changed(), if ctx.reload_open => {
                        ctx.reload(r);
                        backoff = ctx.retry;
                        continue;
                    }
                }
                backoff = (backoff * 2).min(ctx.max_retry);
            }
            Flush::Stopped => break,
        }
    }
    // Shutdown: one bounded last attempt, then whatever is left goes to disk exactly.
    let drain = ctx.drain;
    if tokio::time::timeout(drain, flush(&mut ctx, false, &mut outage))
        .await
        .is_err()
    {
        tracing::warn!(after = ?drain, "gave up flushing the spool at shutdown");
    }
    let spool = ctx.spool.clone();
    let left = tokio::task::spawn_blocking(move || {
        let mut q = spool.lock().unwrap_or_else(|p| p.into_inner());
        (q.compact(), q.len())
    })
    .await;
    match left {
        Ok((Ok(()), 0)) => {}
        Ok((Ok(()), n)) => tracing::info!(samples = n, "unwritten samples kept in the spool file"),
        Ok((Err(e), n)) => tracing::error!(samples = n, error = %e, "cannot save the spool file"),
        Err(e) => tracing::error!(error = %e, "spool save task failed"),
    }
}

/// Writes queued samples oldest first until the queue is empty or a write fails.
async fn flush(ctx: &mut WriterCtx, stoppable: bool, outage: &mut bool) -> Flush {
    let mut flushed = 0u64;
    loop {
        if stoppable && ctx.stop.is_cancelled() {
            return Flush::Stopped;
        }
        // Clone the head so the lock is not held across the write.
        let head = ctx
            .spool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .cloned();
        let Some(sample) = head else {
            if *outage {
                tracing::info!(flushed, "database reachable again; spool flushed");
                *outage = false;
            }
            return Flush::Done;
        };
        match ctx.store.write(&sample).await {
            Ok(inserted) => {
                bump(if inserted {
                    &ctx.stats.written
                } else {
                    &ctx.stats.already_stored
                });
            }
            Err(e) if e.is_rejection() => {
                bump(&ctx.stats.rejected);
                tracing::error!(error = %e, sampled_at = %humantime::format_rfc3339_micros(sample.sampled_at),
                    "dropping a sample the database refuses");
            }
            Err(e) => {
                bump(&ctx.stats.write_errors);
                if !*outage {
                    tracing::warn!(error = %e, "cannot write samples; spooling until the database is back");
                    *outage = true;
                } else {
                    tracing::debug!(error = %e, "database still unreachable");
                }
                return Flush::Failed;
            }
        }
        flushed += 1;
        let mut q = ctx.spool.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = q.written(sample.sampled_at) {
            tracing::error!(error = %e, "cannot truncate the spool file");
        }
        ctx.stats.pending.store(q.len() as u64, Ordering::Relaxed);
    }
}

/// Serde glue for durations: seconds as a number, or humantime text (`200ms`, `1m 30s`).
mod duration {
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        if let Ok(secs) = t.parse::<f64>() {
            return from_secs(secs);
        }
        humantime::parse_duration(t)
            .map_err(|e| format!("`{t}` is not a duration ({e}); try `60`, `200ms` or `5m`"))
    }

    fn from_secs(secs: f64) -> Result<Duration, String> {
        Duration::try_from_secs_f64(secs).map_err(|_| format!("{secs} is not a number of seconds"))
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number of seconds or a duration such as `200ms`")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("{v} is not a number of seconds")))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            from_secs(v).map_err(E::custom)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::Validate;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, common::ConfigError> {
        let mut src = common::ConfigSource::new();
        for (k, v) in pairs {
            src = src.set(k, *v);
        }
        src.load::<Config>()
    }

    #[test]
    fn intervals_take_seconds_or_units() {
        assert_eq!(
            load(&[("interval", "60")]).unwrap().interval,
            Duration::from_secs(60)
        );
        assert_eq!(
            load(&[("interval", "0.2")]).unwrap().interval,
            Duration::from_millis(200)
        );
        assert_eq!(
            load(&[("interval", "200ms")]).unwrap().interval,
            Duration::from_millis(200)
        );
        assert_eq!(
            load(&[("interval", "5m")]).unwrap().interval,
            Duration::from_secs(300)
        );
        assert_eq!(Config::default().interval, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (k, v, want) in [
            ("interval", "soon", "`interval`"),
            ("interval", "-1", "`interval`"),
            ("interval", "0", "`interval`: must be at least 1ms"),
            (
                "interval",
                "1000000000000000000",
                "`interval`: must be at most 7 days",
            ),
            ("interval", "1e300", "`interval`"),
            (
                "drain_timeout",
                "8 days",
                "`drain_timeout`: must be at most 7 days",
            ),
            ("query_timeout", "0ms", "`query_timeout`"),
            ("database_url", "host=x port=notaport", "`database_url`"),
            ("host", "two words", "`host`"),
            ("spool_capacity", "0", "`spool_capacity`"),
            ("spool_file", "\"\"", "`spool_file`"),
            ("listen", "x", "listen"),
            ("admin_listen", "nowhere", "`admin_listen`"),
        ] {
            let e = load(&[(k, v)]).unwrap_err().to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
        }
    }

    #[test]
    fn the_config_prints_and_reads_back() {
        let c = Config {
            interval: Duration::from_millis(1500),
            host: Some("web1".into()),
            ..Config::default()
        };
        let text = toml::to_string(&c).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let back: Config = common::config::from_table(table).unwrap();
        assert_eq!(back, c.validate().unwrap());
    }
}
