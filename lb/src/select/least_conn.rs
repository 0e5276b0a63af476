//! Weighted least connections, as nginx's `least_conn`: the usable server with the fewest active
//! requests per unit of weight wins; ties are broken by smooth weighted round robin.

use super::{Attempt, Key, Peers, RoundRobin, Select};

/// Weighted least connections.
#[derive(Debug, Default)]
pub struct LeastConn {
    ties: RoundRobin,
}

impl LeastConn {
    /// A selector for `n` servers.
    pub fn new(n: usize) -> Self {
        LeastConn {
            ties: RoundRobin::new(n),
        }
    }
}

impl Select for LeastConn {
    fn pick(&self, peers: &dyn Peers, _key: Key<'_>, _attempt: &mut Attempt) -> Option<usize> {
        // Compare active/weight by cross-multiplying, as nginx does, to stay in integers.
        let mut best: Option<(u64, u64)> = None;
        for i in 0..peers.len() {
            if !peers.usable(i) {
                continue;
            }
            let (a, w) = (
                u64::from(peers.active(i)),
                u64::from(peers.effective_weight(i).max(1)),
            );
            if best.is_none_or(|(ba, bw)| a * bw < ba * w) {
                best = Some((a, w));
            }
        }
        let (ba, bw) = best?;
        self.ties.pick_among(peers, |i| {
            peers.usable(i)
                && u64::from(peers.active(i)) * bw == ba * u64::from(peers.effective_weight(i).max(1))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixed::Fixed;
    use super::*;

    fn pick(s: &LeastConn, p: &Fixed) -> Option<usize> {
        s.pick(p, Key::None, &mut Attempt::default())
    }

    #[test]
    fn fewest_active_per_weight_wins() {
        let s = LeastConn::new(3);
        assert_eq!(
            pick(&s, &Fixed(vec![(1, true, 3), (1, true, 1), (1, true, 2)])),
            Some(1)
        );
        // 4 active at weight 4 (1 per unit) beats 2 active at weight 1.
        assert_eq!(
            pick(&s, &Fixed(vec![(1, true, 2), (4, true, 4), (1, true, 9)])),
            Some(1)
        );
        // The idle server is unusable, so the next best wins.
        assert_eq!(
            pick(&s, &Fixed(vec![(1, false, 0), (1, true, 5), (1, true, 4)])),
            Some(2)
        );
        assert_eq!(pick(&s, &Fixed(vec![(1, false, 0)])), None);
    }

    #[test]
    fn ties_rotate_by_weight() {
        let s = LeastConn::new(3);
        let p = Fixed(vec![(2, true, 0), (1, true, 0), (1, true, 7)]);
        let order: Vec<_> = (0..6).map(|_| pick(&s, &p).unwrap()).collect();
        assert_eq!(order, vec![0, 1, 0, 0, 1, 0]);
    }
}
