//! ip_hash against a real nginx (Debian's nginx-light, 1.22): the same three backends behind an
//! nginx `upstream { ip_hash; ... }` and behind lb, and clients from many loopback addresses;
//! every client must land on the same backend through both.

mod support;

use anyhow::{ensure, Context, Result};
use lb::config::Algorithm;
use support::nginx::Nginx;
use support::{config, start, Backend, Conn};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_sends_every_client_where_nginx_does() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let port = free_port()?;
    let conf = format!(
        "upstream app {{\n    ip_hash;\n    server {a};\n    server {b} weight=2;\n    server {c};\n  }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://app; }}\n  }}\n",
        a = a.addr,
        b = b.addr,
        c = c.addr,
    );
    let nginx_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let _nginx = Nginx::start(&conf, nginx_addr).await?;

    let mut cfg = config(&[&a, &b, &c], Algorithm::IpHash);
    cfg.upstream.servers[1].weight = 2;
    let lb = start(cfg).await?;
    let mut seen = [0; 3];
    // Clients from 60 different /24s of 127/8, which Linux routes locally.
    for x in 0..60u8 {
        let from = format!("127.{}.{}.{}", x / 7, x.wrapping_mul(41), 1 + x);
        let (_, via_nginx) = Conn::open(nginx_addr, &from).await?.get("/").await?;
        let (_, via_lb) = Conn::open(lb.addr, &from).await?.get("/").await?;
        ensure!(
            via_nginx == via_lb,
            "client {from}: nginx chose {via_nginx}, lb chose {via_lb}"
        );
        seen[["a", "b", "c"]
            .iter()
            .position(|n| *n == via_lb)
            .context("a backend name")?] += 1;
    }
    ensure!(
        seen.iter().all(|&n| n > 0),
        "every backend should get clients: {seen:?}"
    );
    Ok(())
}

/// One answer, reduced to what the comparison looks at.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    location: Option<String>,
    /// The body of a proxied or `return`ed answer; redirects' pages differ by design (nginx's
    /// carries its name), so they are left out.
    body: Option<String>,
}

