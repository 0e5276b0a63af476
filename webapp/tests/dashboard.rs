//! The dashboard against a small HTTP peer standing in for lb's and dbproxy's admin listeners: the
//! event stream delivers their status and its changes, broken or missing peers show as unreachable,
//! and the switchover button's endpoint reaches dbproxy's admin API (or refuses cleanly).

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use common::{config, request, App, FakePeer};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

/// No database behind these tests: a port nothing listens on (the migrator keeps retrying quietly).
const NO_DB: &str = "host=127.0.0.1 port=1 user=nobody dbname=nothing connect_timeout=1";

const LB_STATUS: &str = r#"{"upstream":"webapps","algorithm":"ip_hash","active_connections":3,
  "servers":[{"addr":"127.0.0.1:8001","name":"web-1","healthy":true,"available":true,"requests":10},
             {"addr":"127.0.0.1:8002","name":"web-2","healthy":false,"available":false,"requests":4,
              "something_new":{"nested":[1,2]}}]}"#;

fn db_status(primary: &str) -> String {
    let (r0, r1) = if primary == "0" {
        ("primary", "standby")
    } else {
        ("standby", "primary")
    };
    format!(
        r#"{{"primary":"{primary}","nodes":[
        {{"node_id":"0","hostname":"db-zero","port":"5432","status":"up","role":"{r0}","replication_delay":"0"}},
        {{"node_id":"1","hostname":"db-one","port":"5433","status":"up","role":"{r1}","replication_delay":"128"}}]}}"#
    )
}

