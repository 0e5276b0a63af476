//! Drills with two dbproxy instances coordinated through a real etcd in front of a real
//! PostgreSQL cluster: the leader killed (the other takes the lease within the TTL and writes go
//! on), the primary killed while both run (exactly one promotion, both route to the new
//! primary), and an instance cut off from etcd (it stops leading, never promotes, says so, keeps
//! the recorded primary, and follows the record again when etcd is back).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dbproxy::config::Config;
use dbproxy::failover::{PromoteConfig, PromoteMethod};
use serde_json::Value;
use support::{admin_request, config_for, Proxy};
use testkit::etcd::EtcdCluster;
use testkit::{free_port, wait_for, PgCluster, DEADLINE};

/// The lease TTL the drills use (seconds): short, with room for a loaded CI machine (each etcd
/// request may take a third of it).
const TTL: u64 = 3;

async fn pg() -> Result<Arc<PgCluster>> {
    let c = tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    c.primary().psql("create table t (id bigint primary key)")?;
    c.wait_replicated()?;
    Ok(Arc::new(c))
}

async fn etcd(n: usize) -> Result<EtcdCluster> {
    tokio::task::spawn_blocking(move || EtcdCluster::start(n)).await?
}

/// A config for instance `name` of the pair: etcd at `endpoints`, a short lease, and every
/// promotion appended to `promotions` before it is made (so the drills count them).
fn pair_config(c: &PgCluster, endpoints: Vec<String>, prefix: &str, name: &str, promotions: &Path) -> Config {
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

fn promotions(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `/status`'s coordination part.
fn coordination(admin: std::net::SocketAddr) -> Result<Value> {
    let (code, body) = admin_request(admin, "GET", "/status")?;
    anyhow::ensure!(code == 200, "/status answered {code}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["record"]["coordination"].clone())
}

fn wait_leader(admin: std::net::SocketAddr, deadline: Duration) -> Result<()> {
    wait_for("the instance to hold the leader lease", deadline, || {
        Ok((coordination(admin)?["is_leader"] == true).then_some(()))
    })
}

/// The recorded primary as this instance's `/status` shows it.
fn recorded_primary(admin: std::net::SocketAddr) -> Result<Option<String>> {
    let (_, body) = admin_request(admin, "GET", "/status")?;
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["record"]["primary"].as_str().map(str::to_string))
}

/// dbproxy's binary with `config`, so a drill can SIGKILL it.
struct Binary {
    child: Child,
    port: u16,
    admin: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn start(mut config: Config) -> Result<Binary> {
        let port = free_port()?;
        let admin_port = free_port()?;
        config.listen = format!("127.0.0.1:{port}");
        config.admin_listen = format!("127.0.0.1:{admin_port}");
        let dir = tempfile::tempdir()?;
        let path: PathBuf = dir.path().join("dbproxy.toml");
        std::fs::write(&path, toml::to_string(&config)?)?;
        let child = Command::new(env!("CARGO_BIN_EXE_dbproxy"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("dbproxy.log"))?)
            .spawn()
            .context("starting dbproxy")?;
        let admin: std::net::SocketAddr = config.admin_listen.parse()?;
        let mut b = Binary {
            child,
            port,
            admin,
            _dir: dir,
        };
        wait_for("dbproxy's admin listener", DEADLINE, || {
            if let Some(s) = b.child.try_wait()? {
                anyhow::bail!("dbproxy exited: {s}; log:\n{}", b.log());
            }
            Ok(admin_request(admin, "GET", "/healthz").ok().map(|_| ()))
        })?;
        Ok(b)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("dbproxy.log")).unwrap_or_default()
    }

    fn kill9(&mut self) -> Result<()> {
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
async fn write(port: u16, id: i64) -> Result<u16> {
    let conn =
        format!("host=127.0.0.1 port={port} user=postgres password=pw dbname=postgres connect_timeout=5");
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
async fn write_eventually(port: u16, next_id: &mut i64, deadline: Duration) -> Result<u16> {
    let end = Instant::now() + deadline;
    loop {
        *next_id += 1;
        match write(port, *next_id).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < end => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.context("no write acknowledged before the deadline")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_leader_dbproxy_is_killed_the_other_takes_the_lease_within_the_ttl() -> Result<()> {
    support::bounded(leader_killed()).await
}

async fn leader_killed() -> Result<()> {
    let c = pg().await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let mut a = Binary::start(pair_config(&c, etcd.endpoints(), "/drill1", "a", &counted))?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), "/drill1", "b", &counted))?;
    let st = coordination(b.admin)?;
    assert_eq!(st["is_leader"], false, "{st}");
    assert_eq!(st["leader"], "a", "{st}");
    assert_eq!(st["mode"], "follower", "{st}");
    let mut id = 0;
    assert_eq!(
        write_eventually(a.port, &mut id, DEADLINE).await?,
        c.node(0).port()
    );
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );
    let (code, body) = b.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 409, "a follower refuses a switchover: {body}");
    assert!(body.contains("leader lease") && body.contains("(a)"), "{body}");

    let killed = Instant::now();
    a.kill9()?;
    // Writes through b never depended on a.
    assert_eq!(write(b.port(), 1_000_000).await?, c.node(0).port());
    wait_leader(b.admin, Duration::from_secs(TTL) + Duration::from_secs(5))?;
    let took = killed.elapsed();
    eprintln!("lease taken over {took:?} after the leader was killed (TTL {TTL} s)");
    assert!(
        took <= Duration::from_secs(TTL) + Duration::from_millis(TTL * 1000 / 3 + 1000),
        "takeover took {took:?}"
    );
    assert_eq!(write(b.port(), 1_000_001).await?, c.node(0).port());
    // The new leader acts: a switchover through it works and is recorded.
    let (code, body) = b.admin("POST", "/nodes/1/promote")?;
    assert_eq!(code, 202, "{body}");
    wait_for("the switchover to be recorded", DEADLINE, || {
        Ok((recorded_primary(b.admin)?.as_deref() == Some(c.node(1).name())).then_some(()))
    })?;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    let metrics = b.admin_get("/metrics")?;
    assert!(metrics.contains("dbproxy_leader 1"), "{metrics}");
    assert!(metrics.contains("dbproxy_etcd_reachable 1"), "{metrics}");
    assert_eq!(
        promotions(&counted),
        ["node1"],
        "one promotion, by the new leader"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_is_promoted_once_and_both_instances_route_to_the_new_one() -> Result<()> {
    support::bounded(primary_killed()).await
}

async fn primary_killed() -> Result<()> {
    let c = pg().await?;
    let etcd = etcd(1).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    let a = Proxy::start(pair_config(&c, etcd.endpoints(), "/drill2", "a", &counted))?;
    wait_leader(a.admin, DEADLINE)?;
    let b = Proxy::start(pair_config(&c, etcd.endpoints(), "/drill2", "b", &counted))?;
    let mut id = 0;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    c.node(0).kill9()?;
    let new = c.node(1).port();
    assert_eq!(write_eventually(a.port(), &mut id, DEADLINE).await?, new);
    assert_eq!(write_eventually(b.port(), &mut id, DEADLINE).await?, new);
    for admin in [a.admin, b.admin] {
        wait_for("the record to name node1", DEADLINE, || {
            Ok((recorded_primary(admin)?.as_deref() == Some("node1")).then_some(()))
        })?;
    }
    assert_eq!(promotions(&counted), ["node1"], "exactly one promotion");
    let b_status = b.status()?;
    assert!(b_status["record"]["fenced"]["node0"].is_u64(), "{b_status}");
    assert!(
        b_status["history"].as_array().is_some_and(|h| h.is_empty()),
        "the follower ran no failover: {b_status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_cut_off_from_etcd_stops_leading_never_promotes_and_follows_again() -> Result<()> {
    support::bounded(partitioned()).await
}

async fn partitioned() -> Result<()> {
    let c = pg().await?;
    let etcd = etcd(3).await?;
    let dir = tempfile::tempdir()?;
    let counted = dir.path().join("promotions");
    // b talks to member 2 only, a to members 0 and 1: freezing member 2 cuts b off while the
    // etcd cluster keeps its quorum.
    let b_urls = vec![etcd.member(2).client_url().to_string()];
    let a_urls = vec![
        etcd.member(0).client_url().to_string(),
        etcd.member(1).client_url().to_string(),
    ];
    let b = Proxy::start(pair_config(&c, b_urls, "/drill3", "b", &counted))?;
    wait_leader(b.admin, DEADLINE)?;
    let a = Proxy::start(pair_config(&c, a_urls, "/drill3", "a", &counted))?;
    let mut id = 0;
    assert_eq!(
        write_eventually(a.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    let cut = Instant::now();
    etcd.member(2).sigstop()?;
    wait_for("b to stop leading and say etcd is unreachable", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["is_leader"] == false && s["etcd_reachable"] == false).then_some(s))
    })?;
    let stopped = cut.elapsed();
    assert!(
        stopped < Duration::from_secs(TTL),
        "b stopped acting {stopped:?} after the cut, not before its lease ran out"
    );
    wait_leader(a.admin, DEADLINE)?;
    let s = coordination(b.admin)?;
    assert!(
        s["mode"].as_str().unwrap_or("").contains("never promoting"),
        "{s}"
    );
    let metrics = b.admin_get("/metrics")?;
    assert!(metrics.contains("dbproxy_etcd_reachable 0"), "{metrics}");
    assert!(metrics.contains("dbproxy_leader 0"), "{metrics}");
    // Still routes to the recorded primary.
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(0).port()
    );

    // The primary dies: a promotes; b, cut off, does not.
    c.node(0).kill9()?;
    assert_eq!(
        write_eventually(a.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    assert_eq!(promotions(&counted), ["node1"], "only the leader promoted");
    assert_eq!(
        recorded_primary(b.admin)?.as_deref(),
        Some("node0"),
        "b still has the old record"
    );
    let e = write(b.port(), 2_000_000).await;
    assert!(e.is_err(), "b sends no write to node1 without the record: {e:?}");

    // etcd is back: b follows the record and routes to the new primary.
    etcd.member(2).sigcont()?;
    wait_for("b to follow the record again", DEADLINE, || {
        Ok((recorded_primary(b.admin)?.as_deref() == Some("node1")).then_some(()))
    })?;
    assert_eq!(
        write_eventually(b.port(), &mut id, DEADLINE).await?,
        c.node(1).port()
    );
    let s = wait_for("b to reach etcd again", DEADLINE, || {
        let s = coordination(b.admin)?;
        Ok((s["etcd_reachable"] == true).then_some(s))
    })?;
    assert_eq!(s["leader"], "a", "{s}");
    assert_eq!(s["is_leader"], false, "{s}");
    assert_eq!(promotions(&counted), ["node1"]);
    Ok(())
}
