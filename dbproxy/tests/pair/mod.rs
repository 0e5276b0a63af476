//! Shared pieces of the drills with two dbproxy instances coordinated through a real etcd: the
//! pair's configuration, dbproxy as a separate process that a drill can kill, writes that say
//! which server took them, and a TCP relay a drill can cut to partition one instance from one
//! server (a real socket in the path, closed for real); `netns` runs an instance in a network
//! namespace of its own, to cut it off with nftables.
#![allow(dead_code)]

pub mod netns;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dbproxy::config::Config;
use dbproxy::failover::{PromoteConfig, PromoteMethod};
use serde_json::Value;
use testkit::etcd::EtcdCluster;
use testkit::{free_port, wait_for, PgCluster, DEADLINE};
use tokio::sync::watch;

use crate::support::{admin_request, config_for};

/// The lease TTL the drills use (seconds): short, with room for a loaded CI machine (each etcd
/// request may take a third of it).
pub const TTL: u64 = 3;

/// A cluster with `standbys` standbys and a table `t` to write to.
pub async fn pg(standbys: usize) -> Result<Arc<PgCluster>> {
    let c =
        tokio::task::spawn_blocking(move || PgCluster::builder().standbys(standbys).password("pw").start())
            .await??;
    c.primary().psql("create table t (id bigint primary key)")?;
    c.wait_replicated()?;
    Ok(Arc::new(c))
}

/// An etcd cluster of `n` members.
pub async fn etcd(n: usize) -> Result<EtcdCluster> {
    tokio::task::spawn_blocking(move || EtcdCluster::start(n)).await?
}

/// A config for instance `name` of the pair: etcd at `endpoints`, a short lease, and every
/// promotion appended to `promotions` before it is made (so the drills count them).
pub fn pair_config(
    c: &PgCluster,
    endpoints: Vec<String>,
    prefix: &str,
    name: &str,
    promotions: &Path,
) -> Config {
    let mut cfg = config_for(c, Some("pw"));
    cfg.coordination.etcd = endpoints;
    cfg.coordination.prefix = prefix.into();
    cfg.coordination.lease_ttl = TTL;
    cfg.coordination.name = name.into();
    let promote = PromoteConfig {
        method: PromoteMethod::Exec,
        command: format!(
            "echo {{node}} >> {} && PGPASSWORD=pw psql -X -q -h {{host}} -p {{port}} -U postgres -d postgres -c 'select pg_promote()'",
            promotions.display()
        ),
        ..Default::default()
    };
    for n in c.nodes() {
        cfg.failover.nodes.insert(n.name().into(), promote.clone());
    }
    cfg
}

/// The promotions made so far, by node name.
pub fn promotions(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An instance's `/status`.
pub fn status(admin: SocketAddr) -> Result<Value> {
    let (code, body) = admin_request(admin, "GET", "/status")?;
    anyhow::ensure!(code == 200, "/status answered {code}");
    Ok(serde_json::from_str(&body)?)
}

/// `/status`'s coordination part.
pub fn coordination(admin: SocketAddr) -> Result<Value> {
    Ok(status(admin)?["record"]["coordination"].clone())
}

/// Waits until the instance holds the leader lease.
pub fn wait_leader(admin: SocketAddr, deadline: Duration) -> Result<()> {
    wait_for("the instance to hold the leader lease", deadline, || {
        Ok((coordination(admin)?["is_leader"] == true).then_some(()))
    })
}

/// The recorded primary as this instance's `/status` shows it.
pub fn recorded_primary(admin: SocketAddr) -> Result<Option<String>> {
    Ok(status(admin)?["record"]["primary"].as_str().map(str::to_string))
}

/// The value of the metric `name` (a line `name value`) in the instance's `/metrics`.
pub fn metric(admin: SocketAddr, name: &str) -> Result<f64> {
    let (_, body) = admin_request(admin, "GET", "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no metric {name}"))
}

