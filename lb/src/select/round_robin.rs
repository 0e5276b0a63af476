//! nginx's smooth weighted round robin: every pick adds each usable server's weight to its current
//! weight, takes the largest, and subtracts the total from it, so 5/1/1 interleaves `a a b a c a a`.
//! As in nginx, where each worker process keeps its own current weights, each serving thread has
//! its own sequence: no lock or cache line is shared between threads per request.

use std::sync::Mutex;

use super::{Attempt, Key, Peers, Select};

/// Per-thread sequences kept; threads beyond this share them (by index modulo).
const SEQUENCES: usize = 16;

/// One thread's current weights, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Sequence(Mutex<Vec<i64>>);

/// Smooth weighted round robin.
#[derive(Debug)]
pub struct RoundRobin {
    /// Current weights, one per server, per serving thread; resized when the server count
    /// changes.
    current: Box<[Sequence]>,
}

impl Default for RoundRobin {
    fn default() -> Self {
        RoundRobin::new(0)
    }
}

impl RoundRobin {
    /// A selector for `n` servers.
    pub fn new(n: usize) -> Self {
        RoundRobin {
            current: (0..SEQUENCES).map(|_| Sequence(Mutex::new(vec![0; n]))).collect(),
        }
    }

    /// Picks among the servers for which `eligible` holds (least_conn breaks ties with it).
    pub fn pick_among(&self, peers: &dyn Peers, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let slot = &self.current[common::workers::current_index() % SEQUENCES];
        let mut current = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        if current.len() != peers.len() {
            current.clear();
            current.resize(peers.len(), 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for i in 0..peers.len() {
            if !eligible(i) {
                continue;
            }
            let w = i64::from(peers.effective_weight(i).max(1));
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }
}

impl Select for RoundRobin {
    fn pick(&self, peers: &dyn Peers, _key: Key<'_>, _attempt: &mut Attempt) -> Option<usize> {
        self.pick_among(peers, |i| peers.usable(i))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixed::{weights, Fixed};
    use super::*;

    fn picks(sel: &RoundRobin, peers: &dyn Peers, n: usize) -> String {
        (0..n)
            .map(|_| {
                let i = sel.pick(peers, Key::None, &mut Attempt::default()).unwrap();
                (b'a' + i as u8) as char
            })
            .collect()
    }

    #[test]
    fn weights_5_1_1_interleave_like_nginx() {
        let p = weights(&[5, 1, 1]);
        let rr = RoundRobin::new(3);
        assert_eq!(picks(&rr, &p, 14), "aabacaaaabacaa");
    }

    #[test]
    fn equal_weights_alternate() {
        let p = weights(&[1, 1, 1]);
        assert_eq!(picks(&RoundRobin::new(3), &p, 6), "abcabc");
    }

    #[test]
    fn unusable_servers_are_skipped_and_none_when_all_are() {
        let p = Fixed(vec![(1, true, 0), (1, false, 0), (2, true, 0)]);
        assert_eq!(picks(&RoundRobin::new(3), &p, 6), "caccac");
        let none = Fixed(vec![(1, false, 0), (1, false, 0)]);
        assert_eq!(
            RoundRobin::new(2).pick(&none, Key::None, &mut Attempt::default()),
            None
        );
    }
}
