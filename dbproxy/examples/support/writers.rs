//! The drills' writers (`chain_drill`, `restart_drill`): clients inserting unique ids into table
//! `drill` through dbproxy (or straight to a node), reconnecting when their session is gone, and
//! logging every acknowledgement with the server that took it; plus what the drills read back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use testkit::PgCluster;
use tokio_util::sync::CancellationToken;

/// How long a statement may take before the writer gives up on its session.
pub const STATEMENT_LIMIT: Duration = Duration::from_secs(5);
/// How long a writer's connection attempt may take.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(10);
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
const INSERT: &str = "insert into drill values ($1, $2) returning inet_server_port()";

/// One acknowledged write: its id, the port of the server that took it (`inet_server_port()`),
/// when it was sent and acknowledged (and the acknowledgement as milliseconds since the epoch, to
/// compare with dbproxy's `/status` times).
pub struct Ack {
    pub id: i64,
    pub port: i32,
    pub sent: Instant,
    pub acked: Instant,
    pub acked_ms: u64,
}

/// What the writers saw.
#[derive(Default)]
pub struct Log {
    pub acks: Vec<Ack>,
    pub errors: BTreeMap<String, u64>,
}

pub fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn error_kind(e: &tokio_postgres::Error, connecting: bool) -> String {
    let base = match e.code() {
        Some(c) => c.code().to_string(),
        None if e.is_closed() => "closed".to_string(),
        None => "io".to_string(),
    };
    if connecting {
        format!("connect {base}")
    } else {
        base
    }
}

pub async fn connect(
    conn: &str,
) -> Result<(tokio_postgres::Client, tokio_postgres::Statement), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let stmt = client.prepare(INSERT).await?;
    Ok((client, stmt))
}

/// One writer with ids `w * 1e9 + n`: insert, record, reconnect when the connection is gone.
pub async fn writer(w: i32, conn: String, log: Arc<Mutex<Log>>, stop: CancellationToken) {
    let mut counter: i64 = 0;
    let mut session = None;
    while !stop.is_cancelled() {
        let Some((client, stmt)) = &session else {
            let err = match tokio::time::timeout(CONNECT_LIMIT, connect(&conn)).await {
                Ok(Ok(s)) => {
                    session = Some(s);
                    continue;
                }
                Ok(Err(e)) => error_kind(&e, true),
                Err(_) => "connect timeout".to_string(),
            };
            *lock(&log).errors.entry(err).or_default() += 1;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            }
            continue;
        };
        let id = i64::from(w) * 1_000_000_000 + counter;
        counter += 1;
        let sent = Instant::now();
        let r = tokio::time::timeout(STATEMENT_LIMIT, client.query_one(stmt, &[&id, &w])).await;
        let acked = Instant::now();
        match r {
            Ok(Ok(row)) => {
                let port: i32 = row.try_get(0).unwrap_or(-1);
                lock(&log).acks.push(Ack {
                    id,
                    port,
                    sent,
                    acked,
                    acked_ms: epoch_ms(SystemTime::now()),
                });
            }
            Ok(Err(e)) => {
                let closed = client.is_closed();
                *lock(&log).errors.entry(error_kind(&e, false)).or_default() += 1;
                if closed {
                    session = None;
                } else {
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
            Err(_) => {
                *lock(&log).errors.entry("statement timeout".into()).or_default() += 1;
                session = None;
            }
        }
    }
}

pub fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// Successful failover events in `/status`, oldest first.
pub fn failovers(status: &Value) -> Vec<Value> {
    status["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|e| e["kind"] == "failover" && e["error"].is_null() && !e["promoted"].is_null())
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The standbys streaming from node `p`, by name (empty when `p` cannot be asked).
pub fn streaming_from(c: &PgCluster, p: usize) -> Vec<String> {
    c.node(p)
        .psql_timeout(
            "select application_name from pg_stat_replication where state = 'streaming' order by 1",
            Duration::from_secs(5),
        )
        .map(|out| out.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Milliseconds since the epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writers running on a drill's runtime: what they saw, their stop signal and their tasks.
pub struct Writers {
    pub log: Arc<Mutex<Log>>,
    pub stop: CancellationToken,
    pub handles: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts `n` writers through `conn` on `rt` and waits until each has had a write acknowledged
/// (within `limit`, else they are stopped and the errors they saw are returned), then lets them
/// write for `load` seconds before the drill's first kill.
pub fn start_writers(
    rt: &tokio::runtime::Runtime,
    n: usize,
    conn: &str,
    limit: Duration,
    load: f64,
) -> Result<Writers, String> {
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = CancellationToken::new();
    let handles = (0..n)
        .map(|w| rt.spawn(writer(w as i32, conn.to_string(), log.clone(), stop.clone())))
        .collect();
    let deadline = Instant::now() + limit;
    loop {
        let seen: std::collections::HashSet<i64> =
            lock(&log).acks.iter().map(|a| a.id / 1_000_000_000).collect();
        if seen.len() == n {
            break;
        }
        if Instant::now() > deadline {
            stop.cancel();
            return Err(format!(
                "the writers did not all get a write through: {:?}",
                lock(&log).errors
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs_f64(load));
    Ok(Writers { log, stop, handles })
}

/// The client errors of several drills' records (each an `errors` object of kind → count),
/// added up and written `kind×n, ...` in kind order.
pub fn error_summary<'a>(records: impl IntoIterator<Item = &'a Value>) -> String {
    let mut errors: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for r in records {
        for (k, v) in r["errors"].as_object().into_iter().flatten() {
            *errors.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
        }
    }
    errors
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
