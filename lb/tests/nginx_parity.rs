//! ip_hash against a real nginx (Debian's nginx-light, 1.22): the same three backends behind an
//! nginx `upstream { ip_hash; ... }` and behind lb, and clients from many loopback addresses;
//! every client must land on the same backend through both.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lb::config::Algorithm;
use support::{config, start, Backend, Conn};

/// nginx, found where Debian puts it.
fn nginx_binary() -> Result<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx is not installed: apt-get install -y nginx-light (the test compares lb with it)")
}

/// A foreground nginx with `conf`, stopped on drop.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_sends_every_client_where_nginx_does() -> Result<()> {
    let nginx = nginx_binary()?;
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
         fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
         upstream app {{\n    ip_hash;\n    server {a};\n    server {b} weight=2;\n    server {c};\n  }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://app; }}\n  }}\n}}\n",
        dir = dir.path().display(),
        a = a.addr,
        b = b.addr,
        c = c.addr,
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nginx")?;
    let _nginx = Nginx(child);
    let nginx_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(nginx_addr).await.is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            bail!("nginx did not start: {log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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
