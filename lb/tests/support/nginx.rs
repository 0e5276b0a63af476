//! A real nginx (Debian's nginx-light) in the foreground, for tests that compare lb with it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// nginx, found where Debian puts it.
fn binary() -> Result<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx is not installed: apt-get install -y nginx-light (the test compares lb with it)")
}

/// A foreground nginx, stopped on drop.
pub struct Nginx {
    child: Child,
    /// Its prefix directory (logs, pid, temp files).
    pub dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts nginx with `http_body` inside its `http { }` block and waits until `probe` accepts.
    pub async fn start(http_body: &str, probe: SocketAddr) -> Result<Nginx> {
        let nginx = binary()?;
        let dir = tempfile::tempdir()?;
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
             fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n{http_body}\n}}\n",
            dir = dir.path().display(),
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
        let n = Nginx { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(probe).await.is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default();
                bail!("nginx did not start: {log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(n)
    }
}
