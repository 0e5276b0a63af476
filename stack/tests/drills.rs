//! End-to-end drills on the local topology, every piece a real process: `stack::up` brings up
//! PostgreSQL (primary + standby), dbproxy, two webapps, lb and the collector on free ports; the page
//! is checked through lb; a webapp is killed and no GET fails; the collector's samples arrive
//! through dbproxy; the primary is killed and dbproxy fails over while samples keep arriving;
//! the webapp is brought back, and the old primary comes back on its own as a standby of the new one
//! (dbproxy's automatic rejoin, which `stack` turns on); `down` stops it all.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use stack::{http_get, Ports, UpOptions};

/// Free ports for one topology, all distinct: each stays bound until the picker is dropped, so
/// the kernel cannot hand the same port out twice (it did: PostgreSQL and dbproxy once got the
/// same one, and dbproxy could not bind it), and none is one that the other test of this file
/// was handed.
#[derive(Default)]
struct PortPicker(Vec<std::net::TcpListener>);

fn handed_out(port: u16) -> bool {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut h = HANDED.lock().unwrap();
    if h.contains(&port) {
        return true;
    }
    h.push(port);
    false
}

impl PortPicker {
    fn port(&mut self) -> u16 {
        loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            self.0.push(l);
            if !handed_out(p) {
                return p;
            }
        }
    }

    /// Two consecutive free ports (webapps, PostgreSQL nodes take a run of ports).
    fn pair(&mut self) -> u16 {
        loop {
            let p = self.port();
            if p < 65000 {
                if let Ok(next) = std::net::TcpListener::bind(("127.0.0.1", p + 1)) {
                    self.0.push(next);
                    if !handed_out(p + 1) {
                        return p;
                    }
                }
            }
        }
    }
}

/// Stops the topology even when an assertion fails.
struct Down(stack::procs::State);
impl Drop for Down {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in self.0.started() {
                let log = std::fs::read_to_string(self.0.log(&name)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "----- {name} -----\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        stack::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0.root);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_topology_comes_up_and_survives_a_webapp_kill_and_a_primary_kill() {
    let mut pick = PortPicker::default();
    let ports = Ports {
        lb: pick.port(),
        lb_admin: pick.port(),
        dbproxy: pick.port(),
        dbproxy_admin: pick.port(),
        webapp: pick.pair(),
        postgres: pick.pair(),
        collector_admin: pick.port(),
        etcd: pick.pair(),
    };
    drop(pick);
    let state_dir = std::env::temp_dir().join(format!("stack-drill-{}", std::process::id()));
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_stack"))
        .parent()
        .unwrap()
        .to_path_buf();
    let opts = UpOptions {
        state_dir: state_dir.clone(),
        standbys: 1,
        ports: ports.clone(),
        collector_interval: "500ms".into(),
        bin_dir: Some(bin_dir.clone()),
        proxies: 1,
    };
    let state = match stack::up(&opts).await {
        Ok(s) => s,
        Err(e) => {
            let state = stack::procs::State::new(&state_dir).unwrap();
            let _down = Down(state);
            panic!("stack up failed: {e:#}");
        }
    };
    let state = Down(state);

    // The page through lb names the instance and the database node that answered, with its role.
    let (code, body) = http_get(ports.lb, "/").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("web1") || body.contains("web2"),
        "no instance name: {body}"
    );
    assert!(
        body.contains("pg0") || body.contains("pg1"),
        "no database node: {body}"
    );

