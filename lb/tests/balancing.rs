//! Distribution of each algorithm through a real lb in front of real backends on loopback.

mod support;

use std::collections::HashMap;

use anyhow::Result;
use lb::config::Algorithm;
use support::{config, start, Backend, Conn};

/// Which backend each of `n` sequential GETs of `path` reached.
async fn names(to: std::net::SocketAddr, path: &str, n: usize) -> Result<Vec<String>> {
    let mut c = Conn::open(to, "127.0.0.1").await?;
    let mut out = Vec::new();
    for _ in 0..n {
        let (status, body) = c.get(path).await?;
        assert_eq!(status, 200, "{body}");
        out.push(body);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_interleaves_weights_5_1_1_like_nginx() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let mut cfg = config(&[&a, &b, &c], Algorithm::RoundRobin);
    cfg.upstream.servers[0].weight = 5;
    let lb = start(cfg).await?;
    let got = names(lb.addr, "/", 70).await?.concat();
    assert_eq!(&got[..14], "aabacaaaabacaa");
    assert_eq!((a.hits(), b.hits(), c.hits()), (50, 10, 10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_the_busy_server() -> Result<()> {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = start(config(&[&a, &b], Algorithm::LeastConn)).await?;
    // Park one request on a; while it is in flight every other request must go to b.
    let addr = lb.addr;
    let held = tokio::spawn(async move { Conn::open(addr, "127.0.0.1").await?.get("/hold").await });
    support::wait_for("the held request", || async { (a.hits() == 1).then_some(()) }).await?;
    let got = names(lb.addr, "/", 10).await?;
    assert!(got.iter().all(|n| n == "b"), "{got:?}");
    a.release.notify_one();
    let (status, body) = held.await??;
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
    // With nothing in flight, ties alternate again.
    let got = names(lb.addr, "/", 4).await?;
    assert_eq!(got.iter().filter(|n| *n == "a").count(), 2, "{got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_uri_is_sticky_and_spread() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let mut cfg = config(&[&a, &b, &c], Algorithm::Hash);
    cfg.upstream.hash_key = "$request_uri".into();
    let lb = start(cfg).await?;
    let mut conn = Conn::open(lb.addr, "127.0.0.1").await?;
    let mut first: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for i in 0..60 {
            let path = format!("/item/{i}");
            let (_, name) = conn.get(&path).await?;
            if round == 0 {
                first.insert(path, name);
            } else {
                assert_eq!(first[&path], name, "{path} moved");
            }
        }
    }
    for n in ["a", "b", "c"] {
        assert!(
            first.values().filter(|v| *v == n).count() >= 5,
            "{n} got too few keys: {first:?}"
        );
    }
    // The mapping is the ring's: compare with the selector computed independently in-process.
    let names: Vec<String> = [&a, &b, &c].iter().map(|b| b.addr.to_string()).collect();
    let ring = lb::select::ConsistentHash::new(&names.iter().map(|n| (n.as_str(), 1)).collect::<Vec<_>>());
    struct All;
    impl lb::select::Peers for All {
        fn len(&self) -> usize {
            3
        }
        fn weight(&self, _: usize) -> u32 {
            1
        }
        fn usable(&self, _: usize) -> bool {
            true
        }
    }
    use lb::select::Select;
    for (path, name) in &first {
        let key = lb::select::Key::Hash(lb::select::crc32(path.as_bytes()));
        let i = ring.pick(&All, key, &mut Default::default()).unwrap();
        assert_eq!(["a", "b", "c"][i], name, "{path}");
    }
    Ok(())
}

/// nginx's ip_hash loop, transcribed straight from `ngx_http_upstream_get_ip_hash_peer` for the
/// first pick (every server up): hash from 89 over the first three octets, then walk the weights.
fn nginx_ip_hash(ip: [u8; 4], weights: &[u32]) -> usize {
    let mut hash: u32 = 89;
    for &octet in &ip[..3] {
        hash = (hash * 113 + u32::from(octet)) % 6271;
    }
    let mut w = hash % weights.iter().sum::<u32>();
    let mut p = 0;
    while w >= weights[p] {
        w -= weights[p];
        p += 1;
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_maps_client_addresses_as_nginx_does() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let mut cfg = config(&[&a, &b, &c], Algorithm::IpHash);
    cfg.upstream.servers[1].weight = 2;
    let lb = start(cfg).await?;
    let mut seen = [0; 3];
    // Clients from 40 different /24s of the loopback range (Linux routes all of 127/8 locally).
    for x in 0..40u8 {
        let ip = [127, x / 8, x.wrapping_mul(37), 1 + x];
        let from = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
        let want = ["a", "b", "c"][nginx_ip_hash(ip, &[1, 2, 1])];
        let mut conn = Conn::open(lb.addr, &from).await?;
        for _ in 0..3 {
            let (_, got) = conn.get("/").await?;
            assert_eq!(got, want, "client {from}");
        }
        // Another address in the same /24 lands on the same server.
        let same24 = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], 200);
        let (_, got) = Conn::open(lb.addr, &same24).await?.get("/").await?;
        assert_eq!(got, want, "client {same24}");
        seen[["a", "b", "c"].iter().position(|n| *n == want).unwrap()] += 1;
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "every server should get some clients: {seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_moves_clients_of_a_down_server_and_only_those() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let mut cfg = config(&[&a, &b, &c], Algorithm::IpHash);
    cfg.upstream.servers[1].down = true;
    let lb = start(cfg).await?;
    for x in 0..30u8 {
        let ip = [127, 1, x, 1];
        let from = format!("127.1.{x}.1");
        let natural = nginx_ip_hash(ip, &[1, 1, 1]);
        let (_, got) = Conn::open(lb.addr, &from).await?.get("/").await?;
        assert_ne!(got, "b", "down server used for {from}");
        if natural != 1 {
            assert_eq!(
                got,
                ["a", "b", "c"][natural],
                "client {from} moved although its server is up"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_serves_only_while_every_primary_is_out() -> Result<()> {
    let (a, b, backup) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("backup").await,
    );
    let mut cfg = config(&[&a, &b, &backup], Algorithm::RoundRobin);
    cfg.upstream.servers[2].backup = true;
    let lb = start(cfg).await?;
    let got = names(lb.addr, "/", 6).await?;
    assert!(!got.contains(&"backup".to_string()), "{got:?}");
    a.kill();
    b.kill();
    let got = names(lb.addr, "/", 6).await?;
    assert!(got.iter().all(|n| n == "backup"), "{got:?}");
    Ok(())
}