/// Sends one request on a new connection and reads the answer to the end.
async fn ask(
    to: std::net::SocketAddr,
    method: &str,
    host: &str,
    target: &str,
    port_alias: u16,
) -> Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(support::DEADLINE, tokio::net::TcpStream::connect(to)).await??;
    let body = if method == "POST" { "x=1" } else { "" };
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(support::DEADLINE, s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("a response head")?;
    let status = head.get(9..12).context("a status")?.parse()?;
    let location = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("location"))
        })
        .map(|(_, v)| {
            v.trim()
                .replace(&format!(":{}", to.port()), &format!(":{port_alias}"))
        });
    let body = (!matches!(status, 301 | 302 | 404)).then(|| body.to_string());
    Ok(Answer {
        status,
        location,
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_locations_rewrites_and_returns_answer_as_nginx_does() -> Result<()> {
    let (app, api, img) = (
        support::echo("app").await?,
        support::echo("api").await?,
        support::echo("img").await?,
    );
    // One nginx.conf for both, but for the ports each listens on.
    let conf = |main: u16, redirect: u16| {
        format!(
            "upstream app {{ server {app}; }}\n\
             upstream api {{ server {api}; }}\n\
             server {{\n  listen 127.0.0.1:{main};\n  server_name example.com *.example.com;\n\
               rewrite ^/old/(.*)$ /new/$1 last;\n\
               location / {{ proxy_pass http://app; }}\n\
               location /api/ {{ proxy_pass http://api/v1/; }}\n\
               location ^~ /static/ {{ proxy_pass http://{img}; }}\n\
               location ~* \\.(png|jpg)$ {{ proxy_pass http://{img}; }}\n\
               location = /ping {{ return 200 \"pong $host\"; }}\n\
               location /r/ {{\n    rewrite ^/r/moved/(.*)$ /elsewhere/$1 permanent;\n\
                 rewrite ^/r/temp/(.*)$ https://other.example.org/$1?from=r redirect;\n\
                 rewrite ^/r/b/(.*)$ /api2/$1 break;\n    rewrite ^/r/l/(.*)$ /api/$1 last;\n\
                 proxy_pass http://api;\n  }}\n\
               location /gone {{ return 410 \"gone $uri$is_args$args\\n\"; }}\n\
               location /nowhere/ {{ }}\n\
             }}\n\
             server {{\n  listen 127.0.0.1:{main} default_server;\n  server_name ~^www\\d+\\.other\\.org$;\n\
               location / {{ proxy_pass http://{img}; }}\n  location = /who {{ return 200 \"B $host\"; }}\n}}\n\
             server {{\n  listen 127.0.0.1:{redirect};\n  return 301 https://$host$request_uri;\n}}\n"
        )
    };
    let (n_main, n_redirect) = (free_port()?, free_port()?);
    let nginx_main: std::net::SocketAddr = format!("127.0.0.1:{n_main}").parse()?;
    let _nginx = Nginx::start(&conf(n_main, n_redirect), nginx_main).await?;

    let (l_main, l_redirect) = (free_port()?, free_port()?);
    let translated = lb::nginx_conf::translate(&format!(
        "events {{ }}\nhttp {{\n{}\n}}\n",
        conf(l_main, l_redirect)
    ))?;
    let mut config: lb::Config = common::ConfigSource::new().base(translated.table).load()?;
    config.admin_listen = "127.0.0.1:0".into();
    config.access_log.enabled = false;
    let mut listeners = Vec::new();
    for a in config.listen_addrs() {
        listeners.push(tokio::net::TcpListener::bind(&a).await?);
    }
    let balancer = lb::Lb::new(config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(balancer.serve_all(listeners, shutdown));

    let requests: &[(bool, &str, &str)] = &[
        (true, "example.com", "/"),
        (true, "example.com", "/anything?x=1"),
        (true, "EXAMPLE.COM:1", "/api/users?x=1"),
        (true, "example.com", "/api"),
        (true, "example.com", "/api?q=1"),
        (true, "example.com", "/static/a.png"),
        (true, "example.com", "/img/b.PNG"),
        (true, "example.com", "/api/logo.png"),
        (true, "example.com", "/ping"),
        (true, "example.com", "/ping/more"),
        (true, "www.example.com", "/old/x?k=1"),
        (true, "example.com", "/r/moved/x?k=1"),
        (true, "example.com", "/r/temp/x?k=1"),
        (true, "example.com", "/r/b/c?d=1"),
        (true, "example.com", "/r/l/c?d=1"),
        (true, "example.com", "/r/other"),
        (true, "example.com", "/static/../api/q"),
        (true, "example.com", "/%61pi/x%20y"),
        (true, "example.com", "/a//b/./c"),
        (true, "example.com", "/gone/x?y=2"),
        (true, "example.com", "/nowhere/x"),
        (true, "www7.other.org", "/who"),
        (true, "unknown.test", "/who"),
        (true, "unknown.test", "/x"),
        (false, "example.com", "/x?y=1"),
        (false, "a.b", "/"),
    ];
    for method in ["GET", "POST"] {
        for &(main, host, target) in requests {
            let (n, l) = if main {
                (nginx_main, format!("127.0.0.1:{l_main}").parse()?)
            } else {
                (
                    format!("127.0.0.1:{n_redirect}").parse()?,
                    format!("127.0.0.1:{l_redirect}").parse()?,
                )
            };
            let want = ask(n, method, host, target, 1).await?;
            let got = ask(l, method, host, target, 1).await?;
            ensure!(
                want == got,
                "{method} {host} {target}: nginx {want:?}, lb {got:?}"
            );
        }
    }
    Ok(())
}

/// A static-file answer: status, the headers that matter, and the body of a 200 or 206.
async fn ask_file(to: std::net::SocketAddr, method: &str, target: &str, extra: &str) -> Result<Vec<String>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(support::DEADLINE, tokio::net::TcpStream::connect(to)).await??;
    let req = format!("{method} {target} HTTP/1.1\r\nHost: files.test\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(support::DEADLINE, s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("a response head")?;
    let status = head.get(9..12).context("a status")?.to_string();
    let mut out = vec![status.clone()];
    let mut names = vec!["etag", "last-modified", "content-range", "location"];
    if matches!(status.as_str(), "200" | "206") {
        names.extend(["content-type", "content-length", "accept-ranges"]);
        out.push(format!("body={body}"));
    }
    for name in names {
        if let Some(v) = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)))
        {
            out.push(format!(
                "{name}: {}",
                v.1.trim().replace(&format!(":{}", to.port()), ":PORT")
            ));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_answer_as_nginx_does() -> Result<()> {
    let app = support::echo("app").await?;
    let dir = tempfile::tempdir()?;
    let (site, assets) = (dir.path().join("site"), dir.path().join("assets"));
    for d in ["static/sub", "static/empty"] {
        std::fs::create_dir_all(site.join(d))?;
    }
    std::fs::create_dir_all(&assets)?;
    std::fs::write(site.join("index.html"), "<p>home</p>\n")?;
    std::fs::write(site.join("static/app.css"), "body { color: red }\n")?;
    std::fs::write(site.join("static/sub/index.html"), "<p>sub</p>\n")?;
    std::fs::write(assets.join("logo.png"), b"\x89PNG fake image bytes")?;
    let conf = |port: u16| {
        format!(
            "include /etc/nginx/mime.types;\ndefault_type application/octet-stream;\n\
             server {{\n  listen 127.0.0.1:{port};\n  root {site};\n\
               location / {{ try_files $uri $uri/ /index.html; }}\n\
               location /static/ {{ }}\n\
               location /img/ {{ alias {assets}/; }}\n\
               location /api/ {{ proxy_pass http://{app}; }}\n}}\n",
            site = site.display(),
            assets = assets.display(),
        )
    };
    let n_port = free_port()?;
    let nginx: std::net::SocketAddr = format!("127.0.0.1:{n_port}").parse()?;
    let _nginx = Nginx::start(&conf(n_port), nginx).await?;
    let l_port = free_port()?;
    let lb_addr: std::net::SocketAddr = format!("127.0.0.1:{l_port}").parse()?;
    let t = lb::nginx_conf::translate(&format!("events {{ }}\nhttp {{\n{}\n}}\n", conf(l_port)))?;
    let mut config: lb::Config = common::ConfigSource::new().base(t.table).load()?;
    config.admin_listen = "127.0.0.1:0".into();
    config.access_log.enabled = false;
    let listener = tokio::net::TcpListener::bind(lb_addr).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(lb::Lb::new(config)?.serve(listener, shutdown));

    let first = ask_file(nginx, "GET", "/static/app.css", "").await?;
    let header = |name: &str| {
        first
            .iter()
            .find_map(|l| l.strip_prefix(name).map(str::to_string))
            .with_context(|| format!("nginx sends {name}"))
    };
    let (etag, modified) = (header("etag: ")?, header("last-modified: ")?);
    let cases: Vec<(&str, &str, String)> = vec![
        ("GET", "/static/app.css", String::new()),
        ("HEAD", "/static/app.css", String::new()),
        ("GET", "/static/sub/", String::new()),
        ("GET", "/static/sub", String::new()),
        ("GET", "/static/empty/", String::new()),
        ("GET", "/static/missing.css", String::new()),
        ("GET", "/static/../static/app.css?v=3", String::new()),
        ("GET", "/img/logo.png", String::new()),
        ("GET", "/img/nothing.png", String::new()),
        ("GET", "/", String::new()),
        ("GET", "/spa/route", String::new()),
        ("GET", "/api/x", String::new()),
        ("GET", "/static/app.css", "Range: bytes=2-5\r\n".into()),
        ("GET", "/static/app.css", "Range: bytes=-4\r\n".into()),
        ("GET", "/static/app.css", "Range: bytes=500-\r\n".into()),
        ("GET", "/static/app.css", format!("If-None-Match: {etag}\r\n")),
        (
            "GET",
            "/static/app.css",
            format!("If-Modified-Since: {modified}\r\n"),
        ),
        ("GET", "/static/app.css", "If-None-Match: \"other\"\r\n".into()),
        ("POST", "/static/app.css", "Content-Length: 0\r\n".into()),
    ];
    for (method, target, extra) in &cases {
        let want = ask_file(nginx, method, target, extra).await?;
        let got = ask_file(lb_addr, method, target, extra).await?;
        ensure!(
            want == got,
            "{method} {target} {extra:?}: nginx {want:?}, lb {got:?}"
        );
    }
    Ok(())
}
