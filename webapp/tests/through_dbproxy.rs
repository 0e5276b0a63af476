//! The webapp through dbproxy (run in-process on loopback) to a real primary and standby: the schema
//! is migrated through the proxy, the page names the node that actually answered (its name, port
//! and role agree), the dashboard reads dbproxy's real `/status`, its switchover button drives
//! dbproxy's real `/nodes/{id}/promote`, and the page keeps answering cleanly while dbproxy fails
//! over from a killed primary.

mod chromium;
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{config, wait_ready, App};
use dbproxy::config::Config;
use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// dbproxy in front of `c` (user postgres, password pw) on loopback ports, in this runtime.
/// The token dbproxy's admin listener requires for its POST endpoints in these tests.
const ADMIN_TOKEN: &str = "t0ken-for-the-switchover";

async fn start_dbproxy(
    c: &testkit::PgCluster,
) -> Result<(
    SocketAddr,
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), dbproxy::RunError>>,
)> {
    let mut proxy_cfg = Config::loopback(c.nodes().iter().map(|n| (n.name(), n.port())), Some("pw"));
    proxy_cfg.admin_token = ADMIN_TOKEN.into();
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
        cfg.dbproxy_admin_url = format!("http://{dbproxy_admin}");
        cfg.dbproxy_admin_token = ADMIN_TOKEN.into();
        cfg.operator_password = common::OPERATOR_PASSWORD.into();
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

    // Through lb's public port, the custom header alone (which used to be enough to promote a
    // standby) is refused: the switchover needs an operator login.
    let switchover = format!("{front}/dashboard/switchover/1");
    let r = common::request(Method::POST, &switchover, &[("x-hastack-switchover", "1")]).await?;
    ensure!(r.status == StatusCode::UNAUTHORIZED, "{r:?}");
    // A login made through lb holds on either webapp (lb balances round robin): with the cookie
    // and the page's CSRF token, dbproxy's own answer comes back (there is no node 7).
    let op = common::login(&front, common::OPERATOR_PASSWORD).await?;
    for _ in 0..2 {
        let r = common::request(
            Method::POST,
            &format!("{front}/dashboard/switchover/7"),
            &[("cookie", &op.cookie), (webapp::CSRF_HEADER, &op.csrf)],
        )
        .await?;
        ensure!(r.status == StatusCode::NOT_FOUND, "{r:?}");
        ensure!(r.json()?["dbproxy_status"] == 404, "{r:?}");
        let r = common::request(Method::POST, &switchover, &[("cookie", &op.cookie)]).await?;
        ensure!(r.status == StatusCode::FORBIDDEN, "{r:?}");
    }
    let s = dbproxy_status(dbproxy_admin).await?;
    ensure!(s["primary"] == 0, "{s}");
    ensure!(history_of(&s, "switchover").is_empty(), "{s}");

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

/// Bounds a whole test body, so that a hang fails the test instead of holding the run.
async fn bounded<T>(body: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(240), body)
        .await
        .context("the test did not finish within 240 s")?
}

/// A primary and one standby with password `pw`, the sample the pages show written and replicated,
/// dbproxy in front, and a webapp through it whose dashboard reads dbproxy's status and may call
/// its admin API.
struct Stack {
    c: Arc<testkit::PgCluster>,
    admin: SocketAddr,
    app: App,
    proxy_stop: CancellationToken,
    proxy: tokio::task::JoinHandle<Result<(), dbproxy::RunError>>,
}

impl Stack {
    async fn start(instance: &str, host: &str, cpu: f64) -> Result<Stack> {
        let c = Arc::new(
            tokio::task::spawn_blocking(|| testkit::PgCluster::builder().standbys(1).password("pw").start())
                .await??,
        );
        let (proxy_addr, admin, proxy_stop, proxy) = start_dbproxy(&c).await?;
        let url = format!(
            "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
            proxy_addr.port()
        );
        let mut cfg = config(instance, &url);
        cfg.dbproxy_status_url = format!("http://{admin}/status");
        cfg.dbproxy_admin_url = format!("http://{admin}");
        cfg.dbproxy_admin_token = ADMIN_TOKEN.into();
        cfg.operator_password = common::OPERATOR_PASSWORD.into();
        let app = App::start(cfg).await?;
        wait_ready(&app).await?;
        common::insert_sample(&url, host, 1_795_000_000, cpu).await?;
        let c2 = c.clone();
        tokio::task::spawn_blocking(move || c2.wait_replicated()).await??;
        // dbproxy sees node 0 as the primary and node 1 as a healthy standby.
        common::poll(
            "dbproxy to report node1 as an up standby",
            Duration::from_secs(60),
            || async {
                let s = dbproxy_status(admin).await?;
                Ok((s["primary"] == 0
                    && s["nodes"][1]["status"] == "up"
                    && s["nodes"][1]["role"] == "standby")
                    .then_some(()))
            },
        )
        .await?;
        Ok(Stack {
            c,
            admin,
            app,
            proxy_stop,
            proxy,
        })
    }

