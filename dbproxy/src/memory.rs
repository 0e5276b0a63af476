//! The process-wide budget for large client messages (`limits.max_message_memory`).
//!
//! A message up to [`LARGE_MESSAGE`] bytes fits the buffers every connection has anyway. A larger
//! one is held whole while it is read, then copied towards the server, so it costs about twice
//! its size until it has been sent on and the client's read buffer has shrunk back. Each such
//! message is charged twice its announced size when its header arrives; when the charge would
//! take the total past the budget, the session ends with 53200 (out of memory) instead of
//! reading it. So however many sessions send large messages at once, what they hold stays
//! under the budget, rather than `max_connections` × `max_message_size`.
//!
//! Written by hand: a counter with a compare-and-swap is all it takes, and the charge must
//! follow a connection's buffer rather than an `await` scope (a semaphore permit's life).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

/// Messages larger than this are charged (the size past which a connection's buffers are
/// given back once the message has passed; see `backend::LARGE_BUFFER`).
pub const LARGE_MESSAGE: usize = 1024 * 1024;

/// The budget and what is charged against it.
#[derive(Debug)]
pub struct Budget {
    /// The most that may be charged at once (0: no limit).
    limit: AtomicUsize,
    /// Charged now.
    used: AtomicUsize,
    /// `dbproxy_message_memory_bytes`.
    gauge: IntGauge,
}

impl Budget {
    /// A budget of `limit` bytes (0: no limit), shown by `gauge`.
    pub fn new(limit: usize, gauge: IntGauge) -> Budget {
        Budget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
            gauge,
        }
    }

    /// The limit in force; a reload may change it (charges already made stay).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the limit (a reload).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes; false (and nothing charged) when that would pass the limit.
    fn try_charge(&self, n: usize) -> bool {
        let limit = self.limit();
        let charged = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.checked_add(n)?;
                (limit == 0 || after <= limit).then_some(after)
            });
        match charged {
            Ok(before) => {
                self.gauge.set((before + n) as i64);
                true
            }
            Err(_) => false,
        }
    }

    fn release(&self, n: usize) {
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        self.gauge.set(before.saturating_sub(n) as i64);
    }
}

/// What one connection has charged; given back when it is released or dropped.
#[derive(Debug, Default)]
pub struct Charge {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Charge {
    /// Charges against `budget` from now on.
    pub fn on(budget: Arc<Budget>) -> Charge {
        Charge {
            budget: Some(budget),
            bytes: 0,
        }
    }

    /// Charges for one message of `size` bytes, if it is large; the error names the budget
    /// when it cannot take it. Without a budget, nothing is charged.
    pub fn message(&mut self, size: usize) -> Result<(), usize> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        if size <= LARGE_MESSAGE {
            return Ok(());
        }
        let n = size.saturating_mul(2);
        if !budget.try_charge(n) {
            return Err(budget.limit());
        }
        self.bytes += n;
        Ok(())
    }

    /// Gives back everything charged (the large buffers are gone).
    pub fn release(&mut self) {
        if let Some(b) = &self.budget {
            if self.bytes > 0 {
                b.release(self.bytes);
            }
        }
        self.bytes = 0;
    }

    /// Whether anything is charged.
    pub fn holds(&self) -> bool {
        self.bytes > 0
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stay_under_the_limit_and_come_back() {
        let gauge = IntGauge::new("t", "t").unwrap();
        let budget = Arc::new(Budget::new(10 << 20, gauge.clone()));
        let mut a = Charge::on(budget.clone());
        let mut b = Charge::on(budget.clone());
        a.message(1000).unwrap();
        assert!(!a.holds(), "a small message is not charged");
        a.message(4 << 20).unwrap();
        assert_eq!((budget.used(), gauge.get()), (8 << 20, 8 << 20));
        assert_eq!(b.message(2 << 20), Err(10 << 20), "12 MiB would pass 10");
        assert!(!b.holds());
        a.release();
        b.message(2 << 20).unwrap();
        assert_eq!(budget.used(), 4 << 20);
        drop(b);
        assert_eq!((budget.used(), gauge.get()), (0, 0));
        budget.set_limit(0);
        let mut c = Charge::on(budget.clone());
        c.message(1 << 30).unwrap();
        assert_eq!(budget.used(), 2 << 30, "no limit");
        let mut none = Charge::default();
        none.message(1 << 30).unwrap();
        assert!(!none.holds());
    }
}
