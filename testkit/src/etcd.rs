//! Real etcd for tests: one member, or several forming one cluster (for partition drills), in a
//! temporary directory on free loopback ports, with the means to crash, freeze, stop and restart
//! any member. Uses Debian's `etcd-server` (`/usr/bin/etcd`).
//!
//! Readiness is etcd's own `/health` endpoint, polled with a deadline.
//!
//! ```no_run
//! let etcd = testkit::etcd::EtcdCluster::start(1).unwrap();
//! let urls = etcd.endpoints(); // ["http://127.0.0.1:PORT"]
//! etcd.member(0).sigstop().unwrap(); // it still accepts connections but never answers
//! etcd.member(0).sigcont().unwrap();
//! ```

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{free_port, wait_for, DEADLINE};

/// The etcd binary: `$ETCD_BIN`, else Debian's.
pub fn etcd_bin() -> Result<PathBuf> {
    let p = std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from);
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "etcd not found at {} (install Debian's etcd-server, or set ETCD_BIN)",
            p.display()
        )
    }
}

/// A running etcd cluster of one or more members.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members forming one cluster and waits until every one reports healthy.
    pub fn start(n: usize) -> Result<EtcdCluster> {
        EtcdCluster::start_also_on(n, None)
    }

    /// Like [`EtcdCluster::start`], each member also taking clients on `also` (same port), for
    /// a client in another network namespace; [`EtcdMember::client_url`] stays the loopback one.
    pub fn start_also_on(n: usize, also: Option<std::net::IpAddr>) -> Result<EtcdCluster> {
        if n == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let bin = etcd_bin()?;
        let dir = tempfile::Builder::new().prefix("testkit-etcd-").tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("testkit-{}-{}", std::process::id(), ports[0].0);
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| {
                let name = format!("m{i}");
                let data_dir = dir.path().join(&name);
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let listen = match also {
                    Some(ip) => format!("{client_url},http://{ip}:{client}"),
                    None => client_url.clone(),
                };
                let args = vec![
                    format!("--name={name}"),
                    format!("--data-dir={}", data_dir.display()),
                    format!("--listen-client-urls={listen}"),
                    format!("--advertise-client-urls={client_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster={}", initial.join(",")),
                    "--initial-cluster-state=new".to_string(),
                    format!("--initial-cluster-token={token}"),
                    // Short raft timings: elections after a member dies take about a second.
                    "--heartbeat-interval=100".to_string(),
                    "--election-timeout=1000".to_string(),
                ];
                EtcdMember {
                    name,
                    client_url,
                    log_path: dir.path().join(format!("m{i}.log")),
                    bin: bin.clone(),
                    args,
                    child: Mutex::new(None),
                }
            })
            .collect::<Vec<_>>();
        let cluster = EtcdCluster { members, _dir: dir };
        for m in &cluster.members {
            m.spawn()?;
        }
        for m in &cluster.members {
            m.wait_healthy()?;
        }
        Ok(cluster)
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Member `i`.
    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// Every member's log, for a failed test.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            out.push_str(&format!("==== etcd {} ====\n{}\n", m.name, m.log_tail(40)));
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("testkit: a test failed; etcd logs follow\n{}", self.logs());
        }
        for m in &self.members {
            m.shutdown_now();
        }
    }
}

/// One etcd member.
pub struct EtcdMember {
    name: String,
    client_url: String,
    log_path: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
}

impl EtcdMember {
    /// Its name in the cluster (`m0`, `m1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its client URL (`http://127.0.0.1:PORT`).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process is alive (it may be frozen by SIGSTOP).
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().expect("child poisoned");
        match guard.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn spawn(&self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning etcd member {}", self.name))?;
        *self.child.lock().expect("child poisoned") = Some(child);
        Ok(())
    }

    /// Starts the member again (after [`EtcdMember::kill9`] or [`EtcdMember::stop`]) and waits
    /// until it reports healthy (which needs a quorum of its cluster running).
    pub fn start(&self) -> Result<()> {
        if self.is_running() {
            bail!("etcd member {} is already running", self.name);
        }
        self.spawn()?;
        self.wait_healthy()
    }

    /// Waits until `/health` answers `true`.
    pub fn wait_healthy(&self) -> Result<()> {
        wait_for(
            &format!("etcd member {} to be healthy", self.name),
            DEADLINE,
            || {
                if !self.is_running() {
                    bail!("etcd member {} exited; log:\n{}", self.name, self.log_tail(30));
                }
                Ok(self.healthy().ok().filter(|&h| h).map(|_| ()))
            },
        )
    }

    /// Asks `/health` once, with short timeouts.
    pub fn healthy(&self) -> Result<bool> {
        let addr = self
            .client_url
            .trim_start_matches("http://")
            .parse::<std::net::SocketAddr>()?;
        let t = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        write!(
            s,
            "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.take(64 * 1024).read_to_string(&mut body)?;
        Ok(body.contains("\"health\":\"true\""))
    }

    /// Crashes the member (SIGKILL).
    pub fn kill9(&self) -> Result<()> {
        let Some(mut child) = self.child.lock().expect("child poisoned").take() else {
            bail!("etcd member {} is not running", self.name);
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Stops the member cleanly (SIGTERM) and waits until it has exited.
    pub fn stop(&self) -> Result<()> {
        let Some(mut child) = self.child.lock().expect("child poisoned").take() else {
            bail!("etcd member {} is not running", self.name);
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGCONT);
        kill(pid, Signal::SIGTERM)?;
        let exited = wait_for(&format!("etcd member {} to stop", self.name), DEADLINE, || {
            Ok(child.try_wait()?.map(|_| ()))
        });
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        exited
    }

    /// Freezes the member (SIGSTOP): its sockets still accept connections but nothing answers.
    pub fn sigstop(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Thaws a member frozen by [`EtcdMember::sigstop`].
    pub fn sigcont(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let guard = self.child.lock().expect("child poisoned");
        let pid = guard
            .as_ref()
            .map(|c| c.id() as i32)
            .ok_or_else(|| anyhow!("etcd member {} is not running", self.name))?;
        kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    fn shutdown_now(&self) {
        let child = self.child.lock().map(|mut g| g.take()).unwrap_or(None);
        if let Some(mut child) = child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_member_starts_stops_and_restarts() {
        let etcd = EtcdCluster::start(1).unwrap();
        let m = etcd.member(0);
        assert!(m.healthy().unwrap());
        m.sigstop().unwrap();
        assert!(m.healthy().is_err(), "a frozen member accepts but never answers");
        m.sigcont().unwrap();
        m.wait_healthy().unwrap();
        m.kill9().unwrap();
        assert!(m.healthy().is_err(), "a killed member refuses connections");
        m.start().unwrap();
        m.stop().unwrap();
        assert!(!m.is_running());
        m.start().unwrap();
    }

    #[test]
    fn three_members_keep_a_quorum_when_one_dies() {
        let etcd = EtcdCluster::start(3).unwrap();
        assert_eq!(etcd.endpoints().len(), 3);
        etcd.member(2).kill9().unwrap();
        etcd.member(0).wait_healthy().unwrap();
        etcd.member(2).start().unwrap();
        for i in 0..3 {
            assert!(etcd.member(i).healthy().unwrap(), "member {i}");
        }
    }
}
