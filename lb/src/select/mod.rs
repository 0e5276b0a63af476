//! Server selection: one pure algorithm per file behind the [`Select`] trait. No I/O, no clocks:
//! the caller describes the servers through [`Peers`] and each algorithm only picks an index.

mod chash;
mod crc32;
mod ip_hash;
mod least_conn;
mod round_robin;

pub use chash::ConsistentHash;
pub use crc32::{crc32, crc32_update};
pub use ip_hash::{addr_bytes as ip_hash_addr_bytes, IpHash};
pub use least_conn::LeastConn;
pub use round_robin::RoundRobin;

/// What a selector may know about the servers of one tier (primaries or backups).
pub trait Peers {
    /// How many servers there are (usable or not).
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The configured weight (what nginx's `ip_hash` walks).
    fn weight(&self, i: usize) -> u32;
    /// The weight in force now (lower during slow start).
    fn effective_weight(&self, i: usize) -> u32 {
        self.weight(i)
    }
    /// Whether the server may take this request: not down, healthy, not resting after failures,
    /// not already tried by this request.
    fn usable(&self, i: usize) -> bool;
    /// Requests in flight on the server.
    fn active(&self, i: usize) -> u32 {
        let _ = i;
        0
    }
}

/// What the request offers to hash on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// Nothing (round robin, least_conn).
    None,
    /// The client address bytes `ip_hash` uses: 3 for IPv4, 16 for IPv6.
    Addr(&'a [u8]),
    /// The CRC32 of the `hash` key.
    Hash(u32),
}

/// Per-request selection state kept across retries, as nginx keeps it in its peer data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempt {
    /// The running hash of `ip_hash`/`hash`, `None` before the first pick.
    pub hash: Option<u32>,
    /// Re-hashes so far; past 20 the hashing algorithms fall back to round robin, as nginx does.
    pub tries: u32,
}

/// A balancing algorithm.
pub trait Select: Send + Sync {
    /// Picks a usable server index of `peers`, or `None` when none is usable.
    fn pick(&self, peers: &dyn Peers, key: Key<'_>, attempt: &mut Attempt) -> Option<usize>;
}

/// A fixed set of servers for tests.
#[cfg(test)]
pub(crate) mod fixed {
    use super::Peers;

    /// One test server: (weight, usable, active).
    pub struct Fixed(pub Vec<(u32, bool, u32)>);

    impl Peers for Fixed {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn weight(&self, i: usize) -> u32 {
            self.0[i].0
        }
        fn usable(&self, i: usize) -> bool {
            self.0[i].1
        }
        fn active(&self, i: usize) -> u32 {
            self.0[i].2
        }
    }

    /// Servers with these weights, all usable and idle.
    pub fn weights(w: &[u32]) -> Fixed {
        Fixed(w.iter().map(|&w| (w, true, 0)).collect())
    }
}
