//! The `lb` binary as a user runs it: `--check-config`, `--nginx-conf`, SIGHUP reload with the
//! access log on stderr, and SIGTERM draining to exit 0.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use support::proc::{Proc, LB};
use support::{get_once, wait_for, Backend};

/// The shared example nginx.conf: `shared/` sits beside the repository.
fn example_conf() -> String {
    let beside = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/examples/nginx.conf");
    if std::path::Path::new(beside).exists() {
        beside.to_string()
    } else {
        "/work/shared/examples/nginx.conf".to_string()
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], testkit::free_port()?)))
}

fn toml_config(listen: SocketAddr, admin: SocketAddr, servers: &[&Backend]) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|b| format!("{{ addr = \"{}\" }}", b.addr))
        .collect();
    format!(
        "listen = \"{listen}\"\nadmin_listen = \"{admin}\"\n[upstream]\nservers = [{}]\n[timeouts]\nshutdown_grace = \"5s\"\n",
        list.join(", ")
    )
}

#[test]
fn check_config_accepts_the_shared_nginx_conf_and_reports_ignored_directives() -> Result<()> {
    let out = Command::new(LB)
        .args(["--check-config", "--nginx-conf", &example_conf()])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("line 3: `user` ignored"), "{stderr}");
    assert!(stdout.contains("algorithm = \"ip_hash\""), "{stdout}");
    assert!(stdout.contains("web1:5000"), "{stdout}");

    // Starting for real resolves the hosts: web1 does not exist here, and the error says so.
    let out = Command::new(LB)
        .args(["--nginx-conf", &example_conf()])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("web1"), "{stderr}");
    Ok(())
}

#[test]
fn bad_configs_are_refused_with_the_key_or_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let toml = dir.path().join("lb.toml");
    std::fs::write(
        &toml,
        "[upstream]\nservers = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n",
    )?;
    let out = Command::new(LB)
        .args(["--check-config", "--config"])
        .arg(&toml)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.servers[0].weight"));

    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        "http {\n  server {\n    listen 80;\n    location / { autoindex on; }\n  }\n}\n",
    )?;
    let out = Command::new(LB)
        .arg("--check-config")
        .arg("--nginx-conf")
        .arg(&conf)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 4") && stderr.contains("autoindex"),
        "{stderr}"
    );

    // An admin listener off loopback needs a token, or a stated purpose: lb refuses to start.
    std::fs::write(&toml, "[upstream]\nservers = [{ addr = \"127.0.0.1:1\" }]\n")?;
    let admin = "admin_listen=0.0.0.0:0";
    for (extra, code) in [
        (&["--set", admin][..], 2),
        (&["--check-config", "--set", admin][..], 2),
        (
            &["--check-config", "--set", admin, "--set", "admin_token=s3cret"][..],
            0,
        ),
        (
            &["--check-config", "--set", admin, "--set", "admin_allow_open=true"][..],
            0,
        ),
    ] {
        let out = Command::new(LB).arg("--config").arg(&toml).args(extra).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {stderr}");
        if code == 2 {
            assert!(
                stderr.contains("admin_listen") && stderr.contains("admin_token"),
                "{stderr}"
            );
        }
        // The token is a secret: --check-config does not print it.
        assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_conf_with_loopback_servers_is_served_like_nginx() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let listen = free_addr()?;
    let admin = free_addr()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "events {{ worker_connections 64; }}\nhttp {{\n  upstream app {{\n    ip_hash;\n    \
             server {} max_fails=3 fail_timeout=30s;\n    server {} max_fails=3 fail_timeout=30s;\n  }}\n  \
             server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://app;\n      \
             proxy_set_header Host $host;\n    }}\n  }}\n}}\n",
            a.addr, b.addr
        ),
    )?;
    let mut lb = Proc::spawn(&[
        "--nginx-conf",
        conf.to_str().context("path")?,
        "--set",
        &format!("admin_listen={admin}"),
    ])?;
    let first = wait_for("lb to serve", || async { get_once(listen, "/").await.ok() }).await?;
    assert_eq!(first.0, 200);
    // ip_hash: 127.0.0.x always lands on the same server.
    for _ in 0..10 {
        assert_eq!(get_once(listen, "/").await?.1, first.1);
    }
    lb.signal("-TERM")?;
    assert_eq!(lb.wait_exit(Duration::from_secs(15))?, 0, "{}", lb.stderr());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_server_list_and_sigterm_exits_cleanly() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let listen = free_addr()?;
    let admin = free_addr()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, toml_config(listen, admin, &[&a]))?;
    let mut lb = Proc::spawn(&["--config", path.to_str().context("path")?])?;
    let r = wait_for("lb to serve", || async { get_once(listen, "/").await.ok() }).await?;
    assert_eq!(r.1, "a");
    std::fs::write(&path, toml_config(listen, admin, &[&b]))?;
    lb.signal("-HUP")?;
    wait_for("the reload to apply", || async {
        get_once(listen, "/")
            .await
            .ok()
            .filter(|(_, n)| n == "b")
            .map(|_| ())
    })
    .await?;
    // A broken file on reload keeps the old config running.
    std::fs::write(&path, "listen = 5")?;
    lb.signal("-HUP")?;
    wait_for("the failed reload to be logged", || async {
        lb.stderr().contains("reload failed").then_some(())
    })
    .await?;
    assert_eq!(get_once(listen, "/").await?.1, "b");
    let log = lb.stderr();
    assert!(
        log.contains("\"GET / HTTP/1.1\" 200"),
        "combined access log line missing: {log}"
    );
    let metrics = support::admin_get(admin, "/metrics").await?;
    assert!(metrics.contains("lb_requests_total"), "{metrics}");
    lb.signal("-TERM")?;
    assert_eq!(lb.wait_exit(Duration::from_secs(15))?, 0, "{}", lb.stderr());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_structured_line_per_request() -> Result<()> {
    let a = Backend::start("a").await;
    let (listen, admin) = (free_addr()?, free_addr()?);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, toml_config(listen, admin, &[&a]))?;
    let mut lb = Proc::spawn(&[
        "--config",
        path.to_str().context("path")?,
        "--log-format",
        "json",
        "--set",
        "access_log.format=json",
    ])?;
    wait_for("lb to serve", || async { get_once(listen, "/").await.ok() }).await?;
    get_once(listen, "/json-check?x=1").await?;
    let line = wait_for("the access log line", || async {
        lb.stderr()
            .lines()
            .find(|l| l.contains("/json-check"))
            .map(str::to_string)
    })
    .await?;
    let v: serde_json::Value = serde_json::from_str(&line).with_context(|| line.clone())?;
    assert_eq!(v["target"], "lb::access", "{line}");
    assert_eq!(v["status"], 200, "{line}");
    assert_eq!(v["method"], "GET", "{line}");
    assert_eq!(v["uri"], "/json-check?x=1", "{line}");
    assert_eq!(v["remote_addr"], "127.0.0.1", "{line}");
    assert_eq!(v["upstream"], a.addr.to_string(), "{line}");
    lb.signal("-TERM")?;
    assert_eq!(lb.wait_exit(Duration::from_secs(15))?, 0, "{}", lb.stderr());
    Ok(())
}
