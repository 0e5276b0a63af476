//! A real browser (headless Chromium from Debian's `chromium` package) loads the front page and the
//! dashboard from a webapp backed by a real PostgreSQL server, checks the DOM after the scripts ran,
//! and keeps screenshots under `target/artifacts/` for a person to look at.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{config, insert_sample, wait_ready, App, FakePeer};
use tokio_util::sync::CancellationToken;

fn artifacts_dir() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs chromium headless with `args`, killing it if it has not finished within 90 s.
fn chromium(args: &[String]) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .stdin(Stdio::null());
    let out_path = profile.path().join("stdout");
    let err_path = profile.path().join("stderr");
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let mut child = cmd
        .spawn()
        .context("cannot run `chromium`: install Debian's package (apt-get install -y chromium)")?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "chromium did not finish within 90 s; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    ensure!(
        status.success(),
        "chromium failed ({status}); stderr:\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    Ok(stdout)
}

async fn browse(args: Vec<String>) -> Result<String> {
    tokio::task::spawn_blocking(move || chromium(&args)).await?
}

async fn screenshot(url: String, path: PathBuf) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    browse(vec![
        format!("--screenshot={}", path.display()),
        "--window-size=1280,900".into(),
        url,
    ])
    .await?;
    let len = std::fs::metadata(&path)
        .with_context(|| format!("no screenshot at {}", path.display()))?
        .len();
    ensure!(
        len > 10_000,
        "screenshot {} is suspiciously small ({len} bytes)",
        path.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_page_and_the_dashboard() -> Result<()> {
    let c = tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(0).start()).await??;
    let url = c.primary().conn_string();

    let stop = CancellationToken::new();
    let peer = FakePeer::default();
    peer.set(
        "/lb/status",
        200,
        r#"{"upstream":"webapps","algorithm":"ip_hash","servers":[
            {"addr":"127.0.0.1:8001","name":"web-1","healthy":true,"available":true,"requests":120},
            {"addr":"127.0.0.1:8002","name":"web-2","healthy":false,"available":false,"requests":7}]}"#,
    );
    peer.set(
        "/db/status",
        200,
        r#"{"primary":"0","nodes":[
            {"node_id":"0","hostname":"127.0.0.1","port":"5432","status":"up","role":"primary","replication_delay":"0"},
            {"node_id":"1","hostname":"127.0.0.1","port":"5433","status":"up","role":"standby","replication_delay":"0"},
            {"node_id":"2","hostname":"127.0.0.1","port":"5434","status":"down","role":"standby"}]}"#,
    );
    let addr = peer.serve(stop.clone()).await?;
    let mut cfg = config("web-browser", &url);
    cfg.lb_status_url = format!("http://{addr}/lb/status");
    cfg.dbproxy_status_url = format!("http://{addr}/db/status");
    cfg.dbproxy_admin_url = format!("http://{addr}/admin");
    let app = App::start(cfg).await?;
    wait_ready(&app).await?;
    for (i, cpu) in [12.0, 35.0, 20.0, 64.0, 41.0].iter().enumerate() {
        insert_sample(&url, "db-host", 1_795_000_000 + 60 * i as u64, *cpu).await?;
        insert_sample(&url, "web-host", 1_795_000_000 + 60 * i as u64, cpu / 2.0).await?;
    }

    let started = Instant::now();
    let dom = browse(vec!["--dump-dom".into(), app.url("/")]).await?;
    for needle in [
        "<strong id=\"instance\">web-browser</strong>",
        "<strong id=\"node-name\">node0</strong>",
        "<strong id=\"node-role\" class=\"role\">primary</strong>",
        "db-host",
        "web-host",
        "41.0%",
    ] {
        ensure!(dom.contains(needle), "front page DOM lacks {needle}:\n{dom}");
    }

    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard")]).await?;
    // These nodes exist only once dashboard.js has drawn the embedded snapshot.
    for needle in [
        "data-key=\"lb\"",
        "data-key=\"web:127.0.0.1:8002\"",
        "class=\"node down\" data-key=\"web:127.0.0.1:8002\"",
        "class=\"node primary\" data-key=\"db:0\"",
        "class=\"node standby\" data-key=\"db:1\"",
        "class=\"node down\" data-key=\"db:2\"",
        ">node 0 primary<",
        ">primary: 0<",
        ">webapps ip_hash<",
    ] {
        ensure!(dom.contains(needle), "dashboard DOM lacks {needle}:\n{dom}");
    }

    // A link to a node opens its details, with the switchover button for a healthy standby.
    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard#db:1")]).await?;
    for needle in [
        "class=\"node standby selected\" data-key=\"db:1\"",
        "<h2>node 1 standby</h2>",
        "<dt>replication_delay</dt>",
        "<dd>5433</dd>",
        "<button id=\"switchover\">switch over to node 1</button>",
    ] {
        ensure!(dom.contains(needle), "dashboard details lack {needle}:\n{dom}");
    }
    // No switchover is offered for the primary.
    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard#db:0")]).await?;
    ensure!(dom.contains("<h2>node 0 primary</h2>"), "{dom}");
    ensure!(!dom.contains("id=\"switchover\""), "{dom}");

    // A failover at dbproxy shows up in the events list, recorded by the webapp.
    peer.set(
        "/db/status",
        200,
        r#"{"primary":"1","nodes":[
            {"node_id":"0","hostname":"127.0.0.1","port":"5432","status":"down","role":"primary"},
            {"node_id":"1","hostname":"127.0.0.1","port":"5433","status":"up","role":"primary","replication_delay":"0"},
            {"node_id":"2","hostname":"127.0.0.1","port":"5434","status":"down","role":"standby"}]}"#,
    );
    common::poll("failover event recorded", Duration::from_secs(20), || async {
        let v = app.get("/dashboard/state").await?.json()?;
        Ok(v["events"].to_string().contains("primary changed").then_some(()))
    })
    .await?;
    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard")]).await?;
    for needle in [
        "primary changed: node 0 → node 1",
        "node 0: up → down",
        "class=\"node down\" data-key=\"db:0\"",
        "class=\"node primary\" data-key=\"db:1\"",
    ] {
        ensure!(
            dom.contains(needle),
            "dashboard after failover lacks {needle}:\n{dom}"
        );
    }

    let dir = artifacts_dir()?;
    screenshot(app.url("/"), dir.join("webapp-index.png")).await?;
    screenshot(app.url("/dashboard#db:1"), dir.join("webapp-dashboard.png")).await?;
    eprintln!(
        "browser checks and screenshots took {:?}; screenshots in {}",
        started.elapsed(),
        dir.display()
    );

    stop.cancel();
    app.stop().await?;
    drop(c);
    Ok(())
}
