//! The dashboard in front of two dbproxy instances coordinated through a real etcd (real
//! PostgreSQL, real dbproxy, real etcd, headless Chromium for the drawing): it lists both
//! instances from their `/status`, marks the one holding the leader lease, shows what each knows
//! of etcd, and follows the lease when the leader stops; the webapp's queries move to the other
//! instance of its multi-host connection string. Its switchover button reaches the leader even
//! when the first admin URL configured is the follower's (which refuses a switchover with 409).

mod chromium;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use chromium::{artifacts_dir, browse, screenshot};
use common::{config, poll, wait_ready, App};
use dbproxy::config::Config;
use hyper::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Both instances' admin token, which the webapp sends with the switchover.
const ADMIN_TOKEN: &str = "pair admin token";

/// One dbproxy instance of the pair, in this runtime.
struct Instance {
    port: u16,
    admin: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dbproxy::RunError>>,
}

async fn start_instance(c: &testkit::PgCluster, etcd: &[String], name: &str) -> Result<Instance> {
    let mut cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some("pw"));
    cfg.coordination.etcd = etcd.to_vec();
    cfg.coordination.prefix = "/dashboard".into();
    cfg.coordination.lease_ttl = 3;
    cfg.coordination.name = name.into();
    cfg.admin_token = ADMIN_TOKEN.into();
    let cfg = ::common::Validate::validate(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let (port, admin_addr) = (listener.local_addr()?.port(), admin.local_addr()?);
    let stop = CancellationToken::new();
    let task = tokio::spawn(dbproxy::run_with_admin(listener, Some(admin), cfg, stop.clone()));
    Ok(Instance {
        port,
        admin: admin_addr,
        stop,
        task,
    })
}

/// The dashboard's list of dbproxy instances, once `accept` holds for it.
async fn wait_instances(app: &App, what: &str, accept: impl Fn(&[Value]) -> bool) -> Result<Value> {
    poll(what, Duration::from_secs(30), || async {
        let v = app.get("/dashboard/state").await?.json()?;
        let list = v["dbproxies"].as_array().cloned().unwrap_or_default();
        Ok(accept(&list).then_some(v))
    })
    .await
}

