//! Health-check statistics of one node, counted as pgpool-II counts them for
//! `SHOW POOL_HEALTH_CHECK_STATS` and `pcp_health_check_stats`: checks run, passed and failed,
//! retries, check durations and when each kind of outcome last happened. No I/O; the checker
//! records, the admin answers read a snapshot.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Checks run.
    pub total: u64,
    /// Checks that passed (possibly after retries).
    pub success: u64,
    /// Checks that failed after every retry.
    pub fail: u64,
    /// Checks skipped (pgpool skips checks of detached nodes; dbproxy checks every node).
    pub skip: u64,
    /// Retries over all checks.
    pub retry: u64,
    /// The most retries one check needed.
    pub max_retry: u32,
    /// The longest check, in milliseconds.
    pub max_ms: u64,
    /// The shortest check, in milliseconds (0 before the first).
    pub min_ms: u64,
    /// Milliseconds over all checks, for the average.
    pub sum_ms: u64,
    /// When the last check ended.
    pub last: Option<SystemTime>,
    /// When the last passing check ended.
    pub last_success: Option<SystemTime>,
    /// When a check was last skipped.
    pub last_skip: Option<SystemTime>,
    /// When the last failing check ended.
    pub last_fail: Option<SystemTime>,
}

impl Counts {
    /// Retries per check, as pgpool prints it (`%f`).
    pub fn average_retry(&self) -> f64 {
        self.per_check(self.retry)
    }

    /// Milliseconds per check, as pgpool prints it (`%f`).
    pub fn average_ms(&self) -> f64 {
        self.per_check(self.sum_ms)
    }

    fn per_check(&self, v: u64) -> f64 {
        let n = self.total.saturating_sub(self.skip);
        if n == 0 {
            0.0
        } else {
            v as f64 / n as f64
        }
    }
}

/// The counters of one node (the checker task records, readers take snapshots).
#[derive(Debug, Default)]
pub struct HealthStats {
    counts: Mutex<Counts>,
}

impl HealthStats {
    /// Records one check that ended at `at`, took `took` and needed `retries` retries.
    pub fn record(&self, ok: bool, retries: u32, took: Duration, at: SystemTime) {
        let ms = took.as_millis().min(u64::MAX as u128) as u64;
        let mut c = self.counts.lock().expect("health stats poisoned");
        c.min_ms = if c.total == c.skip { ms } else { c.min_ms.min(ms) };
        c.total += 1;
        c.retry += u64::from(retries);
        c.max_retry = c.max_retry.max(retries);
        c.max_ms = c.max_ms.max(ms);
        c.sum_ms = c.sum_ms.saturating_add(ms);
        c.last = Some(at);
        if ok {
            c.success += 1;
            c.last_success = Some(at);
        } else {
            c.fail += 1;
            c.last_fail = Some(at);
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> Counts {
        *self.counts.lock().expect("health stats poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_as_pgpool_does() {
        let s = HealthStats::default();
        assert_eq!(s.snapshot().average_ms(), 0.0);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        s.record(true, 0, Duration::from_millis(18), t);
        s.record(true, 2, Duration::from_millis(3), t);
        s.record(false, 1, Duration::from_millis(7), t + Duration::from_secs(1));
        let c = s.snapshot();
        assert_eq!((c.total, c.success, c.fail, c.skip), (3, 2, 1, 0));
        assert_eq!((c.retry, c.max_retry), (3, 2));
        assert_eq!((c.max_ms, c.min_ms), (18, 3));
        assert!((c.average_ms() - 28.0 / 3.0).abs() < 1e-9);
        assert!((c.average_retry() - 1.0).abs() < 1e-9);
        assert_eq!(c.last_success, Some(t));
        assert_eq!(c.last_fail, Some(t + Duration::from_secs(1)));
        assert_eq!(c.last, c.last_fail);
        assert_eq!(c.last_skip, None);
    }
}
