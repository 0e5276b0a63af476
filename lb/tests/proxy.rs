//! The proxy end to end: failures and retries, headers, websockets, limits, reload, shutdown,
//! h2c and the admin endpoints, all against real backends and lb on loopback.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use lb::config::{Algorithm, Dur, ServerConfig};
use support::{admin_get, config, dead_addr, get_once, raw, start, wait_for, Backend, Conn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_causes_zero_failed_gets() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut cfg = config(&[&a, &b], Algorithm::RoundRobin);
    // A third server that was never up.
    cfg.upstream.servers.push(ServerConfig {
        addr: dead_addr().await.to_string(),
        ..Default::default()
    });
    let lb = start(cfg).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    for i in 0..60 {
        let (status, body) = conn.get("/").await?;
        assert_eq!(status, 200, "request {i}: {body}");
        if i == 20 {
            // b dies mid-run: its pooled connections close and its port refuses.
            b.kill();
        }
    }
    assert!(b.hits() > 0 && a.hits() > 20);
    let status = admin_get(lb.admin, "/status").await?;
    assert!(status.contains("\"resting\":true"), "{status}");
    let metrics = admin_get(lb.admin, "/metrics").await?;
    assert!(metrics.contains("lb_retries_total"), "{metrics}");
    assert!(!metrics.contains("code=\"502\""), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_dead_gives_502_and_slow_upstream_504() -> Result<()> {
    let mut cfg = config(&[], Algorithm::RoundRobin);
    cfg.upstream.servers = vec![ServerConfig {
        addr: dead_addr().await.to_string(),
        ..Default::default()
    }];
    let lb = start(cfg).await?;
    let (status, body) = get_once(lb.addr, "/").await?;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("bad gateway"), "{body}");

    let slow = Backend::start("slow").await;
    let mut cfg = config(&[&slow], Algorithm::RoundRobin);
    cfg.timeouts.upstream_response = Dur(Duration::from_millis(300));
    let lb = start(cfg).await?;
    let t = Instant::now();
    let (status, body) = get_once(lb.addr, "/hold").await?;
    assert_eq!(status, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_status_only_for_idempotent_requests() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.failing.store(true, Ordering::SeqCst);
    let mut cfg = config(&[&a, &b], Algorithm::RoundRobin);
    cfg.retry.on_status = true;
    for s in &mut cfg.upstream.servers {
        s.max_fails = 0; // keep a in rotation so every request meets it
    }
    let lb = start(cfg).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    for _ in 0..6 {
        let (status, body) = conn.get("/").await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, "b"));
    }
    // A POST whose body went to a is never repeated: a's 503 comes back as is.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = Request::post("/echo")
            .header("host", "app.example")
            .body(Full::new(Bytes::from_static(b"payload")))?;
        statuses.push(conn.send(req).await?.0.as_u16());
    }
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_when_the_connect_fails_before_its_body_was_sent() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.upstream.servers.insert(
        0,
        ServerConfig {
            addr: dead_addr().await.to_string(),
            ..Default::default()
        },
    );
    let lb = start(cfg).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    for i in 0..4 {
        let body = format!("body {i}");
        let req = Request::post("/echo")
            .header("host", "app.example")
            .body(Full::new(Bytes::from(body.clone())))?;
        let (status, echoed) = conn.send(req).await?;
        assert_eq!((status.as_u16(), echoed), (200, body));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_stripped() -> Result<()> {
    let a = Backend::start("a").await;
    let lb = start(config(&[&a], Algorithm::RoundRobin)).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    let req = Request::get("/headers")
        .header("host", "app.example")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::new()))?;
    let (status, text) = conn.send(req).await?;
    assert_eq!(status, 200);
    assert!(text.contains("host: app.example\n"), "{text}");
    assert!(
        text.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{text}"
    );
    assert!(text.contains("x-real-ip: 127.0.0.1\n"), "{text}");
    assert!(text.contains("x-forwarded-proto: http\n"), "{text}");
    assert!(
        text.contains("forwarded: for=127.0.0.1;proto=http;host=\"app.example\"\n"),
        "{text}"
    );
    assert!(!text.contains("x-hop"), "{text}");
    assert!(!text.contains("keep-alive: timeout"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_passes_through_and_survives_a_reload() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = start(config(&[&a], Algorithm::RoundRobin)).await?;
    let mut s = TcpStream::connect(lb.addr).await?;
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(support::DEADLINE, s.read(&mut byte)).await??;
        anyhow::ensure!(
            n == 1,
            "closed before the 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // A masked websocket text frame "hello", echoed back byte for byte by the backend.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    let mut echo = [0u8; 11];
    s.write_all(&frame).await?;
    tokio::time::timeout(support::DEADLINE, s.read_exact(&mut echo)).await??;
    assert_eq!(echo, frame);
    // nginx cuts websockets on reload; lb must not.
    lb.lb.reload(config(&[&b], Algorithm::RoundRobin))?;
    let (_, name) = get_once(lb.addr, "/").await?;
    assert_eq!(name, "b", "new requests follow the new server list");
    s.write_all(&frame).await?;
    tokio::time::timeout(support::DEADLINE, s.read_exact(&mut echo)).await??;
    assert_eq!(echo, frame);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_by_the_header_timeout() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.timeouts.header_read = Dur(Duration::from_secs(1));
    let lb = start(cfg).await?;
    let started = Instant::now();
    let mut s = TcpStream::connect(lb.addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
    // Drip one header byte every 100 ms, as slowloris does, until lb hangs up.
    let closed_after = loop {
        anyhow::ensure!(
            started.elapsed() < support::DEADLINE,
            "lb never closed the slow connection"
        );
        if s.write_all(b"X").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => {} // an error response (408) may precede the close
            Err(_) => {}
        }
    };
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(5),
        "closed too late: {closed_after:?}"
    );
    assert_eq!(a.hits(), 0);

    // A client that connects and sends nothing is closed as well.
    let started = Instant::now();
    let mut idle = TcpStream::connect(lb.addr).await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(support::DEADLINE, idle.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_big_bodies_413() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.limits.max_header_bytes = 16 * 1024;
    cfg.limits.max_body_bytes = 1000;
    let lb = start(cfg).await?;
    let big = "v".repeat(20 * 1024);
    let out = raw(
        lb.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await?;
    assert!(out.starts_with("HTTP/1.1 431"), "{}", &out[..out.len().min(200)]);
    // Under the limit is fine.
    let ok = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Small: 1\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    let req = Request::post("/echo")
        .header("host", "app.example")
        .body(Full::new(Bytes::from(vec![b'x'; 2000])))?;
    assert_eq!(conn.send(req).await?.0, 413);
    // A chunked body without a length is cut at the limit too.
    let chunked = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        1500,
        "y".repeat(1500)
    );
    let out = raw(lb.addr, chunked.as_bytes()).await?;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    let req = Request::post("/echo")
        .header("host", "app.example")
        .body(Full::new(Bytes::from(vec![b'x'; 900])))?;
    assert_eq!(Conn::open(lb.addr, "127.0.0.1").await?.send(req).await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_has_zero_errors() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let lb = start(config(&[&a, &b], Algorithm::RoundRobin)).await?;
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, errors, done, stop) = (lb.addr, errors.clone(), done.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr, "127.0.0.1").await?;
            // Bounded: at most 5000 requests per client.
            for _ in 0..5000 {
                if stop.is_cancelled() {
                    break;
                }
                match conn.get("/").await {
                    Ok((s, _)) if s == 200 => {}
                    _ => {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(())
        }));
    }
    wait_for("load before the reload", || async {
        (done.load(Ordering::SeqCst) > 200).then_some(())
    })
    .await?;
    lb.lb.reload(config(&[&b, &c], Algorithm::RoundRobin))?;
    wait_for("c to get traffic", || async { (c.hits() > 50).then_some(()) }).await?;
    let a_after = a.hits();
    wait_for("more traffic after the reload", || async {
        (c.hits() > 150).then_some(())
    })
    .await?;
    stop.cancel();
    for t in clients {
        t.await??;
    }
    assert_eq!(errors.load(Ordering::SeqCst), 0);
    assert_eq!(a.hits(), a_after, "the removed server still got requests");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_server_out_and_bring_it_back() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut cfg = config(&[&a, &b], Algorithm::RoundRobin);
    cfg.health.enabled = true;
    cfg.health.path = "/health".into();
    cfg.health.interval = Dur(Duration::from_millis(50));
    cfg.health.rise = 2;
    cfg.health.fall = 2;
    for s in &mut cfg.upstream.servers {
        s.slow_start = Dur(Duration::from_secs(30));
        s.weight = 10;
    }
    let lb = start(cfg).await?;
    a.healthy.store(false, Ordering::SeqCst);
    let admin = lb.admin;
    wait_for("a marked unhealthy", || async move {
        let s = admin_get(admin, "/status").await.ok()?;
        s.contains("\"healthy\":false").then_some(())
    })
    .await?;
    let before = a.hits();
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    for _ in 0..10 {
        assert_eq!(conn.get("/").await?.1, "b");
    }
    assert_eq!(a.hits(), before);
    a.healthy.store(true, Ordering::SeqCst);
    wait_for("a healthy again", || async move {
        let s = admin_get(admin, "/status").await.ok()?;
        (!s.contains("\"healthy\":false")).then_some(())
    })
    .await?;
    // Slow start: right after recovery a's weight is ramping, below b's.
    let status: serde_json::Value = serde_json::from_str(&admin_get(admin, "/status").await?)?;
    let w = status["servers"][0]["effective_weight"]
        .as_u64()
        .context("weight")?;
    assert!(w <= 2, "{status}");
    // Bounded: a must be back in rotation within 200 requests.
    for _ in 0..200 {
        if a.hits() > before {
            break;
        }
        conn.get("/").await?;
    }
    assert!(a.hits() > before, "a never served again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() -> Result<()> {
    let a = Backend::start("a").await;
    let lb = start(config(&[&a], Algorithm::RoundRobin)).await?;
    let stream = TcpStream::connect(lb.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get(format!("http://{}/headers", lb.addr)).body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        assert_eq!(resp.status(), 200);
        let text = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
        assert!(text.contains(&format!("host: {}\n", lb.addr)), "{text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_describe_the_traffic() -> Result<()> {
    let a = Backend::start("a").await;
    let lb = start(config(&[&a], Algorithm::RoundRobin)).await?;
    for _ in 0..3 {
        get_once(lb.addr, "/").await?;
    }
    let m = admin_get(lb.admin, "/metrics").await?;
    let line = format!("lb_requests_total{{code=\"200\",upstream=\"{}\"}} 3", a.addr);
    assert!(m.contains(&line), "{m}");
    assert!(m.contains("lb_request_duration_seconds_count 3"), "{m}");
    assert!(
        m.contains(&format!("lb_upstream_up{{upstream=\"{}\"}} 1", a.addr)),
        "{m}"
    );
    assert!(m.contains("lb_active_connections"), "{m}");
    let s: serde_json::Value = serde_json::from_str(&admin_get(lb.admin, "/status").await?)?;
    assert_eq!(s["servers"][0]["requests"], 3);
    assert_eq!(s["algorithm"], "round_robin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_then_stops() -> Result<()> {
    let a = Backend::start("a").await;
    let lb = start(config(&[&a], Algorithm::RoundRobin)).await?;
    let addr = lb.addr;
    let held = tokio::spawn(async move { Conn::open(addr, "127.0.0.1").await?.get("/hold").await });
    wait_for("the held request", || async { (a.hits() == 1).then_some(()) }).await?;
    lb.shutdown.cancel();
    // New connections are refused once the listener is gone.
    wait_for("the listener to close", || async move {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await?;
    assert!(!lb.task.is_finished(), "lb must wait for the in-flight request");
    a.release.notify_one();
    let (status, body) = held.await??;
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
    let mut lb = lb;
    tokio::time::timeout(support::DEADLINE, &mut lb.task).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_clients_are_closed_after_the_idle_timeout() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.timeouts.client_idle = Dur(Duration::from_millis(500));
    let lb = start(cfg).await?;
    let mut s = TcpStream::connect(lb.addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(support::DEADLINE, s.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    let n = tokio::time::timeout(support::DEADLINE, s.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the idle connection to be closed");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(400) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_free_slot() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.limits.max_connections = 2;
    let lb = start(cfg).await?;
    let mut first = Conn::open(lb.addr, "127.0.0.1").await?;
    let mut second = Conn::open(lb.addr, "127.0.0.1").await?;
    assert_eq!(first.get("/").await?.0, 200);
    assert_eq!(second.get("/").await?.0, 200);
    // The third connection sits in the kernel backlog: no answer while both slots are taken.
    let addr = lb.addr;
    let mut third = tokio::spawn(async move { Conn::open(addr, "127.0.0.1").await?.get("/").await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
    assert!(early.is_err(), "the third connection was served beyond the limit");
    assert_eq!(a.hits(), 2);
    drop(first);
    let (status, _) = tokio::time::timeout(support::DEADLINE, third).await???;
    assert_eq!(status, 200);
    assert_eq!(second.get("/").await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_connection_limit() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.limits.max_connections = 1;
    let lb = start(cfg.clone()).await?;
    let mut first = Conn::open(lb.addr, "127.0.0.1").await?;
    assert_eq!(first.get("/").await?.0, 200);
    // The second connection waits in the backlog under a limit of 1...
    let addr = lb.addr;
    let mut second = tokio::spawn(async move {
        let mut c = Conn::open(addr, "127.0.0.1").await?;
        let r = c.get("/").await?;
        Ok::<_, anyhow::Error>((c, r))
    });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut second).await;
    assert!(early.is_err(), "served beyond the limit");
    // ...and is served once a reload raises the limit, with the first still open.
    cfg.limits.max_connections = 2;
    lb.lb.reload(cfg.clone())?;
    let (mut second, (status, _)) = tokio::time::timeout(support::DEADLINE, second).await???;
    assert_eq!(status, 200);
    // Lowered back to 1: both open connections go on, a third waits until both have closed.
    cfg.limits.max_connections = 1;
    lb.lb.reload(cfg)?;
    let mut third = tokio::spawn(async move { Conn::open(addr, "127.0.0.1").await?.get("/").await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
    assert!(early.is_err(), "served beyond the lowered limit");
    assert_eq!(first.get("/").await?.0, 200);
    assert_eq!(second.get("/").await?.0, 200);
    drop(first);
    let early = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
    assert!(
        early.is_err(),
        "served with two connections open under a limit of 1"
    );
    drop(second);
    let (status, _) = tokio::time::timeout(support::DEADLINE, third).await???;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_websockets_at_the_deadline() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.timeouts.shutdown_grace = Dur(Duration::from_millis(1500));
    let mut lb = start(cfg).await?;
    let mut s = TcpStream::connect(lb.addr).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(support::DEADLINE, s.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    s.write_all(b"ping").await?;
    let mut four = [0u8; 4];
    tokio::time::timeout(support::DEADLINE, s.read_exact(&mut four)).await??;
    assert_eq!(&four, b"ping");
    let t = Instant::now();
    lb.shutdown.cancel();
    // Still relayed during the grace period...
    s.write_all(b"pong").await?;
    tokio::time::timeout(support::DEADLINE, s.read_exact(&mut four)).await??;
    assert_eq!(&four, b"pong");
    // ...and closed once it is over; lb's serve then returns.
    let n = tokio::time::timeout(support::DEADLINE, s.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() >= Duration::from_millis(1400), "{:?}", t.elapsed());
    tokio::time::timeout(support::DEADLINE, &mut lb.task).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_stalling_mid_body_is_cut_off_by_the_read_timeout() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.timeouts.upstream_response = Dur(Duration::from_millis(500));
    let lb = start(cfg).await?;
    let started = Instant::now();
    let out = raw(lb.addr, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("start"), "{out}");
    assert!(
        !out.ends_with("0\r\n\r\n"),
        "the cut body must not look complete: {out}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&admin_get(lb.admin, "/status").await?)?;
    assert_eq!(
        status["servers"][0]["active"], 0,
        "the stalled request still counts as active"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_rewritten_when_configured() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.headers.host = "internal.example".into();
    let lb = start(cfg).await?;
    let (_, text) = Conn::open(lb.addr, "127.0.0.1").await?.get("/headers").await?;
    assert!(text.contains("host: internal.example\n"), "{text}");
    assert!(
        text.contains("forwarded: for=127.0.0.1;proto=http;host=\"app.example\"\n"),
        "{text}"
    );
    Ok(())
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
async fn blackhole() -> Result<(tokio::net::TcpListener, Vec<TcpStream>, std::net::SocketAddr)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind("127.0.0.1:0".parse()?)?;
    let listener = sock.listen(0)?;
    let addr = listener.local_addr()?;
    let mut fillers = Vec::new();
    // Fill the queue until a connect no longer completes at once.
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => return Ok((listener, fillers, addr)),
        }
    }
    anyhow::bail!("could not fill the accept queue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_moves_the_request_to_the_next_server() -> Result<()> {
    let (_hole, _fillers, hole_addr) = blackhole().await?;
    let b = Backend::start("b").await;
    let mut cfg = config(&[&b], Algorithm::RoundRobin);
    cfg.upstream.servers.insert(
        0,
        ServerConfig {
            addr: hole_addr.to_string(),
            ..Default::default()
        },
    );
    cfg.timeouts.upstream_connect = Dur(Duration::from_millis(300));
    let lb = start(cfg).await?;
    let started = Instant::now();
    let (status, body) = get_once(lb.addr, "/").await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "b"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let m = admin_get(lb.admin, "/metrics").await?;
    assert!(m.contains("lb_retries_total 1"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_are_closed_after_the_upgraded_idle_timeout() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.timeouts.upgraded_idle = Dur(Duration::from_millis(1500));
    let lb = start(cfg).await?;
    let mut s = TcpStream::connect(lb.addr).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(support::DEADLINE, s.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    // Traffic keeps it open past the idle timeout...
    let started = Instant::now();
    let mut four = [0u8; 4];
    while started.elapsed() < Duration::from_millis(2500) {
        s.write_all(b"ping").await?;
        tokio::time::timeout(support::DEADLINE, s.read_exact(&mut four)).await??;
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing the traffic, not synchronising
    }
    // ...silence closes it.
    let quiet = Instant::now();
    let n = tokio::time::timeout(support::DEADLINE, s.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_configured_number_of_tries() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    for _ in 0..2 {
        cfg.upstream.servers.insert(
            0,
            ServerConfig {
                addr: dead_addr().await.to_string(),
                ..Default::default()
            },
        );
    }
    for s in &mut cfg.upstream.servers {
        s.max_fails = 0; // keep the dead servers in rotation
    }
    cfg.retry.tries = 2;
    let lb = start(cfg.clone()).await?;
    // Smooth round robin tries dead 0, then dead 1, and two tries are all it may use.
    let (status, body) = get_once(lb.addr, "/").await?;
    assert_eq!(status, 502, "{body}");
    assert_eq!(a.hits(), 0);
    cfg.retry.tries = 0;
    lb.lb.reload(cfg)?;
    let (status, body) = get_once(lb.addr, "/").await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_websockets_count_against_the_connection_limit() -> Result<()> {
    let a = Backend::start("a").await;
    let mut cfg = config(&[&a], Algorithm::RoundRobin);
    cfg.limits.max_connections = 1;
    let lb = start(cfg).await?;
    let mut ws = TcpStream::connect(lb.addr).await?;
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(support::DEADLINE, ws.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    let addr = lb.addr;
    let mut other = tokio::spawn(async move { get_once(addr, "/").await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut other).await;
    assert!(
        early.is_err(),
        "a second connection was served while the websocket held the only slot"
    );
    drop(ws);
    let (status, _) = tokio::time::timeout(support::DEADLINE, other).await???;
    assert_eq!(status, 200);
    Ok(())
}