/// Reads server-sent events from `path` until `accept` returns true for one's data.
async fn wait_event(app: &App, accept: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
    let stream = tokio::net::TcpStream::connect(app.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/dashboard/events")
        .header("host", "x")
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())?;
    let mut resp = sender.send_request(req).await?;
    ensure!(resp.status() == StatusCode::OK, "{:?}", resp.status());
    let ct = resp.headers().get("content-type").context("no content-type")?;
    ensure!(ct.to_str()? == "text/event-stream", "{ct:?}");
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let frame = tokio::time::timeout_at(deadline, resp.body_mut().frame())
            .await
            .context("no matching event within 20 s")?
            .context("event stream ended")??;
        if let Ok(data) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let mut name = "";
            let mut data = String::new();
            for line in event.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if name == "snapshot" {
                let v: serde_json::Value = serde_json::from_str(&data)?;
                if accept(&v) {
                    return Ok(v);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_delivers_status_and_its_changes() -> Result<()> {
    let stop = CancellationToken::new();
    let peer = FakePeer::default();
    peer.set("/lb/status", 200, LB_STATUS);
    peer.set("/db/status", 200, &db_status("0"));
    let addr = peer.serve(stop.clone()).await?;
    let mut cfg = config("dash-1", NO_DB);
    cfg.lb_status_url = format!("http://{addr}/lb/status");
    cfg.dbproxy_status_url = format!("http://{addr}/db/status");
    let app = App::start(cfg).await?;

    let v = wait_event(&app, |v| v["dbproxy"]["status"]["primary"] == "0").await?;
    ensure!(v["instance"] == "dash-1", "{v}");
    ensure!(v["switchover"] == false, "{v}");
    ensure!(v["lb"]["reachable"] == true, "{v}");
    ensure!(v["lb"]["status"]["servers"][1]["name"] == "web-2", "{v}");
    // Unknown fields are passed through untouched for the page to show in its details panel.
    ensure!(
        v["lb"]["status"]["servers"][1]["something_new"]["nested"][1] == 2,
        "{v}"
    );
    ensure!(
        v["dbproxy"]["status"]["nodes"][1]["replication_delay"] == "128",
        "{v}"
    );

    // A failover at dbproxy reaches an open stream without reconnecting.
    peer.set("/db/status", 200, &db_status("1"));
    let v = wait_event(&app, |v| v["dbproxy"]["status"]["primary"] == "1").await?;
    ensure!(v["dbproxy"]["status"]["nodes"][1]["role"] == "primary", "{v}");
    // ...and the webapp records it as a failover event every viewer sees.
    let messages = |v: &serde_json::Value| -> Vec<String> {
        v["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect()
    };
    let m = messages(&v);
    for needle in [
        "primary changed: node 0 → node 1",
        "node 0: primary → standby",
        "node 1: standby → primary",
    ] {
        ensure!(m.iter().any(|x| x == needle), "no event {needle:?} in {m:?}");
    }

    // dbproxy going away shows as unreachable, not as an error of the page.
    stop.cancel();
    let v = wait_event(&app, |v| v["dbproxy"]["reachable"] == false).await?;
    ensure!(
        v["dbproxy"]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{v}"
    );
    ensure!(v["lb"]["reachable"] == false, "{v}");
    let v = wait_event(&app, |v| {
        messages(v).iter().any(|m| m == "dbproxy unreachable")
            && messages(v).iter().any(|m| m == "lb unreachable")
    })
    .await?;
    ensure!(messages(&v).len() == 5, "{v}");
    let m = app.get("/metrics").await?;
    ensure!(
        m.body
            .contains("webapp_status_fetch_errors_total{source=\"dbproxy\"}"),
        "{}",
        m.body
    );
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_peers_render_as_unreachable() -> Result<()> {
    let stop = CancellationToken::new();
    let peer = FakePeer::default();
    peer.set("/lb/status", 200, "this is not json");
    peer.set("/db/status", 500, "boom");
    let addr = peer.serve(stop.clone()).await?;
    let mut cfg = config("dash-2", NO_DB);
    cfg.lb_status_url = format!("http://{addr}/lb/status");
    cfg.dbproxy_status_url = format!("http://{addr}/db/status");
    let app = App::start(cfg).await?;

    let s = app.get("/dashboard/state").await?;
    ensure!(s.status == StatusCode::OK, "{s:?}");
    let v = s.json()?;
    ensure!(v["lb"]["reachable"] == false, "{v}");
    ensure!(
        v["lb"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("not json")),
        "{v}"
    );
    ensure!(v["dbproxy"]["reachable"] == false, "{v}");
    ensure!(v["dbproxy"]["error"] == "answered http 500", "{v}");

    let page = app.get("/dashboard").await?;
    ensure!(page.status == StatusCode::OK, "{page:?}");
    ensure!(page.body.contains("<svg id=\"topo\""), "{}", page.body);
    ensure!(
        page.body.contains("answered http 500"),
        "snapshot not embedded: {}",
        page.body
    );
    let js = app.get("/static/dashboard.js").await?;
    ensure!(
        js.status == StatusCode::OK && js.body.contains("EventSource"),
        "{js:?}"
    );

    // A status body larger than the cap is refused, not buffered.
    peer.set(
        "/lb/status",
        200,
        &format!("\"{}\"", "x".repeat(webapp::dashboard::MAX_STATUS_BODY + 10)),
    );
    let v = common::poll("oversized body refused", Duration::from_secs(10), || async {
        let v = app.get("/dashboard/state").await?.json()?;
        Ok(v["lb"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("bad body"))
            .then_some(v))
    })
    .await?;
    ensure!(v["lb"]["reachable"] == false, "{v}");
    stop.cancel();
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_reaches_dbproxy_admin_or_refuses_cleanly() -> Result<()> {
    let stop = CancellationToken::new();
    let peer = FakePeer::default();
    peer.set("/admin/nodes/1/promote", 200, r#"{"promoted":"1"}"#);
    peer.set("/admin/nodes/2/promote", 409, r#"{"error":"node 2 is down"}"#);
    peer.set("/admin/nodes/3/promote", 500, r#"{"error":"promotion failed"}"#);
    let addr = peer.serve(stop.clone()).await?;

    // Without an admin URL, or without an operator password, there is no switchover: the
    // dashboard is read-only, with neither a login form nor a way to promote.
    let mut read_only = config("dash-3", NO_DB);
    read_only.dbproxy_admin_url = format!("http://{addr}/admin/");
    let mut no_admin = config("dash-3b", NO_DB);
    no_admin.operator_password = common::OPERATOR_PASSWORD.into();
    for cfg in [config("dash-3c", NO_DB), read_only, no_admin] {
        let plain = App::start(cfg).await?;
        let r = request(Method::POST, &plain.url("/dashboard/switchover/1"), &[]).await?;
        ensure!(r.status == StatusCode::NOT_FOUND, "{r:?}");
        ensure!(r.json()?["error"] == "switchover is not configured", "{r:?}");
        ensure!(plain.get("/api/info").await?.json()?["switchover"] == false);
        ensure!(plain.get("/dashboard/login").await?.status == StatusCode::NOT_FOUND);
        let e = common::login(&plain.url(""), common::OPERATOR_PASSWORD)
            .await
            .unwrap_err();
        ensure!(e.to_string().contains("404"), "{e:#}");
        let page = plain.get("/dashboard").await?.body;
        ensure!(
            !page.contains("csrf-token") && !page.contains("id=\"login\""),
            "{page}"
        );
        plain.stop().await?;
    }
    ensure!(peer.requests().is_empty(), "{:?}", peer.requests());

    let mut cfg = config("dash-4", NO_DB);
    cfg.dbproxy_admin_url = format!("http://{addr}/admin/");
    cfg.operator_password = common::OPERATOR_PASSWORD.into();
    let app = App::start(cfg).await?;
    let info = app.get("/api/info").await?.json()?;
    ensure!(info["switchover"] == true, "{info}");
    let page = app.get("/dashboard").await?;
    ensure!(
        page.body.contains("<a id=\"login\" href=\"/dashboard/login\">") && !page.body.contains("csrf-token"),
        "{page:?}"
    );
    ensure!(page.headers["cache-control"] == "no-store", "{page:?}");
    let login_page = app.get("/dashboard/login").await?;
    ensure!(
        login_page.status == StatusCode::OK
            && login_page.body.contains("type=\"password\" name=\"password\""),
        "{login_page:?}"
    );

    // Not logged in: refused whatever headers come along (the old custom header included).
    let url = |path: &str| app.url(path);
    for h in [
        &[][..],
        &[("x-hastack-switchover", "1")][..],
        &[("x-csrf-token", "anything"), ("cookie", "hastack_operator=1.2.3")][..],
    ] {
        let r = request(Method::POST, &url("/dashboard/switchover/1"), h).await?;
        ensure!(r.status == StatusCode::UNAUTHORIZED, "{h:?}: {r:?}");
        ensure!(r.json()?["error"] == "operator login required", "{r:?}");
    }
    // A wrong password is refused with the form again.
    let e = common::login(&url(""), "not the password").await.unwrap_err();
    ensure!(e.to_string().contains("401"), "{e:#}");

    let op = common::login(&url(""), common::OPERATOR_PASSWORD).await?;
    let page = request(Method::GET, &url("/dashboard"), &[("cookie", &op.cookie)]).await?;
    ensure!(page.body.contains("<button id=\"logout\">"), "{page:?}");
    let post = |path: &str, with_csrf: bool| {
        let url = app.url(path);
        let op = op.clone();
        async move {
            let mut h = vec![("cookie", op.cookie.as_str())];
            if with_csrf {
                h.push((webapp::CSRF_HEADER, op.csrf.as_str()));
            }
            request(Method::POST, &url, &h).await
        }
    };
    // Logged in but without the page's CSRF token (what a cross-site form could send): refused.
    let r = post("/dashboard/switchover/1", false).await?;
    ensure!(r.status == StatusCode::FORBIDDEN, "{r:?}");
    ensure!(r.json()?["error"] == "missing or wrong csrf token", "{r:?}");
    let r = request(
        Method::POST,
        &url("/dashboard/switchover/1"),
        &[("cookie", &op.cookie), (webapp::CSRF_HEADER, "forged")],
    )
    .await?;
    ensure!(r.status == StatusCode::FORBIDDEN, "{r:?}");
    let r = post("/dashboard/switchover/a.b", true).await?;
    ensure!(r.status == StatusCode::BAD_REQUEST, "{r:?}");
    let r = app.get("/dashboard/switchover/1").await?;
    ensure!(r.status == StatusCode::METHOD_NOT_ALLOWED, "{r:?}");
    ensure!(peer.requests().is_empty(), "{:?}", peer.requests());

    let r = post("/dashboard/switchover/1", true).await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");
    let v = r.json()?;
    ensure!(
        v["dbproxy_status"] == 200 && v["answer"]["promoted"] == "1",
        "{v}"
    );
    ensure!(
        peer.requests() == vec![("POST".to_string(), "/admin/nodes/1/promote".to_string())],
        "{:?}",
        peer.requests()
    );

    let r = post("/dashboard/switchover/2", true).await?;
    ensure!(r.status == StatusCode::CONFLICT, "{r:?}");
    let v = r.json()?;
    ensure!(
        v["dbproxy_status"] == 409 && v["answer"]["error"] == "node 2 is down",
        "{v}"
    );
    // dbproxy failing (not refusing) is a bad gateway, with its answer.
    let r = post("/dashboard/switchover/3", true).await?;
    ensure!(r.status == StatusCode::BAD_GATEWAY, "{r:?}");
    let v = r.json()?;
    ensure!(
        v["dbproxy_status"] == 500 && v["answer"]["error"] == "promotion failed",
        "{v}"
    );

    stop.cancel();
    // Once the admin listener is gone the endpoint says so instead of hanging or failing hard.
    let r = common::poll("admin unreachable", Duration::from_secs(10), || async {
        let r = post("/dashboard/switchover/1", true).await?;
        if r.status == StatusCode::OK {
            return Ok(None);
        }
        Ok(Some(r))
    })
    .await?;
    ensure!(r.status == StatusCode::BAD_GATEWAY, "{r:?}");
    let e = r.json()?["error"].as_str().unwrap_or_default().to_string();
    if !e.starts_with("dbproxy admin:") {
        bail!("unexpected error text: {e}");
    }

    // Logging out needs the CSRF token too, and clears the cookie.
    let form = |csrf: &str| format!("csrf={csrf}");
    let logout = |body: String| {
        let url = app.url("/dashboard/logout");
        let cookie = op.cookie.clone();
        async move {
            common::request_with_body(
                Method::POST,
                &url,
                &[
                    ("cookie", cookie.as_str()),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                &body,
            )
            .await
        }
    };
    let r = logout(form("forged")).await?;
    ensure!(r.status == StatusCode::FORBIDDEN, "{r:?}");
    let r = logout(form(&op.csrf)).await?;
    ensure!(r.status == StatusCode::SEE_OTHER, "{r:?}");
    let cleared = r.headers["set-cookie"].to_str()?;
    ensure!(
        cleared.starts_with("hastack_operator=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    // Failed logins are limited: after five (the wrong password above was the first), even the
    // right password is not checked for a while.
    for _ in 0..4 {
        let e = common::login(&app.url(""), "guess").await.unwrap_err();
        ensure!(e.to_string().contains("401"), "{e:#}");
    }
    let r = common::request_with_body(
        Method::POST,
        &app.url("/dashboard/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("password={}", common::OPERATOR_PASSWORD.replace(' ', "+")),
    )
    .await?;
    ensure!(r.status == StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    ensure!(r.headers.contains_key("retry-after"), "{r:?}");
    ensure!(!r.headers.contains_key("set-cookie"), "{r:?}");
    let m = app.get("/metrics").await?.body;
    for line in [
        "webapp_operator_logins_total{outcome=\"accepted\"} 1",
        "webapp_operator_logins_total{outcome=\"refused\"} 5",
        "webapp_operator_logins_total{outcome=\"limited\"} 1",
    ] {
        ensure!(m.contains(line), "metrics lack {line}:\n{m}");
    }
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_request_head_is_cut_off() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config("slow", NO_DB);
    cfg.header_timeout_ms = 300;
    let app = App::start(cfg).await?;
    let mut s = tokio::net::TcpStream::connect(app.addr).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .context("the server kept a half-sent request open")??;
    ensure!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&out);
    ensure!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    // Complete requests on other connections are unaffected.
    let r = app.get("/healthz").await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_event_streams_promptly() -> Result<()> {
    let app = App::start(config("drain", NO_DB)).await?;
    let stream = tokio::net::TcpStream::connect(app.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn_task = tokio::spawn(conn);
    let req = hyper::Request::get("/dashboard/events")
        .header("host", "x")
        .body(Empty::<Bytes>::new())?;
    let mut resp = sender.send_request(req).await?;
    ensure!(resp.status() == StatusCode::OK);
    let started = std::time::Instant::now();
    app.shutdown.cancel();
    // The stream ends (rather than being cut at the 10 s drain deadline)...
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = resp.body_mut().frame().await {
            frame?;
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(end.is_ok(), "event stream still open after shutdown");
    // ...and the server exits cleanly.
    tokio::time::timeout(Duration::from_secs(5), app.task)
        .await
        .context("webapp did not stop")???;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    conn_task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_checks_config_serves_and_drains_on_sigterm() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_webapp");
    // A bad value names its key and exits 2.
    let out = std::process::Command::new(bin)
        .arg("--check-config")
        .env("WEBAPP_POOL_SIZE", "0")
        .output()?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("pool_size"), "{err}");

    let port = testkit::free_port()?;
    let mut child = std::process::Command::new(bin)
        .args([
            "--set",
            "instance=from-cli",
            "--set",
            "lb_status_url=",
            "--set",
            "dbproxy_status_url=",
        ])
        .env("WEBAPP_LISTEN", format!("127.0.0.1:{port}"))
        .env("WEBAPP_DATABASE_URL", NO_DB)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let served = common::poll("binary serving", Duration::from_secs(30), || async {
        let r = request(Method::GET, &format!("{url}/"), &[]).await?;
        Ok(Some(r))
    })
    .await;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let page = served?;
    ensure!(sent?.success());
    // No database: the friendly page, naming the instance set on the command line.
    ensure!(page.status == StatusCode::SERVICE_UNAVAILABLE, "{page:?}");
    ensure!(page.body.contains("from-cli"), "{}", page.body);
    let status = tokio::task::spawn_blocking(move || {
        testkit::wait_for(
            "webapp to exit",
            Duration::from_secs(15),
            || Ok(child.try_wait()?),
        )
    })
    .await??;
    ensure!(status.success(), "exit status {status}");
    Ok(())
}
