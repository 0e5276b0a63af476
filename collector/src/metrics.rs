//! Prometheus metrics read from the collector's [`Stats`] when scraped, served on the admin listener.

use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge, Opts, Registry};

use crate::Stats;

type Getter = fn(&Stats) -> u64;

/// Mirrors [`Stats`] into counters and gauges at scrape time.
struct StatsCollector {
    stats: Arc<Stats>,
    counters: Vec<(IntCounter, Getter)>,
    gauges: Vec<(IntGauge, Getter)>,
    descs: Vec<Desc>,
    /// Counters advance by the difference since the last scrape; two concurrent scrapes must not
    /// both add it.
    lock: Mutex<()>,
}

impl Collector for StatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(self.counters.len() + self.gauges.len());
        for (c, get) in &self.counters {
            let now = get(&self.stats);
            let seen = c.get();
            if now > seen {
                c.inc_by(now - seen);
            }
            out.extend(c.collect());
        }
        for (g, get) in &self.gauges {
            g.set(i64::try_from(get(&self.stats)).unwrap_or(i64::MAX));
            out.extend(g.collect());
        }
        out
    }
}

/// A registry with every collector metric, fed from `stats`.
pub fn registry(stats: Arc<Stats>) -> Result<Registry, prometheus::Error> {
    let counters: Vec<(IntCounter, Getter)> = vec![
        (
            IntCounter::with_opts(Opts::new("collector_samples_total", "Samples taken"))?,
            Stats::produced,
        ),
        (
            IntCounter::with_opts(Opts::new(
                "collector_samples_written_total",
                "Samples the database stored",
            ))?,
            Stats::written,
        ),
        (
            IntCounter::with_opts(Opts::new(
                "collector_samples_already_stored_total",
                "Samples re-sent from the spool that the database already had",
            ))?,
            Stats::already_stored,
        ),
        (
            IntCounter::with_opts(Opts::new(
                "collector_samples_rejected_total",
                "Samples the database refused as invalid (dropped)",
            ))?,
            Stats::rejected,
        ),
        (
            IntCounter::with_opts(Opts::new(
                "collector_samples_dropped_total",
                "Samples dropped because the spool was full",
            ))?,
            Stats::dropped,
        ),
        (
            IntCounter::with_opts(Opts::new(
                "collector_sample_errors_total",
                "Sampling attempts that failed (unreadable /proc)",
            ))?,
            Stats::sample_errors,
        ),
        (
            IntCounter::with_opts(Opts::new(
                "collector_write_errors_total",
                "Failed write attempts (each retried)",
            ))?,
            Stats::write_errors,
        ),
    ];
    let gauges: Vec<(IntGauge, Getter)> = vec![(
        IntGauge::with_opts(Opts::new(
            "collector_spool_pending",
            "Samples waiting to be written",
        ))?,
        Stats::pending,
    )];
    let mut descs = Vec::new();
    for (c, _) in &counters {
        descs.extend(c.desc().into_iter().cloned());
    }
    for (g, _) in &gauges {
        descs.extend(g.desc().into_iter().cloned());
    }
    let registry = Registry::new();
    registry.register(Box::new(StatsCollector {
        stats,
        counters,
        gauges,
        descs,
        lock: Mutex::new(()),
    }))?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_follow_the_stats() {
        let stats = Arc::new(Stats::default());
        let reg = registry(stats.clone()).unwrap();
        crate::bump(&stats.produced);
        crate::bump(&stats.produced);
        let text = common::admin::render_metrics(&reg);
        assert!(text.contains("collector_samples_total 2"), "{text}");
        assert!(text.contains("# TYPE collector_samples_total counter"), "{text}");
        crate::bump(&stats.produced);
        let text = common::admin::render_metrics(&reg);
        assert!(text.contains("collector_samples_total 3"), "{text}");
        assert!(text.contains("collector_spool_pending 0"), "{text}");
    }
}
