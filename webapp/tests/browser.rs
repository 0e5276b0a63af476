//! A real browser (headless Chromium from Debian's `chromium` package) loads the front page and the
//! dashboard from a webapp backed by a real PostgreSQL server, checks the DOM after the scripts ran,
//! and keeps screenshots under `target/artifacts/` for a person to look at.

mod chromium;
mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use chromium::{artifacts_dir, browse, screenshot};
use common::{config, insert_sample, wait_ready, App, FakePeer};
use tokio_util::sync::CancellationToken;

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
    cfg.operator_password = common::OPERATOR_PASSWORD.into();
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

    // A link to a node opens its details; a healthy standby offers the switchover, first only
    // as a login link.
    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard#db:1")]).await?;
    for needle in [
        "class=\"node standby selected\" data-key=\"db:1\"",
        "<h2>node 1 standby</h2>",
        "<dt>replication_delay</dt>",
        "<dd>5433</dd>",
        "<a id=\"login-to-switch\" href=\"/dashboard/login\">",
    ] {
        ensure!(dom.contains(needle), "dashboard details lack {needle}:\n{dom}");
    }
    ensure!(!dom.contains("id=\"switchover\""), "{dom}");

    // The browser logs in: a page on the same site (same host, the peer's port) submits the login
    // form, the webapp's redirect lands on the dashboard with the session cookie, and the button
    // is there (the fragment carries over the redirect).
    peer.set(
        "/login",
        200,
        &format!(
            "<!doctype html><html><body><form id=\"f\" method=\"post\" action=\"{}\">\
             <input name=\"password\" value=\"{}\"></form>\
             <script>document.getElementById(\"f\").submit()</script></body></html>",
            app.url("/dashboard/login#db:1"),
            common::OPERATOR_PASSWORD
        ),
    );
    let dom = browse(vec!["--dump-dom".into(), format!("http://{addr}/login")]).await?;
    for needle in [
        "<meta name=\"csrf-token\" content=\"",
        "<button id=\"logout\">log out</button>",
        "<h2>node 1 standby</h2>",
        "<button id=\"switchover\">switch over to node 1</button>",
    ] {
        ensure!(dom.contains(needle), "logged-in dashboard lacks {needle}:\n{dom}");
    }
    // The operator's view, with the switchover button, for a person to look at.
    screenshot(
        format!("http://{addr}/login"),
        artifacts_dir()?.join("webapp-dashboard-operator.png"),
    )
    .await?;
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
