//! The webapp against real PostgreSQL servers (testkit): the page names the instance and the node
//! that answered, the JSON API, readiness and friendly 503s across a database outage, and four
//! instances migrating an empty database at once.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{config, insert_sample, poll, wait_ready, App};
use hyper::StatusCode;

async fn cluster(standbys: usize) -> Result<std::sync::Arc<testkit::PgCluster>> {
    tokio::task::spawn_blocking(move || {
        testkit::PgCluster::builder()
            .standbys(standbys)
            .start()
            .map(std::sync::Arc::new)
    })
    .await?
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_api_show_instance_node_and_role() -> Result<()> {
    let c = cluster(1).await?;
    let primary = c.primary().conn_string();
    let mut cfg = config("web-a", &primary);
    cfg.history = 2;
    let a = App::start(cfg).await?;
    wait_ready(&a).await?;

    insert_sample(&primary, "host-a", 1_795_000_000, 10.0).await?;
    insert_sample(&primary, "host-a", 1_795_000_060, 20.0).await?;
    insert_sample(&primary, "host-a", 1_795_000_120, 30.0).await?;
    insert_sample(&primary, "host-<b>", 1_795_000_000, 55.5).await?;

    let page = a.get("/").await?;
    ensure!(page.status == StatusCode::OK, "{page:?}");
    let ct = page.headers.get("content-type").context("no content-type")?;
    ensure!(ct.to_str()?.starts_with("text/html"), "{ct:?}");
    for needle in [
        "<strong id=\"instance\">web-a</strong>",
        "<strong id=\"node-name\">node0</strong>",
        "<strong id=\"node-role\" class=\"role\">primary</strong>",
        "host-a",
        "host-&lt;b&gt;",
        "30.0%",
        "2026-11-18",
    ] {
        ensure!(page.body.contains(needle), "page lacks {needle}:\n{}", page.body);
    }
    ensure!(!page.body.contains("host-<b>"), "host name not escaped");

    let api = a.get("/api/overview").await?;
    ensure!(api.status == StatusCode::OK, "{api:?}");
    let v = api.json()?;
    ensure!(v["instance"] == "web-a", "{v}");
    ensure!(v["node"]["name"] == "node0", "{v}");
    ensure!(v["node"]["role"] == "primary", "{v}");
    ensure!(v["node"]["in_recovery"] == false, "{v}");
    ensure!(v["node"]["port"] == i64::from(c.primary().port()), "{v}");
    let hosts = v["hosts"].as_array().context("hosts")?;
    ensure!(hosts.len() == 2, "{v}");
    let host_a = hosts
        .iter()
        .find(|h| h["host"] == "host-a")
        .context("no host-a")?;
    ensure!(hosts.iter().any(|h| h["host"] == "host-<b>"), "{v}");
    // history = 2: the two newest samples, newest first.
    let hist = host_a["history"].as_array().context("history")?;
    ensure!(hist.len() == 2, "{v}");
    ensure!(
        hist[0]["cpu_percent"] == 30.0 && hist[1]["cpu_percent"] == 20.0,
        "{v}"
    );
    ensure!(host_a["latest"]["cpu_percent"] == 30.0, "{v}");

    // The same code pointed at the standby names the standby and its role.
    let c2 = c.clone();
    blocking(move || c2.wait_replicated()).await?;
    let b = App::start(config("web-b", &c.standby(0).conn_string())).await?;
    wait_ready(&b).await?;
    let page = b.get("/").await?;
    ensure!(page.status == StatusCode::OK, "{page:?}");
    for needle in [
        "<strong id=\"instance\">web-b</strong>",
        "<strong id=\"node-name\">node1</strong>",
        "<strong id=\"node-role\" class=\"role\">standby</strong>",
        "host-a",
    ] {
        ensure!(
            page.body.contains(needle),
            "standby page lacks {needle}:\n{}",
            page.body
        );
    }
    let v = b.get("/api/overview").await?.json()?;
    ensure!(
        v["node"]["name"] == "node1" && v["node"]["role"] == "standby",
        "{v}"
    );
    ensure!(v["node"]["port"] == i64::from(c.standby(0).port()), "{v}");
    let info = b.get("/api/info").await?.json()?;
    ensure!(info["migrations"]["applied"] == serde_json::json!([]), "{info}");

    // Health, metrics, unknown pages.
    let h = a.get("/healthz").await?;
    ensure!(h.status == StatusCode::OK && h.body == "ok\n", "{h:?}");
    let nf = a.get("/no/such/page").await?;
    ensure!(
        nf.status == StatusCode::NOT_FOUND && nf.body.contains("not found"),
        "{nf:?}"
    );
    let m = a.get("/metrics").await?;
    ensure!(m.status == StatusCode::OK, "{m:?}");
    for needle in [
        "webapp_http_requests_total{code=\"200\",route=\"/\"} 1",
        "webapp_http_requests_total{code=\"200\",route=\"/api/overview\"} 1",
        "webapp_http_requests_total{code=\"404\",route=\"unmatched\"} 1",
        "webapp_http_request_duration_seconds_bucket",
        "webapp_db_request_duration_seconds_count",
    ] {
        ensure!(m.body.contains(needle), "metrics lack {needle}:\n{}", m.body);
    }
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_give_friendly_503s_and_readiness_follows_the_database() -> Result<()> {
    let c = cluster(0).await?;
    let url = c.primary().conn_string();
    let c2 = c.clone();
    blocking(move || c2.primary().stop()).await?;

    // Started while the database is down: alive, not ready, a friendly page, no crash loop.
    let app = App::start(config("web-x", &url)).await?;
    let h = app.get("/healthz").await?;
    ensure!(h.status == StatusCode::OK, "{h:?}");
    let r = app.get("/readyz").await?;
    ensure!(r.status == StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    let page = app.get("/").await?;
    check_friendly_503(&page, "web-x")?;

    let c2 = c.clone();
    blocking(move || c2.primary().start()).await?;
    wait_ready(&app).await?;
    let info = app.get("/api/info").await?.json()?;
    ensure!(info["migrations"]["applied"] == serde_json::json!([1]), "{info}");
    ensure!(info["migrations"]["attempts"].as_u64() > Some(1), "{info}");
    insert_sample(&url, "host-a", 1_795_000_000, 10.0).await?;

    // Fill the pool with several connections, all of which the next outage kills.
    let (r1, r2, r3, r4) = tokio::join!(app.get("/"), app.get("/"), app.get("/api/overview"), app.get("/"));
    for r in [r1?, r2?, r3?, r4?] {
        ensure!(r.status == StatusCode::OK, "{r:?}");
    }

    let c2 = c.clone();
    blocking(move || c2.primary().stop()).await?;
    let r = app.get("/readyz").await?;
    ensure!(r.status == StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    ensure!(r.body.starts_with("not ready:"), "{r:?}");
    let page = app.get("/").await?;
    check_friendly_503(&page, "web-x")?;
    let api = app.get("/api/overview").await?;
    ensure!(api.status == StatusCode::SERVICE_UNAVAILABLE, "{api:?}");
    let v = api.json()?;
    ensure!(
        v["error"] == "database unavailable" && v["instance"] == "web-x",
        "{v}"
    );

    // Back up: pooled connections are verified before use, so not one request fails after the
    // server accepts connections again, even though every pooled connection died.
    let c2 = c.clone();
    blocking(move || c2.primary().start()).await?;
    for i in 0..8 {
        let r = app.get(if i % 2 == 0 { "/" } else { "/api/overview" }).await?;
        ensure!(r.status == StatusCode::OK, "request {i} after restart: {r:?}");
    }
    let r = app.get("/readyz").await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");

    let m = app.get("/metrics").await?;
    ensure!(
        m.body
            .contains("webapp_http_requests_total{code=\"503\",route=\"/\"} 2"),
        "{}",
        m.body
    );
    ensure!(
        m.body.contains("webapp_db_errors_total{kind=\"connect\"}"),
        "{}",
        m.body
    );
    app.stop().await?;
    Ok(())
}

fn check_friendly_503(page: &common::Reply, instance: &str) -> Result<()> {
    ensure!(page.status == StatusCode::SERVICE_UNAVAILABLE, "{page:?}");
    ensure!(
        page.headers.get("retry-after").map(|v| v.as_bytes()) == Some(b"5"),
        "{page:?}"
    );
    let ct = page.headers.get("content-type").context("no content-type")?;
    ensure!(ct.to_str()?.starts_with("text/html"), "{ct:?}");
    ensure!(
        page.body.contains("The database is not reachable right now"),
        "{}",
        page.body
    );
    ensure!(page.body.contains(instance), "{}", page.body);
    ensure!(
        !page.body.contains("panicked") && !page.body.contains("backtrace"),
        "{}",
        page.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_migrate_an_empty_database_exactly_once() -> Result<()> {
    let c = cluster(0).await?;
    let url = c.primary().conn_string();
    let (a, b, d, e) = tokio::join!(
        App::start(config("m1", &url)),
        App::start(config("m2", &url)),
        App::start(config("m3", &url)),
        App::start(config("m4", &url)),
    );
    let apps = [a?, b?, d?, e?];
    let mut appliers = 0;
    for app in &apps {
        let info = poll("migrations done", Duration::from_secs(60), || async {
            let v = app.get("/api/info").await?.json()?;
            Ok((!v["migrations"].is_null()).then_some(v))
        })
        .await?;
        let applied = info["migrations"]["applied"].as_array().context("applied")?;
        if !applied.is_empty() {
            ensure!(applied.len() == schema::MIGRATIONS.len(), "{info}");
            appliers += 1;
        } else {
            ensure!(
                info["migrations"]["already"] == schema::MIGRATIONS.len(),
                "{info}"
            );
        }
    }
    ensure!(appliers == 1, "{appliers} instances applied migrations");
    for app in &apps {
        wait_ready(app).await?;
        let page = app.get("/").await?;
        ensure!(page.status == StatusCode::OK, "{page:?}");
        ensure!(page.body.contains("no samples yet"), "{}", page.body);
    }
    let c2 = c.clone();
    let rows = blocking(move || c2.primary().psql("SELECT count(*) FROM schema_migrations")).await?;
    ensure!(rows == schema::MIGRATIONS.len().to_string(), "{rows}");
    for app in apps {
        app.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_over_without_failed_requests() -> Result<()> {
    let c = cluster(1).await?;
    // Both nodes, writable one wanted: libpq's own multi-host failover, standing in for dbproxy
    // (which re-points by itself) until the two are tested together.
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
         target_session_attrs=read-write",
        c.node(0).port(),
        c.node(1).port()
    );
    let app = App::start(config("web-f", &url)).await?;
    wait_ready(&app).await?;
    insert_sample(&c.primary().conn_string(), "host-a", 1_795_000_000, 10.0).await?;
    let (r1, r2, r3, r4) = tokio::join!(
        app.get("/api/overview"),
        app.get("/api/overview"),
        app.get("/api/overview"),
        app.get("/api/overview")
    );
    for r in [r1?, r2?, r3?, r4?] {
        let v = r.json()?;
        ensure!(
            v["node"]["name"] == "node0" && v["node"]["role"] == "primary",
            "{v}"
        );
    }
    let c2 = c.clone();
    blocking(move || {
        c2.wait_replicated()?;
        c2.node(0).kill9()
    })
    .await?;

    // Between the crash and the promotion no node takes writes: a friendly 503, not a 500.
    let page = app.get("/").await?;
    check_friendly_503(&page, "web-f")?;

    let c2 = c.clone();
    blocking(move || c2.promote(1)).await?;
    // Every pooled connection died with node0; each is verified before use and replaced, so no
    // request after the promotion fails, and every one is answered by the new primary.
    for i in 0..8 {
        let r = app.get("/api/overview").await?;
        ensure!(r.status == StatusCode::OK, "request {i} after promotion: {r:?}");
        let v = r.json()?;
        ensure!(
            v["node"]["name"] == "node1" && v["node"]["role"] == "primary",
            "{v}"
        );
        ensure!(v["hosts"][0]["host"] == "host-a", "{v}");
    }
    let page = app.get("/").await?;
    ensure!(
        page.body.contains("<strong id=\"node-name\">node1</strong>"),
        "{}",
        page.body
    );
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_hangs_is_cut_off_by_the_timeout() -> Result<()> {
    let c = cluster(0).await?;
    let url = c.primary().conn_string();
    let mut cfg = config("web-h", &url);
    cfg.query_timeout_ms = 400;
    let app = App::start(cfg).await?;
    wait_ready(&app).await?;
    let r = app.get("/").await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");

    // Another session holds an exclusive lock on samples: the page's query waits on it forever.
    let (locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let conn_task = tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE samples IN ACCESS EXCLUSIVE MODE")
        .await?;
    let started = std::time::Instant::now();
    let page = app.get("/").await?;
    let api = app.get("/api/overview").await?;
    let elapsed = started.elapsed();
    check_friendly_503(&page, "web-h")?;
    ensure!(page.body.contains("did not answer within"), "{}", page.body);
    ensure!(api.status == StatusCode::SERVICE_UNAVAILABLE, "{api:?}");
    // Two requests, each cut off at 400 ms, with room for a loaded machine.
    ensure!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    // The timed-out connections were dropped, not pooled: their backends go away and nothing of
    // theirs waits on the lock any more.
    poll("timed-out sessions gone", Duration::from_secs(20), || async {
        let waiting: i64 = locker
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'webapp' \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .await?
            .get(0);
        Ok((waiting == 0).then_some(()))
    })
    .await?;
    locker.batch_execute("COMMIT").await?;
    // With the lock gone the page works again (polled: a fresh connection may take a moment to
    // set up on a loaded machine, and the 400 ms bound applies to that too).
    poll("page back after the lock", Duration::from_secs(20), || async {
        Ok((app.get("/").await?.status == StatusCode::OK).then_some(()))
    })
    .await?;
    let m = app.get("/metrics").await?;
    ensure!(
        m.body.contains("webapp_db_errors_total{kind=\"timeout\"} 2"),
        "{}",
        m.body
    );
    drop(locker);
    let _ = conn_task.await;
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_dead_pooled_connection_is_replaced_before_use() -> Result<()> {
    let c = cluster(0).await?;
    let url = c.primary().conn_string();
    let mut cfg = config("web-p", &url);
    cfg.pool_size = 1;
    let app = App::start(cfg).await?;
    wait_ready(&app).await?;
    let r = app.get("/").await?;
    ensure!(r.status == StatusCode::OK, "{r:?}");

    // The one pooled session's backend stops answering while its socket stays open, as over a
    // partition: only a ping before use can tell.
    let c2 = c.clone();
    let pid = blocking(move || {
        testkit::wait_for("one pooled session", testkit::DEADLINE, || {
            let pids = c2
                .primary()
                .psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'webapp'")?;
            Ok((pids.lines().count() == 1).then(|| pids.trim().to_string()))
        })
    })
    .await?;
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()?;
    ensure!(stop.success(), "kill -STOP {pid}");
    let started = std::time::Instant::now();
    let r = app.get("/").await;
    let elapsed = started.elapsed();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    let r = r?;
    ensure!(r.status == StatusCode::OK, "request on a half-dead pool: {r:?}");
    ensure!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    app.stop().await?;
    Ok(())
}
