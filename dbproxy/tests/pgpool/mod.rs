//! pgpool-II beside dbproxy, for the tests that compare them: pgpool.conf for a testkit cluster,
//! dbproxy started from it as a process, pgpool-II itself, psql and Debian's `pcp_*` binaries.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::Value;
use testkit::{wait_for, PgCluster, DEADLINE};

pub const BIN: &str = env!("CARGO_BIN_EXE_dbproxy");

/// `runuser -u postgres -- ` when running as root (pg_ctl refuses root), else nothing.
pub fn as_postgres() -> &'static str {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if root {
        "runuser -u postgres -- "
    } else {
        ""
    }
}

/// A pgpool.conf for `cluster` with fast health checks; `data_dirs[i]` says whether node i gets
/// its `backend_data_directoryN`; `extra` is appended.
pub fn pgpool_conf(cluster: &PgCluster, data_dirs: &[bool], extra: &str) -> String {
    let mut s = String::from(
        "backend_clustering_mode = 'streaming_replication'\nlisten_addresses = 'localhost'\n\
         enable_pool_hba = off\nhealth_check_period = 1\nhealth_check_timeout = 3\n\
         health_check_max_retries = 0\nhealth_check_user = 'postgres'\nhealth_check_password = ''\n",
    );
    for (i, n) in cluster.nodes().iter().enumerate() {
        s.push_str(&format!(
            "backend_hostname{i} = '127.0.0.1'\nbackend_port{i} = {}\nbackend_weight{i} = 1\n\
             backend_flag{i} = 'ALLOW_TO_FAILOVER'\nbackend_application_name{i} = '{}'\n",
            n.port(),
            n.name()
        ));
        if data_dirs.get(i).copied().unwrap_or(false) {
            s.push_str(&format!(
                "backend_data_directory{i} = '{}'\n",
                n.data_dir().display()
            ));
        }
    }
    s.push_str(extra);
    s
}

/// The dbproxy binary with its stderr collected; killed on drop.
pub struct Dbproxy {
    child: Option<Child>,
    admin: std::net::SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// Its own `state_dir` (the cluster record), removed on drop.
    _state: tempfile::TempDir,
}