fn by_name<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|i| i["instance"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_both_dbproxy_instances_the_leader_and_etcd() -> Result<()> {
    let c = tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(1).password("pw").start())
        .await??;
    let etcd = tokio::task::spawn_blocking(|| testkit::etcd::EtcdCluster::start(1)).await??;
    let a = start_instance(&c, &etcd.endpoints(), "a").await?;
    // a leads before b starts, so which one leads is known.
    poll("a to take the lease", Duration::from_secs(30), || async {
        let body = common::request(hyper::Method::GET, &format!("http://{}/status", a.admin), &[])
            .await?
            .json()?;
        Ok((body["record"]["coordination"]["is_leader"] == true).then_some(()))
    })
    .await?;
    let b = start_instance(&c, &etcd.endpoints(), "b").await?;

    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres password=pw dbname=postgres",
        a.port, b.port
    );
    let mut cfg = config("web-pair", &url);
    cfg.dbproxy_status_url = format!("http://{}/status, http://{}/status", a.admin, b.admin);
    // The follower's admin URL first: a switchover sent to it alone would be refused.
    cfg.dbproxy_admin_url = format!("http://{}/, http://{}", b.admin, a.admin);
    cfg.dbproxy_admin_token = ADMIN_TOKEN.into();
    cfg.operator_password = common::OPERATOR_PASSWORD.into();
    let app = App::start(cfg).await?;
    wait_ready(&app).await?;

    let v = wait_instances(&app, "both instances, a leading", |l| {
        l.len() == 2
            && l.iter()
                .all(|i| i["reachable"] == true && i["etcd_reachable"] == true && i["leader"] == "a")
            && by_name(l, "a").is_some_and(|i| i["is_leader"] == true)
            && by_name(l, "b").is_some_and(|i| i["is_leader"] == false)
    })
    .await?;
    // The cluster drawn is the leader's view.
    ensure!(v["dbproxy"]["url"] == format!("http://{}/status", a.admin), "{v}");
    ensure!(v["dbproxy"]["status"]["nodes"][0]["role"] == "primary", "{v}");
    let mode = by_name(v["dbproxies"].as_array().expect("a list"), "b").expect("b")["mode"].clone();
    ensure!(mode == "follower", "{v}");

    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard")]).await?;
    for needle in [
        "class=\"node up leader\" data-key=\"dbproxy:a\"",
        "class=\"node up\" data-key=\"dbproxy:b\"",
        ">leader · etcd ok<",
        ">follower · etcd ok<",
        "database proxy · leader a · etcd reached by 2 of 2",
        "class=\"node primary\" data-key=\"db:0\"",
        "class=\"node standby\" data-key=\"db:1\"",
    ] {
        ensure!(dom.contains(needle), "dashboard DOM lacks {needle}:\n{dom}");
    }
    // An instance's details show its part and etcd's state.
    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard#dbproxy:b")]).await?;
    for needle in [
        "<h2>b</h2>",
        "<dt>etcd_reachable</dt>",
        "<dt>mode</dt><dd>follower</dd>",
    ] {
        ensure!(dom.contains(needle), "details of b lack {needle}:\n{dom}");
    }
    screenshot(
        app.url("/dashboard"),
        artifacts_dir()?.join("webapp-dashboard-pair.png"),
    )
    .await?;

    // The switchover pressed on the dashboard: b, the first admin URL, is a follower and refuses
    // it itself; the webapp sends it to a, which leads, and both instances record node 1 as the
    // primary.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let refused = common::request(
        hyper::Method::POST,
        &format!("http://{}/nodes/1/promote", b.admin),
        &[("authorization", &bearer)],
    )
    .await?;
    ensure!(
        refused.status == StatusCode::CONFLICT
            && refused.body.contains("leader lease")
            && refused.body.contains("(a)"),
        "the follower should refuse a switchover: {refused:?}"
    );
    let standby = c.nodes()[1].name().to_string();
    let op = common::login(&app.url(""), common::OPERATOR_PASSWORD).await?;
    let r = common::request(
        hyper::Method::POST,
        &app.url("/dashboard/switchover/1"),
        &[("cookie", &op.cookie), (webapp::CSRF_HEADER, &op.csrf)],
    )
    .await?;
    ensure!(r.status == StatusCode::OK, "the switchover was refused: {r:?}");
    let answer = r.json()?;
    ensure!(answer["dbproxy_status"] == 202, "{answer}");
    for (name, admin) in [("a", a.admin), ("b", b.admin)] {
        poll(
            &format!("node 1 recorded as the primary on {name}"),
            Duration::from_secs(60),
            || async {
                let body = common::request(hyper::Method::GET, &format!("http://{admin}/status"), &[])
                    .await?
                    .json()?;
                Ok((body["record"]["primary"] == standby.as_str()).then_some(()))
            },
        )
        .await?;
    }
    wait_instances(&app, "the dashboard to show node 1 as the primary", |l| {
        l.len() == 2 && l.iter().all(|i| i["primary"] == 1)
    })
    .await?;

    // The leader stops: b takes the lease, the dashboard says so, and the page is still served
    // (the webapp's connections move to b).
    a.stop.cancel();
    let _ = a.task.await;
    let v = wait_instances(&app, "b to lead with a unreachable", |l| {
        by_name(l, "a").is_some_and(|i| i["reachable"] == false)
            && by_name(l, "b").is_some_and(|i| i["is_leader"] == true && i["etcd_reachable"] == true)
    })
    .await?;
    ensure!(v["dbproxy"]["url"] == format!("http://{}/status", b.admin), "{v}");
    poll(
        "the leader change in the events",
        Duration::from_secs(10),
        || async {
            let v = app.get("/dashboard/state").await?.json()?;
            Ok(v["events"]
                .to_string()
                .contains("dbproxy leader changed: a → b")
                .then_some(()))
        },
    )
    .await?;
    poll("the page through b", Duration::from_secs(30), || async {
        Ok((app.get("/").await?.status == StatusCode::OK).then_some(()))
    })
    .await?;
    let dom = browse(vec!["--dump-dom".into(), app.url("/dashboard")]).await?;
    for needle in [
        "class=\"node down\" data-key=\"dbproxy:a\"",
        ">unreachable<",
        "class=\"node up leader\" data-key=\"dbproxy:b\"",
        "database proxy · leader b · etcd reached by 1 of 2",
        "dbproxy leader changed: a → b",
    ] {
        ensure!(
            dom.contains(needle),
            "dashboard after the stop lacks {needle}:\n{dom}"
        );
    }

    app.stop().await?;
    b.stop.cancel();
    let _ = b.task.await;
    drop(etcd);
    drop(c);
    Ok(())
}