/// dbproxy's binary with `config`, so a drill can SIGKILL it (or make it abort at a step).
pub struct Binary {
    pub child: Child,
    pub port: u16,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Binary {
    pub fn start(config: Config) -> Result<Binary> {
        Binary::start_with_env(config, &[])
    }

    /// Starts it with extra environment variables.
    pub fn start_with_env(config: Config, env: &[(&str, &str)]) -> Result<Binary> {
        Binary::spawn(config, env, None)
    }

    /// Starts it inside the network namespace `ns`, listening on the namespace's address.
    pub fn start_in(config: Config, ns: &netns::Netns) -> Result<Binary> {
        Binary::spawn(config, &[], Some(ns))
    }

    fn spawn(mut config: Config, env: &[(&str, &str)], ns: Option<&netns::Netns>) -> Result<Binary> {
        // Inside a namespace of its own every port is free.
        let port = free_port()?;
        let admin_port = free_port()?;
        let ip = ns.map_or("127.0.0.1".to_string(), |n| n.inside.to_string());
        config.listen = format!("{ip}:{port}");
        config.admin_listen = format!("{ip}:{admin_port}");
        // The namespace's address is reachable from the test's namespace only.
        config.admin_allow_open = ns.is_some();
        let dir = tempfile::tempdir()?;
        let path: PathBuf = dir.path().join("dbproxy.toml");
        std::fs::write(&path, toml::to_string(&config)?)?;
        let mut cmd = match ns {
            // `ip netns exec` execs the program in place, so killing the child kills dbproxy.
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name, env!("CARGO_BIN_EXE_dbproxy")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_dbproxy")),
        };
        let child = cmd
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("dbproxy.log"))?)
            .spawn()
            .context("starting dbproxy")?;
        let admin: SocketAddr = config.admin_listen.parse()?;
        let mut b = Binary {
            child,
            port,
            admin,
            dir,
        };
        wait_for("dbproxy's admin listener", DEADLINE, || {
            if let Some(s) = b.child.try_wait()? {
                anyhow::bail!("dbproxy exited: {s}; log:\n{}", b.log());
            }
            Ok(admin_request(admin, "GET", "/healthz").ok().map(|_| ()))
        })
        .map_err(|e| e.context(format!("dbproxy log:\n{}", b.log())))?;
        Ok(b)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dbproxy.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("dbproxy binary log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inserts `id` through the proxy on `port`; the server port that took it.
pub async fn write(port: u16, id: i64) -> Result<u16> {
    write_at("127.0.0.1", port, id).await
}

/// Inserts `id` through the proxy at `host:port`; the server port that took it.
pub async fn write_at(host: &str, port: u16, id: i64) -> Result<u16> {
    let conn = format!("host={host} port={port} user=postgres password=pw dbname=postgres connect_timeout=5");
    let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = c.await;
    });
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        client.query_one(
            "insert into t (id) values ($1) returning inet_server_port()",
            &[&id],
        ),
    )
    .await
    .context("the write hung")??;
    Ok(row.get::<_, i32>(0) as u16)
}

/// Writes through `port` until one is acknowledged (a fresh id each try); the server port.
pub async fn write_eventually(port: u16, next_id: &mut i64, deadline: Duration) -> Result<u16> {
    write_eventually_at("127.0.0.1", port, next_id, deadline).await
}

/// [`write_eventually`] through the proxy at `host:port`.
pub async fn write_eventually_at(
    host: &str,
    port: u16,
    next_id: &mut i64,
    deadline: Duration,
) -> Result<u16> {
    let end = Instant::now() + deadline;
    loop {
        *next_id += 1;
        match write_at(host, port, *next_id).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < end => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.context("no write acknowledged before the deadline")),
        }
    }
}

/// `SHOW POOL_NODES` through the proxy at `host:port`, by column name, one map per node.
pub async fn pool_nodes(host: &str, port: u16) -> Result<Vec<std::collections::BTreeMap<String, String>>> {
    let conn = format!("host={host} port={port} user=postgres password=pw dbname=postgres connect_timeout=5");
    let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = c.await;
    });
    let msgs = tokio::time::timeout(Duration::from_secs(10), client.simple_query("show pool_nodes"))
        .await
        .context("SHOW POOL_NODES hung")??;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// A TCP relay on a loopback port in front of `target`, on the test's runtime: every connection
/// is copied both ways to a fresh connection to `target` until [`Relay::cut`], which closes the
/// open ones and makes new ones close as soon as they are accepted (a peer that is gone, as
/// seen from one side only); [`Relay::heal`] lets connections through again.
pub struct Relay {
    /// The port to connect to instead of `target`'s.
    pub port: u16,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, _) = watch::channel(false);
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when the task is aborted) ends every copy.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                if *cuts.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut cut = cuts.subscribe();
                conns.spawn(async move {
                    let connect = tokio::net::TcpStream::connect(target);
                    let Ok(Ok(mut outbound)) = tokio::time::timeout(Duration::from_secs(5), connect).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(Relay { port, cut, task })
    }

    /// Closes every connection through the relay and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