    // The dashboard's switchover through lb's public port needs an operator login: the custom
    // header alone is refused, and the password stack made for this run logs in.
    let (code, refused) = raw(
        ports.lb,
        "POST /dashboard/switchover/1 HTTP/1.1\r\nHost: x\r\nx-hastack-switchover: 1\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 401, "{refused}");
    let password = std::fs::read_to_string(state.0.root.join(stack::OPERATOR_PASSWORD_FILE)).unwrap();
    let form = format!("password={}", password.trim());
    let (code, head) = raw(
        ports.lb,
        &format!(
            "POST /dashboard/login HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert!(head.contains("HttpOnly; SameSite=Strict"), "{head}");

    // Kill one webapp: lb's retries and health checks keep every GET working.
    let killed = if body.contains("web1") { "web1" } else { "web2" };
    state.0.signal(killed, Signal::SIGKILL).unwrap();
    let survivor = if killed == "web1" { "web2" } else { "web1" };
    for i in 0..100 {
        let (code, body) = http_get(ports.lb, "/").await.unwrap();
        assert_eq!(code, 200, "GET {i} after killing {killed}: {body}");
        assert!(body.contains(survivor), "GET {i} not served by {survivor}");
    }

    // The collector's samples arrive in the database through dbproxy.
    let url = format!("postgres://app:app-secret@127.0.0.1:{}/app", ports.dbproxy);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = client
            .query_one("select count(*) from samples", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no collector samples arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the primary: dbproxy promotes pg1, the collector's writes resume, the session opened
    // above survives, and the page keeps working through lb.
    let before: i64 = client
        .query_one("select count(*) from samples", &[])
        .await
        .unwrap()
        .get(0);
    state.0.signal("pg0", Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(ports.dbproxy_admin, "/status").await.unwrap_or_default();
        if body.contains("\"kind\":\"failover\"") && body.contains("\"promoted\":\"pg1\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no failover to pg1: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let n: i64 = client
            .query_one("select count(*) from samples", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n >= before + 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no samples stored after the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = http_get(ports.lb, "/").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("pg1"), "the page names the new primary: {body}");

    // The collector lost no sample across the failover: every sample it took is stored, once.
    let (_, metrics) = http_get(ports.collector_admin, "/metrics").await.unwrap();
    let taken: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("collector_samples_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no collector_samples_total in {metrics}"));
    loop {
        let row = client
            .query_one("select count(*), count(distinct sampled_at) from samples", &[])
            .await
            .unwrap();
        let (stored, distinct): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(stored, distinct, "duplicate samples");
        if stored >= taken {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{taken} samples taken, {stored} stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bring the webapp back: it serves through lb again. The old primary comes back on its own:
    // dbproxy's automatic rejoin (pg_rewind) restarts it as a standby of pg1, then unfences it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut web = std::process::Command::new(bin_dir.join("webapp"));
    web.arg("--config").arg(state.0.config(&format!("{killed}.toml")));
    state.0.spawn(killed, &mut web, None).unwrap();
    loop {
        let (code, body) = http_get(ports.lb, "/").await.unwrap_or_default();
        if code == 200 && body.contains(killed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{killed} never served again through lb"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack::procs::reap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = http_get(ports.dbproxy_admin, "/status").await.unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let pg0 = &status["nodes"][0];
        if pg0["pg_status"] == "up" && pg0["pg_role"] == "standby" && pg0["fenced"] == false {
            assert_eq!(status["primary"], 1, "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pg0 never came back as a standby: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Writes through dbproxy still land on pg1, not on pg0, now its standby.
    let port: i32 = client
        .query_one("select inet_server_port() from samples for update limit 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, ports.postgres + 1, "the primary is pg1");

    // Status lists everything; down stops everything.
    let running: Vec<_> = stack::status(&state.0)
        .into_iter()
        .filter(|(_, pid)| pid.is_some())
        .collect();
    assert_eq!(running.len(), 7, "{running:?}");
    assert_eq!(stack::down(&state.0), 7);
    assert!(stack::status(&state.0).iter().all(|(_, pid)| pid.is_none()));
}

/// How many samples the collector stored (0 while the query fails).
async fn samples(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("select count(*) from samples", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// Whether the dbproxy with admin port `admin` holds the leader lease (false when it is down).
async fn leads(admin: u16) -> bool {
    let (_, body) = http_get(admin, "/status").await.unwrap_or_default();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    status["record"]["coordination"]["is_leader"] == true
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_proxies_the_page_and_the_collector_survive_killing_the_leader_dbproxy() {
    let mut pick = PortPicker::default();
    let ports = Ports {
        lb: pick.port(),
        lb_admin: pick.port(),
        dbproxy: pick.pair(),
        dbproxy_admin: pick.pair(),
        webapp: pick.pair(),
        postgres: pick.pair(),
        collector_admin: pick.port(),
        etcd: pick.pair(),
    };
    drop(pick);
    let state_dir = std::env::temp_dir().join(format!("stack-proxies-{}", std::process::id()));
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_stack"))
        .parent()
        .unwrap()
        .to_path_buf();
    let opts = UpOptions {
        state_dir: state_dir.clone(),
        standbys: 1,
        ports: ports.clone(),
        collector_interval: "500ms".into(),
        bin_dir: Some(bin_dir),
        proxies: 2,
    };
    let state = match stack::up(&opts).await {
        Ok(s) => s,
        Err(e) => {
            let state = stack::procs::State::new(&state_dir).unwrap();
            let _down = Down(state);
            panic!("stack up failed: {e:#}");
        }
    };
    let state = Down(state);
    let admins = [ports.dbproxy_admin, ports.dbproxy_admin + 1];

    // Exactly one instance leads.
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        let (a, b) = (leads(admins[0]).await, leads(admins[1]).await);
        if a != b {
            break usize::from(b);
        }
        assert!(Instant::now() < deadline, "not exactly one leader: {a} {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (code, body) = http_get(ports.lb, "/").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let other = 1 - leader;
    let url = format!(
        "postgres://app:app-secret@127.0.0.1:{}/app",
        ports.dbproxy + other as u16
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);

    // Kill the leader: the other takes the lease within the TTL (10 s), the webapps and the
    // collector move to it (their connection settings list both).
    let killed = Instant::now();
    state
        .0
        .signal(&stack::dbproxy_name(leader), Signal::SIGKILL)
        .unwrap();
    let before = samples(&client).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(ports.lb, "/").await.unwrap_or_default();
        if code == 200 && (body.contains("pg0") || body.contains("pg1")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page never came back: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the page served again {:?} after the kill", killed.elapsed());
    while samples(&client).await < before + 2 {
        assert!(
            Instant::now() < deadline,
            "no collector samples through the other dbproxy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while !leads(admins[other]).await {
        assert!(
            Instant::now() < deadline,
            "the other dbproxy never took the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "lease taken over {:?} after the leader dbproxy was killed",
        killed.elapsed()
    );
    // The dashboard (through lb) lists both instances and follows the lease.
    let new_leader = stack::dbproxy_name(other);
    loop {
        let (_, body) = http_get(ports.lb, "/dashboard/state").await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let list = v["dbproxies"].as_array().cloned().unwrap_or_default();
        let named = |n: &str| {
            list.iter()
                .find(|i| i["instance"] == n)
                .cloned()
                .unwrap_or_default()
        };
        if list.len() == 2
            && named(&new_leader)["is_leader"] == true
            && named(&new_leader)["etcd_reachable"] == true
            && list.iter().any(|i| i["reachable"] == false)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard does not show {new_leader} leading and the other down: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = stack::status(&state.0)
        .into_iter()
        .filter(|(_, pid)| pid.is_some())
        .count();
    assert_eq!(
        running, 8,
        "pg0, pg1, etcd, one dbproxy, web1, web2, lb, collector"
    );
}

/// Sends `request` as it is to 127.0.0.1:`port`; returns the status and the whole answer.
async fn raw(port: u16, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s")
        .expect("an exchange");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}
