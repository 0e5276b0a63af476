//! A network namespace for one dbproxy instance, joined to the test's own namespace by a veth
//! pair, so a drill can partition that instance with nftables rules inside the namespace (the
//! host's rules are never touched): packets it sends to a port are dropped, as a real network
//! partition drops them, until the rules are removed. Needs root (`ip netns`, `nft`).

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The nftables table the partition rules live in (inside the namespace only).
const TABLE: &str = "hastack_partition";

/// A network namespace with a veth pair: `outside` is the test's end (PostgreSQL and etcd must
/// listen there, and let `inside` in), `inside` the namespace's.
pub struct Netns {
    pub name: String,
    pub outside: Ipv4Addr,
    pub inside: Ipv4Addr,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates the namespace `hastack-<pid>` and a /30 link to it in 10.217.0.0/16 (one per test
    /// process, so parallel test binaries do not collide).
    pub fn create() -> Result<Netns> {
        let pid = std::process::id();
        let name = format!("hastack-{pid}");
        let block = (pid % 16384) * 4;
        let base = [10, 217, (block / 256) as u8, (block % 256) as u8];
        let outside = Ipv4Addr::new(base[0], base[1], base[2], base[3] + 1);
        let inside = Ipv4Addr::new(base[0], base[1], base[2], base[3] + 2);
        let (host_if, ns_if) = (format!("hs{pid}h"), format!("hs{pid}n"));
        // Leftovers of an earlier process with the same pid.
        let _ = run(&["ip", "netns", "del", &name]);
        let _ = run(&["ip", "link", "del", &host_if]);
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns {
            name,
            outside,
            inside,
        };
        let n = ns.name.as_str();
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", n])?;
        run(&["ip", "addr", "add", &format!("{outside}/30"), "dev", &host_if])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            n,
            "ip",
            "addr",
            "add",
            &format!("{inside}/30"),
            "dev",
            &ns_if,
        ])?;
        run(&["ip", "netns", "exec", n, "ip", "link", "set", &ns_if, "up"])?;
        run(&["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Drops every packet between the namespace and `outside`'s `ports`, both ways (nftables
    /// rules in the namespace's output and input hooks): established connections hang, new ones
    /// time out. One way only would not do: data already on an open connection (a watch) would
    /// still arrive.
    pub fn cut(&self, ports: &[u16]) -> Result<()> {
        let set = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let o = self.outside;
        let rules = format!(
            "table inet {TABLE} {{\n  \
               chain out {{\n    type filter hook output priority 0; policy accept;\n    \
                 ip daddr {o} tcp dport {{ {set} }} counter drop\n  }}\n  \
               chain in {{\n    type filter hook input priority 0; policy accept;\n    \
                 ip saddr {o} tcp sport {{ {set} }} counter drop\n  }}\n}}\n"
        );
        self.nft_file(&rules)
    }

    /// Packets the cut dropped so far (its rule's counter).
    pub fn dropped(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "list", "table", "inet", TABLE])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no counter in {text}"))
    }

    /// Removes the cut.
    pub fn heal(&self) -> Result<()> {
        run(&[
            "ip", "netns", "exec", &self.name, "nft", "delete", "table", "inet", TABLE,
        ])
    }

    fn nft_file(&self, rules: &str) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rules.nft");
        std::fs::write(&path, rules)?;
        run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "nft",
            "-f",
            &path.to_string_lossy(),
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the other end.
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}
