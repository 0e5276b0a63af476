//! nginx's `hash KEY consistent` (ketama): each server gets `160 * weight` points on a CRC32 ring,
//! derived from `host \0 port` and the previous point exactly as `ngx_http_upstream_init_chash`
//! does; a key's CRC32 finds the first point at or after it. An unusable server moves the request
//! to the next point; after 20 moves it falls back to round robin.

use super::crc32::crc32_update;
use super::{Attempt, Key, Peers, RoundRobin, Select};

/// A consistent-hash ring.
#[derive(Debug)]
pub struct ConsistentHash {
    /// (point hash, server index), sorted by hash, duplicates removed.
    points: Vec<(u32, usize)>,
    fallback: RoundRobin,
}

impl ConsistentHash {
    /// Builds the ring for servers named `host:port` (as written in the config) with weights.
    pub fn new(servers: &[(&str, u32)]) -> Self {
        let mut points = Vec::with_capacity(servers.iter().map(|s| s.1 as usize * 160).sum());
        for (index, &(name, weight)) in servers.iter().enumerate() {
            let (host, port) = split_port(name);
            let mut base = 0xFFFF_FFFFu32;
            base = crc32_update(base, host.as_bytes());
            base = crc32_update(base, &[0]);
            base = crc32_update(base, port.as_bytes());
            let mut prev: u32 = 0;
            for _ in 0..weight * 160 {
                let hash = !crc32_update(base, &prev.to_le_bytes());
                points.push((hash, index));
                prev = hash;
            }
        }
        points.sort_unstable();
        points.dedup_by_key(|p| p.0);
        ConsistentHash {
            points,
            fallback: RoundRobin::new(servers.len()),
        }
    }

    /// Index of the first point whose hash is at least `hash` (may be one past the end).
    fn find(&self, hash: u32) -> usize {
        self.points.partition_point(|p| p.0 < hash)
    }
}

/// nginx splits a trailing all-digit `:port` off the server name.
fn split_port(name: &str) -> (&str, &str) {
    match name.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => (name, ""),
    }
}

impl Select for ConsistentHash {
    fn pick(&self, peers: &dyn Peers, key: Key<'_>, attempt: &mut Attempt) -> Option<usize> {
        let key_hash = match key {
            Key::Hash(h) => h,
            _ => return self.fallback.pick(peers, key, attempt),
        };
        if attempt.tries > 20 || peers.len() == 1 || self.points.is_empty() {
            return self.fallback.pick(peers, key, attempt);
        }
        let mut at = attempt.hash.map_or_else(|| self.find(key_hash), |h| h as usize);
        loop {
            let server = self.points[at % self.points.len()].1;
            if server < peers.len() && peers.usable(server) {
                attempt.hash = Some(at as u32);
                return Some(server);
            }
            at = at.wrapping_add(1);
            attempt.tries += 1;
            if attempt.tries > 20 {
                attempt.hash = Some(at as u32);
                return self.fallback.pick(peers, key, attempt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::crc32;
    use super::super::fixed::{weights, Fixed};
    use super::*;

    fn ring() -> ConsistentHash {
        ConsistentHash::new(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)])
    }

    fn pick(r: &ConsistentHash, p: &dyn Peers, key: &str) -> usize {
        r.pick(p, Key::Hash(crc32(key.as_bytes())), &mut Attempt::default())
            .unwrap()
    }

    #[test]
    fn ring_has_160_points_per_weight_and_is_stable() {
        let r = ring();
        assert_eq!(r.points.len(), 480);
        let p = weights(&[1, 1, 1]);
        let first: Vec<_> = (0..50).map(|i| pick(&r, &p, &format!("/item/{i}"))).collect();
        let again: Vec<_> = (0..50)
            .map(|i| pick(&ring(), &p, &format!("/item/{i}")))
            .collect();
        assert_eq!(first, again);
        // Every server gets a fair share of 3000 keys.
        let mut counts = [0; 3];
        for i in 0..3000 {
            counts[pick(&r, &p, &format!("/k/{i}"))] += 1;
        }
        assert!(counts.iter().all(|&c| c > 600), "{counts:?}");
    }

    #[test]
    fn removing_a_server_moves_only_its_keys() {
        let r = ring();
        let all = weights(&[1, 1, 1]);
        let without_1 = Fixed(vec![(1, true, 0), (1, false, 0), (1, true, 0)]);
        for i in 0..500 {
            let k = format!("/k/{i}");
            let before = pick(&r, &all, &k);
            let after = pick(&r, &without_1, &k);
            if before != 1 {
                assert_eq!(before, after, "{k} moved although its server stayed");
            } else {
                assert_ne!(after, 1);
            }
        }
    }

    #[test]
    fn port_split_matches_nginx() {
        assert_eq!(split_port("web1:5000"), ("web1", "5000"));
        assert_eq!(split_port("web1"), ("web1", ""));
    }
}
