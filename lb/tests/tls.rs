//! TLS termination with certificates made by openssl: SNI picks each server's certificate,
//! curl gets HTTP/2 or HTTP/1.1 by ALPN, upstreams see `X-Forwarded-Proto: https`, port 80
//! redirects to 443 (all from an nginx.conf); SIGHUP re-reads certificates without dropping an
//! open HTTP/2 connection, and a bad new certificate keeps the old one and says why.

mod support;

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::proc::Proc;
use support::tls::{ca, client, connect, curl, der, leaf, serve};
use support::{echo, wait_for};

fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], testkit::free_port()?)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_alpn_h2_forwarded_proto_and_redirect_to_https() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (a_crt, a_key) = leaf(dir.path(), &authority, "a.test", "a")?;
    let (b_crt, b_key) = leaf(dir.path(), &authority, "b.test", "b")?;
    let (app, api) = (echo("app").await?, echo("api").await?);
    let (plain, tls) = (free_addr()?, free_addr()?);
    let _lb = serve(&format!(
        "http {{\n upstream app {{ server {app}; }}\n upstream api {{ server {api}; }}\n\
         ssl_protocols TLSv1.2 TLSv1.3;\n\
         server {{ listen {plain}; server_name a.test; return 301 https://$host$request_uri; }}\n\
         server {{ listen {tls} ssl; server_name a.test; ssl_certificate {}; ssl_certificate_key {};\n\
           location / {{ proxy_pass http://app; }} }}\n\
         server {{ listen {tls} ssl; server_name b.test; ssl_certificate {}; ssl_certificate_key {};\n\
           location / {{ proxy_pass http://api; }} }}\n}}\n",
        a_crt.display(),
        a_key.display(),
        b_crt.display(),
        b_key.display(),
    ))
    .await?;
    let ca_crt = authority.0.clone();
    let (ca2, tls2) = (ca_crt.clone(), tls);
    wait_for("lb to serve TLS", move || {
        let ca = ca2.clone();
        async move { curl(&ca, tls2, "a.test", "/", &[]).ok() }
    })
    .await?;
    // curl checks the certificate against the name: each SNI got its own server's.
    let out = tokio::task::spawn_blocking(move || -> Result<[String; 4]> {
        Ok([
            curl(&ca_crt, tls, "a.test", "/headers?x=1", &["--http2"])?,
            curl(&ca_crt, tls, "a.test", "/headers", &["--http1.1"])?,
            curl(&ca_crt, tls, "b.test", "/headers", &["--http2"])?,
            curl(
                &ca_crt,
                tls,
                "b.test",
                "/x",
                &["--http2", "-X", "POST", "-d", "k=v"],
            )?,
        ])
    })
    .await??;
    assert_eq!(out[0], "app GET /headers?x=1 proto=https\n2");
    assert_eq!(out[1], "app GET /headers proto=https\n1.1");
    assert_eq!(out[2], "api GET /headers proto=https\n2");
    assert_eq!(out[3], "api POST /x\n2");

    // Port 80 sends browsers to 443.
    let resp = support::raw(
        plain,
        b"GET /p?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    ensure!(resp.starts_with("HTTP/1.1 301"), "{resp}");
    ensure!(
        resp.to_ascii_lowercase()
            .contains("location: https://a.test/p?q=1\r\n"),
        "{resp}"
    );

    // A client that is not TLS gets no answer but a closed connection, and lb goes on.
    let resp = support::raw(tls, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap_or_default();
    ensure!(!resp.contains("200"), "{resp}");
    // A plain CONNECT over HTTP/2 (a tunnel, not RFC 8441's websocket) is refused clearly.
    let connector = client(&authority.0, &[b"h2"])?;
    let stream = connect(&connector, tls, "a.test").await?;
    ensure!(stream.get_ref().1.alpn_protocol() == Some(b"h2"), "h2 by ALPN");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::connect("a.test:443").body(Empty::<Bytes>::new())?;
    let resp = h2.send_request(req).await?;
    assert_eq!(resp.status(), 501);
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(String::from_utf8_lossy(&body).contains("RFC 8441"), "{body:?}");
    // nginx's limits: a header list past `limits.max_header_bytes` (16 KiB) is refused without
    // closing the connection; with 128 concurrent streams advertised, 140 requests sent at once
    // are all answered (the client waits for free streams).
    let big = "x".repeat(20 * 1024);
    let req = hyper::Request::get("https://a.test/big")
        .header("x-big", big.as_str())
        .body(Empty::<Bytes>::new())?;
    match h2.send_request(req).await {
        Ok(resp) => ensure!(resp.status() == 431, "status {}", resp.status()),
        Err(e) => ensure!(!e.is_closed(), "the connection should survive: {e}"),
    }
    assert_eq!(get(&mut h2, "https://a.test/after").await?, "app GET /after");
    let mut inflight = Vec::new();
    for i in 0..140 {
        let mut h2 = h2.clone();
        inflight.push(tokio::spawn(async move {
            get(&mut h2, &format!("https://a.test/n{i}")).await
        }));
    }
    for t in inflight {
        ensure!(t.await??.starts_with("app GET /n"));
    }
    Ok(())
}

/// One GET on an HTTP/2 sender; the body.
async fn get(h2: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>, uri: &str) -> Result<String> {
    let resp = tokio::time::timeout(
        support::DEADLINE,
        h2.send_request(hyper::Request::get(uri).body(Empty::new())?),
    )
    .await??;
    ensure!(resp.status() == 200, "status {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_certificates_keeps_connections_and_survives_a_bad_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (crt, key) = leaf(dir.path(), &authority, "a.test", "live")?;
    let first = der(&crt)?;
    let app = echo("app").await?;
    let (tls, admin) = (free_addr()?, free_addr()?);
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "events {{ }}\nhttp {{\n upstream app {{ server {app}; }}\n\
             server {{ listen {tls} ssl; server_name a.test;\n\
               ssl_certificate {}; ssl_certificate_key {};\n\
               location / {{ proxy_pass http://app; }} }}\n}}\n",
            crt.display(),
            key.display()
        ),
    )?;
    let lb = Proc::spawn(&[
        "--nginx-conf",
        conf.to_str().context("path")?,
        "--set",
        &format!("admin_listen={admin}"),
    ])?;
    let connector = client(&authority.0, &[b"h2"])?;
    let peer = |connector: tokio_rustls::TlsConnector| async move {
        let s = connect(&connector, tls, "a.test").await.ok()?;
        Some(s.get_ref().1.peer_certificates()?.first()?.as_ref().to_vec())
    };
    let seen = wait_for("lb to serve TLS", || peer(connector.clone())).await?;
    assert_eq!(seen, first);

    // An HTTP/2 connection opened before the reload.
    let stream = connect(&connector, tls, "a.test").await?;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    assert_eq!(get(&mut h2, "https://a.test/one").await?, "app GET /one");

    // A new certificate in the same files: new handshakes get it after SIGHUP.
    let (new_crt, new_key) = leaf(dir.path(), &authority, "a.test", "next")?;
    std::fs::copy(&new_crt, &crt)?;
    std::fs::copy(&new_key, &key)?;
    let second = der(&crt)?;
    ensure!(second != first, "openssl made a different certificate");
    lb.signal("-HUP")?;
    wait_for("the new certificate", || {
        let (c, want) = (connector.clone(), second.clone());
        async move { peer(c).await.filter(|s| *s == want) }
    })
    .await?;
    // The connection from before the reload is still served.
    assert_eq!(get(&mut h2, "https://a.test/two").await?, "app GET /two");

    // A broken certificate: the reload keeps the one loaded and says why.
    std::fs::write(
        &crt,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )?;
    lb.signal("-HUP")?;
    wait_for("the reload to report the bad certificate", || {
        let log = lb.stderr();
        async move {
            log.contains("keeping the certificate loaded before")
                .then_some(())
        }
    })
    .await?;
    assert_eq!(peer(connector.clone()).await.context("a handshake")?, second);
    assert_eq!(get(&mut h2, "https://a.test/three").await?, "app GET /three");

    // The access log names the TLS version, like nginx's $ssl_protocol.
    let log = wait_for("the access log line", || {
        let log = lb.stderr();
        async move { log.contains("/three").then_some(log) }
    })
    .await?;
    ensure!(log.contains("tls=TLSv1.3"), "{log}");
    drop(lb);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_over_tls_with_http1() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (crt, key) = leaf(dir.path(), &authority, "a.test", "a")?;
    let backend = support::Backend::start("ws").await;
    let tls = free_addr()?;
    let _lb = serve(&format!(
        "http {{\n server {{ listen {tls} ssl; ssl_certificate {}; ssl_certificate_key {};\n\
           location /socket.io/ {{ proxy_pass http://{}; }} }}\n}}\n",
        crt.display(),
        key.display(),
        backend.addr,
    ))
    .await?;
    let connector = client(&authority.0, &[b"h2", b"http/1.1"])?;
    let c = connector.clone();
    wait_for("lb to serve TLS", move || {
        let c = c.clone();
        async move { connect(&c, tls, "a.test").await.ok().map(|_| ()) }
    })
    .await?;
    // A browser's websocket handshake is HTTP/1.1 (ALPN chooses it without h2 on offer).
    let connector = client(&authority.0, &[b"http/1.1"])?;
    let mut s = connect(&connector, tls, "a.test").await?;
    s.write_all(
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(support::DEADLINE, s.read(&mut byte)).await??;
        ensure!(
            n == 1,
            "closed before the 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    ensure!(head.starts_with("http/1.1 101"), "{head}");
    // A masked text frame "hi", echoed back by the backend.
    let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    s.write_all(&frame).await?;
    let mut echo = [0u8; 8];
    tokio::time::timeout(support::DEADLINE, s.read_exact(&mut echo)).await??;
    assert_eq!(echo, frame);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocsp_response_file_is_stapled() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (crt, key) = leaf(dir.path(), &authority, "a.test", "a")?;
    let ocsp = support::tls::ocsp_response(dir.path(), &authority, &crt, "a")?;
    let (b_crt, b_key) = leaf(dir.path(), &authority, "b.test", "b")?;
    let app = echo("app").await?;
    let tls = free_addr()?;
    let _lb = serve(&format!(
        "http {{\n server {{ listen {tls} ssl; server_name a.test; ssl_certificate {}; ssl_certificate_key {};\n\
           ssl_stapling on; ssl_stapling_file {};\n location / {{ proxy_pass http://{app}; }} }}\n\
         server {{ listen {tls} ssl; server_name b.test; ssl_certificate {}; ssl_certificate_key {};\n\
           location / {{ proxy_pass http://{app}; }} }}\n}}\n",
        crt.display(),
        key.display(),
        ocsp.display(),
        b_crt.display(),
        b_key.display(),
    ))
    .await?;
    let connector = client(&authority.0, &[b"http/1.1"])?;
    wait_for("lb to serve TLS", || {
        let c = connector.clone();
        async move { connect(&c, tls, "a.test").await.ok().map(|_| ()) }
    })
    .await?;
    let (a, b) = tokio::task::spawn_blocking(move || -> Result<(String, String)> {
        Ok((
            support::tls::s_client_status(tls, "a.test")?,
            support::tls::s_client_status(tls, "b.test")?,
        ))
    })
    .await??;
    ensure!(
        a.contains("OCSP Response Status: successful") && a.contains("Cert Status: good"),
        "{a}"
    );
    ensure!(b.contains("OCSP response: no response sent"), "{b}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_over_http2_with_extended_connect() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (crt, key) = leaf(dir.path(), &authority, "a.test", "a")?;
    let backend = support::Backend::start("ws").await;
    let web = echo("web").await?;
    let tls = free_addr()?;
    // Short idle timeouts: the websockets must outlive them while they carry frames.
    let _lb = serve(&format!(
        "http {{\n keepalive_timeout 1s; client_header_timeout 1s;\n\
         server {{ listen {tls} ssl; ssl_certificate {}; ssl_certificate_key {};\n\
           location / {{ proxy_pass http://{web}; }}\n\
           location /socket.io/ {{ proxy_pass http://{}; }} }}\n}}\n",
        crt.display(),
        key.display(),
        backend.addr,
    ))
    .await?;
    let connector = client(&authority.0, &[b"h2"])?;
    let c = connector.clone();
    let stream = wait_for("lb to serve TLS", move || {
        let c = c.clone();
        async move { connect(&c, tls, "a.test").await.ok() }
    })
    .await?;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    // RFC 8441: CONNECT with :protocol websocket on a stream of the HTTP/2 connection (hyper's
    // client sends it only when lb's SETTINGS enable the extended CONNECT).
    let mut streams = Vec::new();
    for i in 0..3u8 {
        let mut req = hyper::Request::connect(format!("https://a.test/socket.io/?EIO=4&n={i}"))
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())?;
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let resp = tokio::time::timeout(support::DEADLINE, h2.send_request(req)).await??;
        assert_eq!(resp.status(), 200);
        ensure!(!resp.headers().contains_key("upgrade"), "{:?}", resp.headers());
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await?);
        // A masked text frame, echoed back by the backend through lb.
        let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, i ^ 2];
        io.write_all(&frame).await?;
        let mut echo = [0u8; 8];
        tokio::time::timeout(support::DEADLINE, io.read_exact(&mut echo)).await??;
        assert_eq!(echo, frame);
        streams.push(io);
    }
    // The websockets share the connection with ordinary requests.
    assert_eq!(get(&mut h2, "https://a.test/page").await?, "web GET /page");
    for (i, io) in streams.iter_mut().enumerate() {
        let frame = [0x81u8, 0x81, 9, 9, 9, 9, i as u8];
        io.write_all(&frame).await?;
        let mut echo = [0u8; 7];
        tokio::time::timeout(support::DEADLINE, io.read_exact(&mut echo)).await??;
        assert_eq!(echo, frame);
    }
    // Frames for three seconds, with no request on the connection: past the idle timeout (1 s),
    // and past the second tick at which an idle connection is closed, the websockets go on.
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(3) {
        let io = &mut streams[0];
        let frame = [0x81u8, 0x81, 5, 5, 5, 5, b'k' ^ 5];
        io.write_all(&frame).await?;
        let mut echo = [0u8; 7];
        tokio::time::timeout(support::DEADLINE, io.read_exact(&mut echo))
            .await?
            .context("the websocket died with the idle timeout")?;
        assert_eq!(echo, frame);
    }
    // A location whose upstream answers 200 instead of switching: 502, not an open tunnel.
    let mut req = hyper::Request::connect("https://a.test/chat")
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = h2.send_request(req).await?;
    assert_eq!(resp.status(), 502);
    Ok(())
}