    async fn stop(self) -> Result<()> {
        self.app.stop().await?;
        self.proxy_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.proxy).await;
        Ok(())
    }
}

/// dbproxy's `/status` document, read from its admin listener.
async fn dbproxy_status(admin: SocketAddr) -> Result<Value> {
    let r = common::request(Method::GET, &format!("http://{admin}/status"), &[]).await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");
    r.json()
}

/// The events of `kind` in a `/status` document's history.
fn history_of(status: &Value, kind: &str) -> Vec<Value> {
    status["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

/// The node name and role the front page says answered, if it says so.
fn page_node(body: &str) -> Option<(String, String)> {
    let inside = |open: &str| {
        let rest = &body[body.find(open)? + open.len()..];
        Some(rest[..rest.find("</strong>")?].to_string())
    };
    Some((
        inside("<strong id=\"node-name\">")?,
        inside("<strong id=\"node-role\" class=\"role\">")?,
    ))
}

/// Checks that a refused switchover came back as the webapp documents it: with dbproxy's own
/// status (a 4xx refusal) and reason in JSON, never a 500 or a trace.
fn check_refused(r: &common::Reply, dbproxy_code: u16, reason: &str) -> Result<()> {
    ensure!(r.status.as_u16() == dbproxy_code, "{r:?}");
    ensure!(
        !r.body.contains("panicked") && !r.body.contains("backtrace"),
        "{r:?}"
    );
    let v = r.json()?;
    ensure!(v["dbproxy_status"] == dbproxy_code, "{v}");
    ensure!(
        v["answer"].as_str().is_some_and(|a| a.contains(reason)),
        "expected dbproxy's reason `{reason}`: {v}"
    );
    Ok(())
}

/// `/api/overview` and `/` both answer 200 naming `node` as a primary, with the test's sample.
async fn check_served_by_primary(app: &App, node: &str, cpu: f64) -> Result<()> {
    let r = app.get("/api/overview").await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");
    let v = r.json()?;
    ensure!(
        v["node"]["name"] == node && v["node"]["role"] == "primary",
        "expected {node} as the primary: {v}"
    );
    ensure!(v["hosts"][0]["latest"]["cpu_percent"] == cpu, "{v}");
    let page = app.get("/").await?;
    ensure!(page.status == StatusCode::OK, "{page:?}");
    ensure!(
        page_node(&page.body) == Some((node.to_string(), "primary".to_string())),
        "expected {node} as the primary on the page: {}",
        page.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_switchover_button_promotes_the_standby_through_dbproxy() -> Result<()> {
    bounded(switchover_body()).await
}

async fn switchover_body() -> Result<()> {
    let stack = Stack::start("web-switch", "host-s", 17.0).await?;
    let (app, admin) = (&stack.app, stack.admin);
    let info = app.get("/api/info").await?.json()?;
    ensure!(info["switchover"] == true, "{info}");
    // The dashboard has seen node 0 as the primary (its event log compares against this).
    let s = app.get("/dashboard/state").await?.json()?;
    ensure!(
        s["switchover"] == true && s["dbproxy"]["status"]["primary"] == 0,
        "{s}"
    );
    // Pooled sessions through dbproxy that have been used before the switchover.
    for _ in 0..6 {
        let r = app.get("/api/overview").await?;
        ensure!(r.status == StatusCode::OK, "{r:?}");
    }

    let op = common::login(&app.url(""), common::OPERATOR_PASSWORD).await?;
    let post = |id: &str, logged_in: bool| {
        let url = app.url(&format!("/dashboard/switchover/{id}"));
        let op = op.clone();
        async move {
            let mut h = vec![("x-hastack-switchover", "1")];
            if logged_in {
                h.push(("cookie", op.cookie.as_str()));
                h.push((webapp::CSRF_HEADER, op.csrf.as_str()));
            }
            common::request(Method::POST, &url, &h).await
        }
    };

    // Refusals first; none of them changes anything. dbproxy's admin listener itself refuses a
    // promotion without its token (the webapp sends it).
    let promote = format!("http://{admin}/nodes/1/promote");
    for h in [&[][..], &[("authorization", "Bearer wrong")][..]] {
        let r = common::request(Method::POST, &promote, h).await?;
        ensure!(r.status == StatusCode::UNAUTHORIZED, "{r:?}");
    }
    let r = post("1", false).await?;
    ensure!(r.status == StatusCode::UNAUTHORIZED, "{r:?}");
    ensure!(r.json()?["error"] == "operator login required", "{r:?}");
    check_refused(&post("0", true).await?, 409, "node0 is already the primary")?;
    check_refused(&post("7", true).await?, 404, "no node 7")?;
    let s = dbproxy_status(admin).await?;
    ensure!(s["primary"] == 0, "{s}");
    ensure!(history_of(&s, "switchover").is_empty(), "{s}");

    // The button: dbproxy accepts the switchover as an operation (202 with its id), which the
    // webapp relays, and runs it on its own.
    let r = post("1", true).await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");
    let v = r.json()?;
    ensure!(v["node"] == "1" && v["dbproxy_status"] == 202, "{v}");
    ensure!(
        v["answer"]["kind"] == "switchover" && v["answer"]["operation"].is_u64(),
        "{v}"
    );

    // dbproxy's own view once it is done: node 1 elected, node 0 fenced, one switchover in the
    // history.
    let s = common::poll(
        "dbproxy to finish the switchover",
        Duration::from_secs(60),
        || async {
            let s = dbproxy_status(admin).await?;
            Ok((!history_of(&s, "switchover").is_empty()).then_some(s))
        },
    )
    .await?;
    ensure!(s["primary"] == 1, "{s}");
    ensure!(s["nodes"][0]["fenced"] == true, "{s}");
    ensure!(s["nodes"][1]["role"] == "primary", "{s}");
    let events = history_of(&s, "switchover");
    ensure!(
        events.len() == 1 && events[0]["promoted"] == "node1" && events[0]["error"].is_null(),
        "{s}"
    );
    // The server itself agrees: node 1 left recovery.
    let c = stack.c.clone();
    let in_recovery =
        tokio::task::spawn_blocking(move || c.node(1).psql("select pg_is_in_recovery()")).await??;
    ensure!(in_recovery == "f", "{in_recovery}");

    // The page keeps answering, and only node 1 (the new primary) answers: node 0 is fenced.
    for _ in 0..6 {
        check_served_by_primary(app, "node1", 17.0).await?;
    }

    // The dashboard shows dbproxy's new primary, its switchover event, and its own event.
    let s = common::poll(
        "the dashboard to show node 1 as the primary",
        Duration::from_secs(10),
        || async {
            let s = app.get("/dashboard/state").await?.json()?;
            Ok((s["dbproxy"]["status"]["primary"] == 1).then_some(s))
        },
    )
    .await?;
    ensure!(s["dbproxy"]["reachable"] == true, "{s}");
    let relayed = history_of(&s["dbproxy"]["status"], "switchover");
    ensure!(relayed.len() == 1 && relayed[0]["promoted"] == "node1", "{s}");
    ensure!(
        s["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["message"] == "primary changed: node 0 → node 1"),
        "{s}"
    );

    // Now impossible: back to node 0 (fenced, read-only) or to node 1 (already the primary).
    check_refused(
        &post("0", true).await?,
        409,
        "node0 is not a healthy, attached standby",
    )?;
    check_refused(&post("1", true).await?, 409, "node1 is already the primary")?;
    let s = dbproxy_status(admin).await?;
    ensure!(s["primary"] == 1, "{s}");
    ensure!(history_of(&s, "switchover").len() == 1, "{s}");
    check_served_by_primary(app, "node1", 17.0).await?;

    stack.stop().await
}

/// One answer the poller got during the failover test.
#[derive(Debug)]
struct Seen {
    /// When the request was sent.
    sent: Instant,
    /// How long the answer took.
    took: Duration,
    path: &'static str,
    status: StatusCode,
    /// For a 200, the node that answered and its role.
    node: Option<(String, String)>,
    /// The body of anything but a 200, as evidence.
    body: String,
    retry_after: bool,
}

/// A short reason: present, one line, not a dump.
fn one_line(reason: &str) -> bool {
    !reason.is_empty() && !reason.contains('\n') && reason.len() < 500
}

/// Whether an answer is acceptable while the database fails over: a 200 naming a node, or the
/// webapp's clear 503 (a message, a Retry-After, no trace).
fn acceptable(s: &Seen) -> bool {
    let clean = !s.body.contains("panicked") && !s.body.contains("backtrace");
    match (s.status, s.path) {
        (StatusCode::OK, _) => s.node.is_some(),
        (StatusCode::SERVICE_UNAVAILABLE, "/") => {
            clean
                && s.retry_after
                && s.body.contains("The database is not reachable right now")
                && one_line(&reason(s))
        }
        (StatusCode::SERVICE_UNAVAILABLE, _) => {
            clean
                && s.retry_after
                && serde_json::from_str::<Value>(&s.body).is_ok_and(|v| v["error"] == "database unavailable")
                && one_line(&reason(s))
        }
        _ => false,
    }
}

/// The one-line reason a 503 gives (the page's `reason` paragraph, the API's `detail`).
fn reason(s: &Seen) -> String {
    if s.path == "/" {
        let open = "<p class=\"reason\">";
        s.body
            .find(open)
            .map(|i| &s.body[i + open.len()..])
            .and_then(|rest| rest.find("</p>").map(|j| rest[..j].to_string()))
            .unwrap_or_default()
    } else {
        serde_json::from_str::<Value>(&s.body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// Polls `/` and `/api/overview` in turn until `stop`, recording every answer in `seen`; a request
/// that fails outright (no answer within 10 s, a broken connection) ends the poller with an error.
fn start_poller(
    app: &App,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<()>> {
    let base = app.url("");
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            for path in ["/", "/api/overview"] {
                let sent = Instant::now();
                let r = common::request(Method::GET, &format!("{base}{path}"), &[])
                    .await
                    .with_context(|| format!("GET {path}"))?;
                let node = if r.status != StatusCode::OK {
                    None
                } else if path == "/" {
                    page_node(&r.body)
                } else {
                    r.json().ok().and_then(|v| {
                        Some((
                            v["node"]["name"].as_str()?.to_string(),
                            v["node"]["role"].as_str()?.to_string(),
                        ))
                    })
                };
                let retry_after = r.headers.contains_key("retry-after");
                seen.lock().unwrap().push(Seen {
                    sent,
                    took: sent.elapsed(),
                    path,
                    status: r.status,
                    node,
                    body: if r.status == StatusCode::OK {
                        String::new()
                    } else {
                        r.body
                    },
                    retry_after,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    })
}

/// Waits until the poller has recorded `n` answers with status 200 sent after `since` (or has
/// stopped with an error, which the caller then reports).
async fn wait_answers(
    what: &str,
    poller: &tokio::task::JoinHandle<Result<()>>,
    seen: &Mutex<Vec<Seen>>,
    since: Instant,
    n: usize,
) -> Result<()> {
    common::poll(what, Duration::from_secs(60), || async {
        let ok = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.sent > since && s.status == StatusCode::OK)
            .count();
        Ok((ok >= n || poller.is_finished()).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_answers_cleanly_while_dbproxy_fails_over_from_a_killed_primary() -> Result<()> {
    bounded(failover_body()).await
}

async fn failover_body() -> Result<()> {
    let stack = Stack::start("web-failover", "host-f", 23.0).await?;
    let (app, admin) = (&stack.app, stack.admin);
    let s = app.get("/dashboard/state").await?.json()?;
    ensure!(s["dbproxy"]["status"]["primary"] == 0, "{s}");

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let poller = start_poller(app, seen.clone(), stop.clone());
    wait_answers("pages before the kill", &poller, &seen, started, 4).await?;

    let killed = Instant::now();
    let c = stack.c.clone();
    tokio::task::spawn_blocking(move || c.node(0).kill9()).await??;

    // dbproxy notices, promotes node 1 and records the failover.
    let ev = common::poll(
        "a failover event in dbproxy's /status",
        Duration::from_secs(60),
        || async {
            let s = dbproxy_status(admin).await?;
            Ok(history_of(&s, "failover").pop().map(|e| (s, e)))
        },
    )
    .await?;
    let (s, ev) = ev;
    eprintln!("failover event after {:?}: {ev}", killed.elapsed());
    ensure!(
        ev["failed"] == "node0" && ev["promoted"] == "node1" && ev["error"].is_null(),
        "{ev}"
    );
    ensure!(s["primary"] == 1, "{s}");

    // The page is served again, by node 1 as the primary.
    common::poll(
        "the page served by node1 as the primary",
        Duration::from_secs(60),
        || async { Ok(check_served_by_primary(app, "node1", 23.0).await.ok()) },
    )
    .await?;
    let recovered = Instant::now();
    // Keep polling after the recovery, so that what follows it is observed too.
    wait_answers("pages after the recovery", &poller, &seen, recovered, 10).await?;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), poller)
        .await
        .context("the poller did not stop")???;
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    let bad: Vec<&Seen> = seen.iter().filter(|s| !acceptable(s)).collect();
    ensure!(bad.is_empty(), "answers neither 200 nor a clear 503: {bad:#?}");
    let before: Vec<&Seen> = seen.iter().filter(|s| s.sent + s.took < killed).collect();
    let during: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.sent + s.took >= killed && s.sent < recovered)
        .collect();
    let after: Vec<&Seen> = seen.iter().filter(|s| s.sent > recovered).collect();
    let unavailable = seen
        .iter()
        .filter(|s| s.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let slowest = seen.iter().map(|s| s.took).max().unwrap_or_default();
    eprintln!(
        "{} answers: {} before the kill, {} during the failover ({} of them 503), {} after; \
         page back {:?} after the kill; slowest answer {:?}",
        seen.len(),
        before.len(),
        during.len(),
        unavailable,
        after.len(),
        recovered - killed,
        slowest
    );
    ensure!(
        before.iter().any(|s| s.status == StatusCode::OK),
        "no page before the kill: {before:#?}"
    );
    ensure!(!during.is_empty(), "nothing was asked during the failover");
    // Once it is back, it stays back, always on the new primary (node 0 is dead and fenced).
    for s in &after {
        ensure!(
            s.status == StatusCode::OK && s.node == Some(("node1".to_string(), "primary".to_string())),
            "after the recovery: {s:#?}"
        );
    }

    // The dashboard shows the new primary and dbproxy's failover event.
    let s = common::poll(
        "the dashboard to show node 1 as the primary",
        Duration::from_secs(10),
        || async {
            let s = app.get("/dashboard/state").await?.json()?;
            Ok((s["dbproxy"]["status"]["primary"] == 1).then_some(s))
        },
    )
    .await?;
    let relayed = history_of(&s["dbproxy"]["status"], "failover");
    ensure!(relayed.len() == 1 && relayed[0]["promoted"] == "node1", "{s}");

    // With no database left behind dbproxy (no standby to promote), and then with dbproxy itself
    // gone, the webapp says so clearly instead of failing hard or hanging.
    let c = stack.c.clone();
    tokio::task::spawn_blocking(move || c.node(1).kill9()).await??;
    check_unavailable(app, "no database behind dbproxy").await?;
    stack.proxy_stop.cancel();
    check_unavailable(app, "dbproxy stopped").await?;
    stack.app.stop().await?;
    // dbproxy's sessions still waiting for a primary hold its drain until its deadline; nothing
    // here depends on that.
    stack.proxy.abort();
    Ok(())
}

/// Waits until both pages answer 503, then checks those answers and one more of each: every one is
/// the webapp's clear 503 (a message, Retry-After, no trace), given within the client's 10 s bound.
async fn check_unavailable(app: &App, what: &str) -> Result<()> {
    let fetch = |path: &'static str| async move {
        let sent = Instant::now();
        let r = app.get(path).await?;
        anyhow::Ok(Seen {
            sent,
            took: sent.elapsed(),
            path,
            status: r.status,
            node: None,
            retry_after: r.headers.contains_key("retry-after"),
            body: r.body,
        })
    };
    let first = common::poll(what, Duration::from_secs(60), || async {
        let (page, api) = (fetch("/").await?, fetch("/api/overview").await?);
        Ok(
            (page.status == StatusCode::SERVICE_UNAVAILABLE && api.status == StatusCode::SERVICE_UNAVAILABLE)
                .then_some([page, api]),
        )
    })
    .await?;
    let again = [fetch("/").await?, fetch("/api/overview").await?];
    for s in first.iter().chain(&again) {
        ensure!(
            s.status == StatusCode::SERVICE_UNAVAILABLE && acceptable(s),
            "{what}: {s:#?}"
        );
    }
    for s in &first {
        eprintln!("{what}: {} answered 503 in {:?}: {}", s.path, s.took, reason(s));
    }
    Ok(())
}