impl Dbproxy {
    pub fn start(conf: &Path, sets: &[String]) -> Result<Dbproxy> {
        let port = testkit::free_port()?;
        let admin_port = testkit::free_port()?;
        let state = tempfile::tempdir()?;
        let mut cmd = Command::new(BIN);
        cmd.arg("--pgpool-conf")
            .arg(conf)
            .args(["--set", &format!("state_dir=\"{}\"", state.path().display())])
            .args(["--set", &format!("listen=\"127.0.0.1:{port}\"")])
            .args(["--set", &format!("admin_listen=\"127.0.0.1:{admin_port}\"")]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("PATH", path_with_pg()?)
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().expect("logs").push(line);
            }
        });
        let mut proxy = Dbproxy {
            child: Some(child),
            admin: format!("127.0.0.1:{admin_port}").parse()?,
            logs,
            _state: state,
        };
        let exited = |p: &mut Dbproxy| p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        wait_for("dbproxy's admin listener", DEADLINE, || {
            if let Some(status) = exited(&mut proxy) {
                anyhow::bail!("dbproxy exited ({status})");
            }
            Ok(proxy.status().ok().filter(|s| !s["primary"].is_null()))
        })
        .with_context(|| proxy.logs())?;
        Ok(proxy)
    }

    pub fn status(&self) -> Result<Value> {
        let (code, body) = crate::support::admin_request(self.admin, "GET", "/status")?;
        anyhow::ensure!(code == 200, "status {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    /// Waits for the first failover event and returns it.
    pub fn failover_event(&self) -> Result<Value> {
        wait_for("a failover event", DEADLINE, || {
            let s = self.status()?;
            Ok(s["history"]
                .as_array()
                .and_then(|h| h.iter().find(|e| e["kind"] == "failover").cloned()))
        })
        .with_context(|| self.logs())
    }
}

impl Drop for Dbproxy {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// PATH with PostgreSQL's bin directory first, for the scripts' pg_ctl and psql.
pub fn path_with_pg() -> Result<String> {
    Ok(format!(
        "{}:{}",
        testkit::pg_bindir()?.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

/// Writes an executable script and returns its path.
pub fn script(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// The arguments each run of a script logged, one run per line, `|`-separated.
pub fn runs(log: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect()
}

/// A world-writable temp dir (the scripts run as root, pg_ctl as postgres).
pub fn tempdir() -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// pgpool-II itself, started on the same pgpool.conf and pcp.conf; stopped (fast) on drop.
pub struct Pgpool {
    child: Child,
}

impl Pgpool {
    pub fn start(conf: &Path, pcp_conf: &Path, port: u16) -> Result<Pgpool> {
        let log = std::fs::File::create(conf.with_file_name("pgpool.log"))?;
        let child = Command::new("/usr/sbin/pgpool")
            .arg("-n")
            .arg("-f")
            .arg(conf)
            .arg("-F")
            .arg(pcp_conf)
            // pgpool's default is /etc/pgpool2/pool_hba.conf, beside Debian's pgpool.conf.
            .arg("-a")
            .arg(conf.with_file_name("pool_hba.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting pgpool")?;
        let p = Pgpool { child };
        wait_for("pgpool to serve", DEADLINE, || Ok(psql(port, "select 1").ok())).with_context(|| {
            std::fs::read_to_string(conf.with_file_name("pgpool.log")).unwrap_or_default()
        })?;
        Ok(p)
    }
}

impl Drop for Pgpool {
    fn drop(&mut self) {
        // SIGINT is pgpool's fast shutdown: the children go too.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// psql's unaligned output (`|`-separated) of `sql` on `port`, with the header line when `header`.
pub fn psql_args(port: u16, sql: &str, header: bool) -> Result<String> {
    let mut cmd = crate::support::pg_program("psql")?;
    cmd.args(["-X", "-A", "-F", "|", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-c", sql])
        .env("PGPASSWORD", "pw");
    if !header {
        cmd.arg("-t");
    } else {
        cmd.arg("-P").arg("footer=off");
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn psql(port: u16, sql: &str) -> Result<String> {
    psql_args(port, sql, false)
}

/// A pgpool.conf, pool_passwd and pcp.conf for `c` in `dir`, shared by pgpool-II (on `pg_port`
/// and `pg_pcp`) and dbproxy (whose ports come from `--set`).
pub fn shared_files(
    c: &PgCluster,
    dir: &Path,
    pg_port: u16,
    pg_pcp: u16,
    extra: &str,
) -> Result<(PathBuf, PathBuf)> {
    let d = dir.display();
    let conf = dir.join("pgpool.conf");
    std::fs::write(
        &conf,
        pgpool_conf(
            c,
            &[true, true],
            &format!(
                "port = {pg_port}\npcp_listen_addresses = '127.0.0.1'\npcp_port = {pg_pcp}\n\
                 unix_socket_directories = '{d}'\npcp_socket_dir = '{d}'\nlogdir = '{d}'\n\
                 pid_file_name = '{d}/pgpool.pid'\nnum_init_children = 4\nmax_pool = 1\n\
                 pool_passwd = 'pool_passwd'\nsr_check_period = 1\nsr_check_user = 'postgres'\n\
                 failover_on_backend_error = off\n{extra}"
            ),
        ),
    )?;
    std::fs::write(dir.join("pool_passwd"), "postgres:TEXTpw\n")?;
    let pcp_conf = dir.join("pcp.conf");
    std::fs::write(
        &pcp_conf,
        "# PCP logins: user:md5(password)\npcpadmin:5ebe2294ecd0e0f08eab7690d2a6ee69\n",
    )?;
    Ok((conf, pcp_conf))
}

/// pgpool-II on `pg_port` and dbproxy on `db_port`, started on the same files; dbproxy's PCP
/// listener stays off (pgpool holds the PCP port the file names).
pub fn side_by_side(conf: &Path, pcp_conf: &Path, pg_port: u16, db_port: u16) -> Result<(Pgpool, Dbproxy)> {
    let pgpool = Pgpool::start(conf, pcp_conf, pg_port)?;
    let proxy = Dbproxy::start(
        conf,
        &[
            format!("listen=\"127.0.0.1:{db_port}\""),
            "pcp.listen=\"\"".into(),
        ],
    )?;
    Ok((pgpool, proxy))
}

/// Whether psql logs in as `user` with `password` on `port` and runs a statement.
pub fn logs_in(port: u16, user: &str, password: &str) -> Result<bool> {
    let out = crate::support::pg_program("psql")?
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", user, "-d", "postgres", "-c", "select 1"])
        .env("PGPASSWORD", password)
        .output()?;
    Ok(out.status.success())
}

/// Runs `/usr/sbin/<cmd> <args> -h 127.0.0.1 -p <port> -U pcpadmin -w` with `passfile`;
/// returns (exit code, stdout, stderr).
pub fn pcp(cmd: &str, args: &[&str], port: u16, passfile: &Path) -> Result<(i32, String, String)> {
    let out = Command::new(format!("/usr/sbin/{cmd}"))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "pcpadmin", "-w"])
        .env("PCPPASSFILE", passfile)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// The first `n` space-separated fields of `pcp_node_info`'s line.
pub fn fields(line: &str, n: usize) -> Vec<String> {
    line.split(' ').take(n).map(str::to_string).collect()
}
