//! The webapp through dbproxy (run in-process on loopback) to a real primary and standby: the schema
//! is migrated through the proxy, the page names the node that actually answered (its name, port
//! and role agree), and the dashboard reads dbproxy's real `/status`.

mod chromium;
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{config, wait_ready, App};
use dbproxy::config::Config;
use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// dbproxy in front of `c` (user postgres, password pw) on loopback ports, in this runtime.
async fn start_dbproxy(
    c: &testkit::PgCluster,
) -> Result<(
    SocketAddr,
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), dbproxy::RunError>>,
)> {
    let proxy_cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some("pw"));
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

    Ok((proxy_addr, admin_addr, proxy_stop, proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_through_dbproxy_names_the_node_that_answered() -> Result<()> {
    let c = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(1).password("pw").start())
            .await??,
    );
    let (proxy_addr, admin_addr, proxy_stop, proxy) = start_dbproxy(&c).await?;

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
    let _ = tokio::time::timeout(Duration::from_secs(15), proxy).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_through_lb_webapps_and_dbproxy() -> Result<()> {
    let c = tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(1).password("pw").start())
        .await??;
    let (proxy_addr, dbproxy_admin, proxy_stop, proxy) = start_dbproxy(&c).await?;
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
        proxy_addr.port()
    );
    // lb's admin listener first: the webapps' dashboards need its address.
    let lb_listener = TcpListener::bind("127.0.0.1:0").await?;
    let lb_admin = TcpListener::bind("127.0.0.1:0").await?;
    let (lb_addr, lb_admin_addr) = (lb_listener.local_addr()?, lb_admin.local_addr()?);
    let mut apps = Vec::new();
    for name in ["web-1", "web-2"] {
        let mut cfg = config(name, &url);
        cfg.lb_status_url = format!("http://{lb_admin_addr}/status");
        cfg.dbproxy_status_url = format!("http://{dbproxy_admin}/status");
        let app = App::start(cfg).await?;
        wait_ready(&app).await?;
        apps.push(app);
    }
    common::insert_sample(&url, "host-a", 1_795_000_000, 42.0).await?;

    let lb_toml = format!(
        "listen = \"{lb_addr}\"\nadmin_listen = \"{lb_admin_addr}\"\n\n[upstream]\nname = \"webapp\"\n\
         algorithm = \"round_robin\"\nservers = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}]\n\n\
         [health]\nenabled = true\npath = \"/healthz\"\ninterval = \"1s\"\ntimeout = \"1s\"\n",
        apps[0].addr, apps[1].addr
    );
    let lb_cfg: lb::Config = toml::from_str(&lb_toml).context("lb config")?;
    let lb_cfg = ::common::Validate::validate(lb_cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let lb = lb::Lb::new(lb_cfg)?;
    let lb_stop = CancellationToken::new();
    let lb_admin_task = tokio::spawn(lb.clone().serve_admin(lb_admin, lb_stop.clone()));
    let lb_task = tokio::spawn(lb.serve(lb_listener, lb_stop.clone()));

    let front = format!("http://{lb_addr}");
    common::poll("the page through lb", Duration::from_secs(30), || {
        let u = format!("{front}/");
        async move {
            let r = common::request(hyper::Method::GET, &u, &[]).await?;
            Ok((r.status == StatusCode::OK).then_some(()))
        }
    })
    .await?;

    // Round robin through lb: both instances serve the page, each naming itself.
    let mut served = BTreeSet::new();
    for _ in 0..4 {
        let dom = chromium::browse(vec!["--dump-dom".into(), format!("{front}/")]).await?;
        for name in ["web-1", "web-2"] {
            if dom.contains(&format!("<strong id=\"instance\">{name}</strong>")) {
                served.insert(name);
            }
        }
        ensure!(dom.contains("host-a") && dom.contains("42.0%"), "{dom}");
        ensure!(dom.contains("<strong id=\"node-name\">node"), "{dom}");
        if served.len() == 2 {
            break;
        }
    }
    ensure!(served.len() == 2, "only {served:?} served the page through lb");

    // The dashboard draws lb's real servers and dbproxy's real nodes.
    let dom = chromium::browse(vec!["--dump-dom".into(), format!("{front}/dashboard")]).await?;
    for needle in [
        format!("data-key=\"web:{}\"", apps[0].addr),
        format!("data-key=\"web:{}\"", apps[1].addr),
        "data-key=\"dbproxy\"".to_string(),
        "data-key=\"db:0\"".to_string(),
        "data-key=\"db:1\"".to_string(),
    ] {
        ensure!(
            dom.contains(&needle),
            "dashboard through lb lacks {needle}:\n{dom}"
        );
    }
    let dir = chromium::artifacts_dir()?;
    chromium::screenshot(format!("{front}/"), dir.join("stack-index.png")).await?;
    chromium::screenshot(format!("{front}/dashboard"), dir.join("stack-dashboard.png")).await?;

    lb_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), lb_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), lb_admin_task).await;
    for app in apps {
        app.stop().await?;
    }
    proxy_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), proxy).await;
    Ok(())
}
