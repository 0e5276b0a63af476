//! The `samples` table as Rust: the [`Sample`] type (also the collector's JSON and spool format) and
//! the queries the collector and the webapp run against it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_postgres::types::Json;
use tokio_postgres::{Client, Row, Statement};

use crate::SchemaError;

/// One host's metrics at one instant; unique on (host, sampled_at).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The host the sample describes.
    pub host: String,
    /// When it was taken, in UTC, microsecond precision (what PostgreSQL stores); RFC 3339 in JSON.
    #[serde(with = "rfc3339")]
    pub sampled_at: SystemTime,
    /// CPU utilisation over the interval ending at `sampled_at`, 0-100; None when not measurable.
    pub cpu_percent: Option<f64>,
    /// 1-minute load average.
    pub load1: f64,
    /// 5-minute load average.
    pub load5: f64,
    /// 15-minute load average.
    pub load15: f64,
    /// Physical memory.
    pub mem_total_bytes: u64,
    /// Memory in use: total minus what is available without swapping.
    pub mem_used_bytes: u64,
    /// Swap space.
    pub swap_total_bytes: u64,
    /// Swap in use.
    pub swap_used_bytes: u64,
    /// Usage of each mounted filesystem.
    pub disks: Vec<Disk>,
    /// Byte counters of each network interface.
    pub net: Vec<NetIface>,
    /// Seconds since boot.
    pub uptime_seconds: f64,
    /// Number of processes.
    pub process_count: u32,
}

/// One mounted filesystem's usage, as `df` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Where it is mounted.
    pub mount: String,
    /// Its filesystem type (ext4, xfs, overlay, ...).
    pub fs_type: String,
    /// Its size.
    pub total_bytes: u64,
    /// The space in use.
    pub used_bytes: u64,
}

/// One network interface's counters since boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIface {
    /// The interface name.
    pub iface: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Truncates a time to whole microseconds, the precision of `timestamptz`, so that a sample read
/// back from the database equals the one written.
pub fn truncate_to_micros(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64),
        Err(_) => t,
    }
}

/// The idempotent insert: a sample already stored is silently skipped.
pub const INSERT: &str = "INSERT INTO samples (host, sampled_at, cpu_percent, load1, load5, load15, \
     mem_total_bytes, mem_used_bytes, swap_total_bytes, swap_used_bytes, disks, net, uptime_seconds, \
     process_count) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
     ON CONFLICT (host, sampled_at) DO NOTHING";

const COLUMNS: &str = "host, sampled_at, cpu_percent, load1, load5, load15, mem_total_bytes, \
     mem_used_bytes, swap_total_bytes, swap_used_bytes, disks, net, uptime_seconds, process_count";

/// Prepares [`INSERT`] once per connection.
pub async fn prepare_insert(client: &Client) -> Result<Statement, tokio_postgres::Error> {
    client.prepare(INSERT).await
}

/// Writes one sample with a statement from [`prepare_insert`]; Ok(false) when it was already stored.
pub async fn insert(client: &Client, stmt: &Statement, s: &Sample) -> Result<bool, tokio_postgres::Error> {
    let process_count = i32::try_from(s.process_count).unwrap_or(i32::MAX);
    let n = client
        .execute(
            stmt,
            &[
                &s.host,
                &s.sampled_at,
                &s.cpu_percent,
                &s.load1,
                &s.load5,
                &s.load15,
                &to_i64(s.mem_total_bytes),
                &to_i64(s.mem_used_bytes),
                &to_i64(s.swap_total_bytes),
                &to_i64(s.swap_used_bytes),
                &Json(&s.disks),
                &Json(&s.net),
                &s.uptime_seconds,
                &process_count,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// The newest sample of every host, ordered by host name.
pub async fn latest_per_host(client: &Client) -> Result<Vec<Sample>, SchemaError> {
    let sql = format!("SELECT DISTINCT ON (host) {COLUMNS} FROM samples ORDER BY host, sampled_at DESC");
    let rows = client.query(&sql, &[]).await.map_err(|source| SchemaError::Db {
        doing: "reading the latest samples",
        source,
    })?;
    rows.iter().map(from_row).collect()
}

/// The newest `limit` samples of `host`, newest first.
pub async fn history(client: &Client, host: &str, limit: i64) -> Result<Vec<Sample>, SchemaError> {
    let sql = format!("SELECT {COLUMNS} FROM samples WHERE host = $1 ORDER BY sampled_at DESC LIMIT $2");
    let rows = client
        .query(&sql, &[&host, &limit])
        .await
        .map_err(|source| SchemaError::Db {
            doing: "reading a host's history",
            source,
        })?;
    rows.iter().map(from_row).collect()
}

/// Decodes a row selected with the columns of [`latest_per_host`] / [`history`].
pub fn from_row(row: &Row) -> Result<Sample, SchemaError> {
    fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
        row: &'a Row,
        column: &'static str,
    ) -> Result<T, SchemaError> {
        row.try_get(column)
            .map_err(|source| SchemaError::Decode { column, source })
    }
    let Json(disks) = get::<Json<Vec<Disk>>>(row, "disks")?;
    let Json(net) = get::<Json<Vec<NetIface>>>(row, "net")?;
    Ok(Sample {
        host: get(row, "host")?,
        sampled_at: get(row, "sampled_at")?,
        cpu_percent: get(row, "cpu_percent")?,
        load1: get(row, "load1")?,
        load5: get(row, "load5")?,
        load15: get(row, "load15")?,
        mem_total_bytes: get::<i64>(row, "mem_total_bytes")?.max(0) as u64,
        mem_used_bytes: get::<i64>(row, "mem_used_bytes")?.max(0) as u64,
        swap_total_bytes: get::<i64>(row, "swap_total_bytes")?.max(0) as u64,
        swap_used_bytes: get::<i64>(row, "swap_used_bytes")?.max(0) as u64,
        disks,
        net,
        uptime_seconds: get(row, "uptime_seconds")?,
        process_count: get::<i32>(row, "process_count")?.max(0) as u32,
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Serde glue: `SystemTime` as an RFC 3339 UTC string with microseconds.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            host: "web1".into(),
            sampled_at: UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456),
            cpu_percent: Some(12.5),
            load1: 0.5,
            load5: 0.25,
            load15: 0.125,
            mem_total_bytes: 8 << 30,
            mem_used_bytes: 3 << 30,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
            disks: vec![Disk {
                mount: "/".into(),
                fs_type: "ext4".into(),
                total_bytes: 100,
                used_bytes: 40,
            }],
            net: vec![NetIface {
                iface: "eth0".into(),
                rx_bytes: 1,
                tx_bytes: 2,
            }],
            uptime_seconds: 100.5,
            process_count: 42,
        }
    }

    #[test]
    fn json_round_trip_keeps_microseconds() {
        let s = sample();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"sampled_at\":\"2026-11-18T"), "{text}");
        assert!(text.contains(".123456Z"), "{text}");
        let back: Sample = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn bad_timestamps_are_refused() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["sampled_at"] = "yesterday".into();
        let err = serde_json::from_value::<Sample>(v).unwrap_err().to_string();
        assert!(err.contains("timestamp") || err.contains("invalid"), "{err}");
    }

    #[test]
    fn truncation_drops_nanoseconds_only() {
        let t = UNIX_EPOCH + Duration::new(10, 123_456_789);
        assert_eq!(truncate_to_micros(t), UNIX_EPOCH + Duration::new(10, 123_456_000));
    }
}
