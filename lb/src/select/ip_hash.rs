//! nginx's `ip_hash`, transcribed from `ngx_http_upstream_get_ip_hash_peer`: the hash starts at 89,
//! folds the address bytes in as `hash = (hash * 113 + byte) % 6271`, then `hash % total_weight`
//! walks the configured weights. A server that cannot take the request makes it hash again (the
//! running hash is kept across retries); after 20 re-hashes it falls back to round robin.

use super::{Attempt, Key, Peers, RoundRobin, Select};

/// Where nginx's ip_hash starts.
const START: u32 = 89;

/// nginx-compatible ip_hash.
#[derive(Debug, Default)]
pub struct IpHash {
    fallback: RoundRobin,
}

impl IpHash {
    /// A selector for `n` servers.
    pub fn new(n: usize) -> Self {
        IpHash {
            fallback: RoundRobin::new(n),
        }
    }
}

/// The address bytes nginx hashes: the first three octets of IPv4, all sixteen of IPv6.
/// An IPv4-mapped IPv6 address counts as IPv4, as a client of an IPv4 nginx listener would.
pub fn addr_bytes(ip: std::net::IpAddr, buf: &mut [u8; 16]) -> usize {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            buf[..3].copy_from_slice(&v4.octets()[..3]);
            3
        }
        std::net::IpAddr::V6(v6) => {
            buf.copy_from_slice(&v6.octets());
            16
        }
    }
}

impl Select for IpHash {
    fn pick(&self, peers: &dyn Peers, key: Key<'_>, attempt: &mut Attempt) -> Option<usize> {
        let addr = match key {
            Key::Addr(a) => a,
            _ => return self.fallback.pick(peers, key, attempt),
        };
        let total: u32 = (0..peers.len()).map(|i| peers.weight(i)).sum();
        if attempt.tries > 20 || peers.len() == 1 || total == 0 {
            return self.fallback.pick(peers, key, attempt);
        }
        let mut hash = attempt.hash.unwrap_or(START);
        loop {
            for &b in addr {
                hash = (hash * 113 + u32::from(b)) % 6271;
            }
            let mut w = hash % total;
            let mut p = 0;
            while w >= peers.weight(p) {
                w -= peers.weight(p);
                p += 1;
            }
            if peers.usable(p) {
                attempt.hash = Some(hash);
                return Some(p);
            }
            attempt.tries += 1;
            if attempt.tries > 20 {
                attempt.hash = Some(hash);
                return self.fallback.pick(peers, key, attempt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixed::{weights, Fixed};
    use super::*;
    use std::net::IpAddr;

    /// An independent straight transcription of nginx's C loop for a first pick, for comparison.
    fn nginx_first_pick(ip: [u8; 4], w: &[u32]) -> usize {
        let mut hash: u32 = 89;
        for b in &ip[..3] {
            hash = (hash * 113 + *b as u32) % 6271;
        }
        let total: u32 = w.iter().sum();
        let mut ww = hash % total;
        let mut p = 0;
        while ww >= w[p] {
            ww -= w[p];
            p += 1;
        }
        p
    }

    fn pick(sel: &IpHash, peers: &dyn Peers, ip: &str) -> usize {
        let mut buf = [0; 16];
        let n = addr_bytes(ip.parse::<IpAddr>().unwrap(), &mut buf);
        sel.pick(peers, Key::Addr(&buf[..n]), &mut Attempt::default())
            .unwrap()
    }

    #[test]
    fn fixed_addresses_map_as_in_nginx() {
        // Computed by hand with nginx's loop: 127.0.0.x hashes to 4040 (even, so server 0),
        // 10.0.0.x to 2565 (server 1), 192.168.1.x to 154 (0), 172.16.5.x to 3526 (0).
        let p = weights(&[1, 1]);
        let s = IpHash::new(2);
        assert_eq!(pick(&s, &p, "127.0.0.1"), 0);
        assert_eq!(pick(&s, &p, "127.0.0.200"), 0, "the last octet is ignored");
        assert_eq!(pick(&s, &p, "10.0.0.7"), 1);
        assert_eq!(pick(&s, &p, "192.168.1.10"), 0);
        assert_eq!(pick(&s, &p, "172.16.5.4"), 0);
    }

    #[test]
    fn agrees_with_a_transcription_of_nginx_over_many_addresses() {
        for w in [&[1u32, 1][..], &[1, 1, 1], &[5, 1, 1], &[2, 3]] {
            let p = weights(w);
            let s = IpHash::new(w.len());
            for a in (0u32..4000).map(|i| i.wrapping_mul(2_654_435_761)) {
                let ip = a.to_be_bytes();
                let text = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
                assert_eq!(pick(&s, &p, &text), nginx_first_pick(ip, w), "{text} {w:?}");
            }
        }
    }

    #[test]
    fn a_down_server_rehashes_with_the_running_hash() {
        // 127.0.0.1 lands on 0; with 0 down the bytes are folded again until 1 comes up.
        let p = Fixed(vec![(1, false, 0), (1, true, 0)]);
        assert_eq!(pick(&IpHash::new(2), &p, "127.0.0.1"), 1);
        let none = Fixed(vec![(1, false, 0), (1, false, 0)]);
        let mut buf = [0; 16];
        let n = addr_bytes("127.0.0.1".parse().unwrap(), &mut buf);
        let mut att = Attempt::default();
        assert_eq!(IpHash::new(2).pick(&none, Key::Addr(&buf[..n]), &mut att), None);
        assert!(att.tries > 20);
    }

    #[test]
    fn ipv6_clients_hash_all_sixteen_bytes_like_nginx() {
        let w = [1u32, 2, 1];
        let p = weights(&w);
        let s = IpHash::new(3);
        for i in 0u32..500 {
            let x = i.wrapping_mul(2_654_435_761).to_be_bytes();
            let ip = std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                u16::from(x[0]),
                7,
                0,
                u16::from(x[1]),
                u16::from(x[2]),
                1,
            );
            let mut hash: u32 = 89;
            for b in ip.octets() {
                hash = (hash * 113 + u32::from(b)) % 6271;
            }
            let mut ww = hash % 4;
            let mut want = 0;
            while ww >= w[want] {
                ww -= w[want];
                want += 1;
            }
            assert_eq!(pick(&s, &p, &ip.to_string()), want, "{ip}");
        }
    }

    #[test]
    fn ipv6_uses_all_sixteen_bytes_and_mapped_v4_counts_as_v4() {
        let mut buf = [0; 16];
        assert_eq!(addr_bytes("::1".parse().unwrap(), &mut buf), 16);
        assert_eq!(addr_bytes("::ffff:10.0.0.7".parse().unwrap(), &mut buf), 3);
        assert_eq!(&buf[..3], &[10, 0, 0]);
    }
}
