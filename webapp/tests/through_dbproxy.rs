//! The webapp through dbproxy (run in-process on loopback) to a real primary and standby: the schema
//! is migrated through the proxy, the page names the node that actually answered (its name, port
//! and role agree), and the dashboard reads dbproxy's real `/status`.

mod common;

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use common::{config, wait_ready, App};
use dbproxy::config::{Config, HealthConfig, LimitsConfig, NodeConfig, UserConfig};
use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_through_dbproxy_names_the_node_that_answered() -> Result<()> {
    let c = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(1).password("pw").start())
            .await??,
    );
    let proxy_cfg = Config {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        nodes: c
            .nodes()
            .iter()
            .map(|n| NodeConfig {
                name: n.name().to_string(),
                host: "127.0.0.1".into(),
                port: n.port(),
                weight: 1,
            })
            .collect(),
        users: vec![UserConfig {
            name: "postgres".into(),
            password: Some("pw".into()),
            ..UserConfig::default()
        }],
        health: HealthConfig {
            period: 0.2,
            timeout: 2.0,
            rise: 1,
            fall: 1,
            password: "pw".into(),
            ..HealthConfig::default()
        },
        limits: LimitsConfig {
            startup_timeout: 2.0,
            ..LimitsConfig::default()
        },
        ..Config::default()
    };
    let proxy_cfg = ::common::Validate::validate(proxy_cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let (proxy_addr, admin_addr) = (listener.local_addr()?, admin.local_addr()?);
    let proxy_stop = CancellationToken::new();
    let proxy = tokio::spawn(dbproxy::run_with_admin(
        listener,
        Some(admin),
        proxy_cfg,
        proxy_stop.clone(),
    ));

    let url = format!(
        "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
        proxy_addr.port()
    );
    let mut cfg = config("web-via-proxy", &url);
    cfg.dbproxy_status_url = format!("http://{admin_addr}/status");
    let app = App::start(cfg).await?;
    wait_ready(&app).await?;
    // The advisory lock and the DDL reached the primary through the proxy.
    let info = app.get("/api/info").await?.json()?;
    ensure!(info["migrations"]["applied"] == serde_json::json!([1]), "{info}");

    common::insert_sample(&url, "host-a", 1_795_000_000, 42.0).await?;
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.wait_replicated()).await??;

    let ports: Vec<(String, i64)> = c
        .nodes()
        .iter()
        .map(|n| (n.name().to_string(), i64::from(n.port())))
        .collect();
    let mut answered = BTreeSet::new();
    for _ in 0..10 {
        let r = app.get("/api/overview").await?;
        ensure!(r.status == StatusCode::OK, "{r:?}");
        let v = r.json()?;
        let name = v["node"]["name"].as_str().context("node name")?.to_string();
        let port = ports
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("unknown node {name}: {v}"))?
            .1;
        // Name, port and role come from one statement on one server: they must agree.
        ensure!(v["node"]["port"] == port, "{v}");
        let role = if name == c.primary().name() {
            "primary"
        } else {
            "standby"
        };
        ensure!(v["node"]["role"] == role, "{v}");
        // ...and the samples were read in the same transaction on that server.
        ensure!(v["hosts"][0]["latest"]["cpu_percent"] == 42.0, "{v}");
        answered.insert(name);
    }
    eprintln!("answered by {answered:?}");
    let page = app.get("/").await?;
    ensure!(page.status == StatusCode::OK, "{page:?}");
    ensure!(page.body.contains("web-via-proxy"), "{}", page.body);
    ensure!(
        answered.iter().any(|n| page
            .body
            .contains(&format!("<strong id=\"node-name\">{n}</strong>"))),
        "{}",
        page.body
    );

    // The dashboard reads dbproxy's own /status.
    let s = app.get("/dashboard/state").await?.json()?;
    ensure!(s["dbproxy"]["reachable"] == true, "{s}");
    ensure!(
        s["dbproxy"]["status"]["nodes"].as_array().map(Vec::len) == Some(2),
        "{s}"
    );

    app.stop().await?;
    proxy_stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), proxy).await;
    Ok(())
}
