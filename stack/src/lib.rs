//! `stack`: the whole ha-stack topology as local processes on loopback, with one command.
//!
//! `stack up` creates (once) a PostgreSQL primary and its standbys in a state directory, then starts
//! dbproxy, two webapps, lb and the collector, waits until each is healthy and prints what to try.
//! In the foreground, Ctrl-C stops everything in reverse order; with `--detach` the processes keep
//! running and `stack down` stops them. `stack status` shows what runs; `stack kill NAME` is for drills.

pub mod pg;
pub mod procs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::pg::{Pg, APP_PASSWORD, APP_USER, SUPERUSER_PASSWORD};
use crate::procs::State;

/// Ports of the topology (defaults are the product's: lb 8080, dbproxy 9999).
#[derive(Debug, Clone)]
pub struct Ports {
    /// lb's public port.
    pub lb: u16,
    /// lb's admin listener.
    pub lb_admin: u16,
    /// dbproxy's PostgreSQL port (a second instance, with `--proxies 2`, takes the next one).
    pub dbproxy: u16,
    /// dbproxy's admin listener (a second instance takes the next one).
    pub dbproxy_admin: u16,
    /// The first webapp's port; the second is the next one.
    pub webapp: u16,
    /// The first PostgreSQL server's port; the standbys follow.
    pub postgres: u16,
    /// The collector's admin listener (`/metrics`, with `collector_samples_total`).
    pub collector_admin: u16,
    /// etcd's client port with `--proxies 2` (its peer port is the next one).
    pub etcd: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            lb: 8080,
            lb_admin: 9100,
            dbproxy: 9999,
            dbproxy_admin: 9930,
            webapp: 8001,
            postgres: 15432,
            collector_admin: 9101,
            etcd: 12379,
        }
    }
}

impl Ports {
    /// The default ports moved up by `offset` (several topologies side by side, tests).
    pub fn offset(offset: u16) -> Result<Ports> {
        let d = Ports::default();
        let add = |p: u16, span: u16| -> Result<u16> {
            p.checked_add(offset)
                .filter(|q| q.checked_add(span).is_some())
                .with_context(|| format!("port offset {offset} moves port {p} past 65535"))
        };
        Ok(Ports {
            lb: add(d.lb, 0)?,
            lb_admin: add(d.lb_admin, 0)?,
            dbproxy: add(d.dbproxy, 1)?,
            dbproxy_admin: add(d.dbproxy_admin, 1)?,
            webapp: add(d.webapp, 1)?,
            // Room for a few standbys.
            postgres: add(d.postgres, 8)?,
            collector_admin: add(d.collector_admin, 0)?,
            etcd: add(d.etcd, 1)?,
        })
    }
}

/// What `stack up` starts.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The state directory.
    pub state_dir: PathBuf,
    /// How many standbys besides the primary.
    pub standbys: usize,
    /// Ports to use.
    pub ports: Ports,
    /// The collector's sampling interval.
    pub collector_interval: String,
    /// Where the service binaries are (default: next to this executable, built if missing).
    pub bin_dir: Option<PathBuf>,
    /// dbproxy instances: 1, or 2 coordinated through an etcd that the stack starts too (the
    /// webapps and the collector then list both, and move to the other when theirs dies).
    pub proxies: usize,
}

/// The name of dbproxy instance `i` (0-based) as a service.
pub fn dbproxy_name(i: usize) -> String {
    if i == 0 {
        "dbproxy".into()
    } else {
        format!("dbproxy{}", i + 1)
    }
}

/// The services in start order; stopped in the reverse order.
const SERVICES: &[&str] = &["dbproxy", "web1", "web2", "lb", "collector"];

/// Brings the topology up and returns once everything is healthy.
pub async fn up(opts: &UpOptions) -> Result<State> {
    if !(1..=2).contains(&opts.proxies) {
        bail!("--proxies must be 1 or 2, not {}", opts.proxies);
    }
    let state = State::new(&opts.state_dir)?;
    let bins = binaries(opts.bin_dir.as_deref())?;
    let p = &opts.ports;
    let pg = Pg::new(&state, opts.standbys, p.postgres)?;
    pg.up(&state).await?;
    println!(
        "postgres: {} (primary :{}) + {} standby(s)",
        pg.nodes[0].name, pg.nodes[0].port, opts.standbys
    );

    // dbproxy in front of every node; it finds the primary itself. Its promote and attach
    // endpoints take a token made for this run, which the webapps' switchover button sends.
    let admin_token = random_token()?;
    // The dashboard's switchover needs an operator login: a password made for this run, kept
    // in the state directory for the person running the stack.
    let operator_password = random_token()?;
    write_secret(&state.root.join(OPERATOR_PASSWORD_FILE), &operator_password)?;
    let etcd = if opts.proxies > 1 {
        Some(start_etcd(&state, p.etcd).await?)
    } else {
        None
    };
    for i in 0..opts.proxies {
        let name = dbproxy_name(i);
        let port = p.dbproxy + i as u16;
        let mut dbproxy = format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\nadmin_token = \"{admin_token}\"\nstate_dir = \"{}\"\n\n[health]\nuser = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\nperiod = 1.0\ntimeout = 1.0\n\n",
            p.dbproxy_admin + i as u16,
            state.root.join(format!("{name}-state")).display()
        );
        // A killed primary comes back as a standby on its own, and a switchover keeps the old
        // primary as a standby: dbproxy's built-in rejoin (pg_rewind, else pg_basebackup).
        dbproxy.push_str(&format!(
            "[failover.rejoin]\nmethod = \"rewind\"\nautomatic = true\nretry_interval = 10.0\nlog_file = \"{}\"\n\n",
            state.root.join("logs").join("{node}.log").display()
        ));
        for n in &pg.nodes {
            dbproxy.push_str(&format!(
                "[[nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\ndata_dir = \"{}\"\n\n",
                n.name,
                n.port,
                n.data_dir.display()
            ));
        }
        dbproxy.push_str(&format!(
            "[[users]]\nname = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\n\n[[users]]\nname = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n"
        ));
        if let Some(url) = &etcd {
            dbproxy.push_str(&format!(
                "\n[coordination]\netcd = [\"{url}\"]\nname = \"{name}\"\n"
            ));
        }
        start_service(
            &state,
            &name,
            &bins.join("dbproxy"),
            &format!("{name}.toml"),
            &dbproxy,
            &[],
        )
        .await?;
        wait_service(
            &state,
            &name,
            &format!("{name} to serve queries"),
            move || async move { db_ping(port).await.is_ok() },
        )
        .await?;
    }

    // libpq-style host list: a client tries the next instance when one does not answer.
    let hosts: Vec<String> = (0..opts.proxies)
        .map(|i| format!("127.0.0.1:{}", p.dbproxy + i as u16))
        .collect();
    let database_url = format!(
        "postgres://{APP_USER}:{APP_PASSWORD}@{}/{APP_USER}",
        hosts.join(",")
    );
    // The dashboard reads every instance's /status (comma-separated).
    let status_urls: Vec<String> = (0..opts.proxies)
        .map(|i| format!("http://127.0.0.1:{}/status", p.dbproxy_admin + i as u16))
        .collect();
    let status_urls = status_urls.join(",");
    // The switchover goes to whichever of them holds the leader lease (comma-separated too).
    let admin_urls: Vec<String> = (0..opts.proxies)
        .map(|i| format!("http://127.0.0.1:{}", p.dbproxy_admin + i as u16))
        .collect();
    let admin_urls = admin_urls.join(",");
    for (i, name) in ["web1", "web2"].iter().enumerate() {
        let port = p.webapp + i as u16;
        let cfg = format!(
            "listen = \"127.0.0.1:{port}\"\ninstance = \"{name}\"\ndatabase_url = \"{database_url}\"\n\
             lb_status_url = \"http://127.0.0.1:{}/status\"\ndbproxy_status_url = \"{status_urls}\"\n\
             dbproxy_admin_url = \"{admin_urls}\"\ndbproxy_admin_token = \"{admin_token}\"\n\
             operator_password = \"{operator_password}\"\n",
            p.lb_admin
        );
        start_service(
            &state,
            name,
            &bins.join("webapp"),
            &format!("{name}.toml"),
            &cfg,
            &[],
        )
        .await?;
    }
    for (i, name) in ["web1", "web2"].iter().enumerate() {
        let port = p.webapp + i as u16;
        wait_service(&state, name, &format!("webapp on :{port}"), || async move {
            http_get(port, "/healthz")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        })
        .await?;
    }

    let lb = format!(
        "listen = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nadmin_token = \"{admin_token}\"\n\n\
         [upstream]\nname = \"webapp\"\nalgorithm = \"ip_hash\"\n\
         servers = [{{ addr = \"127.0.0.1:{}\" }}, {{ addr = \"127.0.0.1:{}\" }}]\n\n\
         [health]\nenabled = true\npath = \"/healthz\"\ninterval = \"1s\"\ntimeout = \"1s\"\n",
        p.lb,
        p.lb_admin,
        p.webapp,
        p.webapp + 1
    );
    start_service(&state, "lb", &bins.join("lb"), "lb.toml", &lb, &[]).await?;
    wait_service(&state, "lb", "the page through lb", || {
        let port = p.lb;
        async move { http_get(port, "/").await.map(|(s, _)| s == 200).unwrap_or(false) }
    })
    .await?;

    let collector = format!(
        "database_url = \"{database_url}\"\nspool_file = \"{}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         admin_token = \"{admin_token}\"\n",
        state.root.join("collector.spool").display(),
        p.collector_admin
    );
    start_service(
        &state,
        "collector",
        &bins.join("collector"),
        "collector.toml",
        &collector,
        &["--interval", &opts.collector_interval],
    )
    .await?;
    Ok(state)
}

/// Starts a one-member etcd (Debian's `etcd-server`) on `port` (peers on the next one), its data
/// in the state directory, and waits until it reports healthy; its client URL.
async fn start_etcd(state: &State, port: u16) -> Result<String> {
    let bin = Path::new("/usr/bin/etcd");
    if !bin.is_file() {
        bail!("--proxies 2 needs etcd at /usr/bin/etcd: install it with `apt-get install -y etcd-server`");
    }
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{}", port + 1);
    let mut cmd = Command::new(bin);
    cmd.arg("--name=stack")
        .arg(format!("--data-dir={}", state.root.join("etcd").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=stack={peer}"));
    let pid = state.spawn("etcd", &mut cmd, None)?;
    println!(
        "etcd: started (pid {pid}, {client}, log {})",
        state.log("etcd").display()
    );
    wait_service(state, "etcd", "etcd to report healthy", move || async move {
        http_get(port, "/health")
            .await
            .map(|(s, b)| s == 200 && b.contains("true"))
            .unwrap_or(false)
    })
    .await?;
    Ok(client)
}

/// Writes `config` and starts `binary --config FILE extra...` as service `name`.
async fn start_service(
    state: &State,
    name: &str,
    binary: &Path,
    config_file: &str,
    config: &str,
    extra: &[&str],
) -> Result<()> {
    let path = state.config(config_file);
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(&path)
        .args(extra)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or("info".into()));
    let pid = state.spawn(name, &mut cmd, None)?;
    println!(
        "{name}: started (pid {pid}, config {}, log {})",
        path.display(),
        state.log(name).display()
    );
    Ok(())
}

/// Polls `check` until it is true; fails at once, with the end of its log, if `name` exits meanwhile.
async fn wait_service<F, Fut>(state: &State, name: &str, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        procs::reap();
        if state.pid(name).is_none() {
            let log = std::fs::read_to_string(state.log(name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(10)..].join("\n");
            bail!("{name} exited while waiting for {what}:\n{tail}");
        }
        if check().await {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "timed out after 60 s waiting for {what}; see {}",
                state.log(name).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every service, then the PostgreSQL servers; returns how many were running. A `stack up`
/// supervising them in the foreground (from another shell) is asked to stop first (SIGTERM), so
/// it stops them itself and its terminal returns.
pub fn down(state: &State) -> usize {
    let started = state.started();
    let running = started.iter().filter(|n| state.pid(n).is_some()).count();
    if let Some(pid) = state.supervisor().filter(|&p| p != std::process::id() as i32) {
        println!("stack up (pid {pid}): stopping");
        if !state.stop_supervisor(pid, Duration::from_secs(90)) {
            println!("stack up (pid {pid}) did not stop in time; stopping its services here");
        }
    }
    let mut stopped = 0;
    for name in started.iter().rev() {
        // PostgreSQL: SIGINT is a fast shutdown; the services drain on SIGTERM.
        let sig = if name.starts_with("pg") {
            Signal::SIGINT
        } else {
            Signal::SIGTERM
        };
        if state.stop(name, sig, Duration::from_secs(20)) {
            println!("{name}: stopped");
            stopped += 1;
        }
    }
    running.max(stopped)
}

/// One line per service: running or not, with its pid.
pub fn status(state: &State) -> Vec<(String, Option<i32>)> {
    let mut names = state.started();
    for s in SERVICES {
        if !names.iter().any(|n| n == s) {
            names.push(s.to_string());
        }
    }
    names.into_iter().map(|n| (n.clone(), state.pid(&n))).collect()
}

/// Finds the service binaries next to this executable (or in `dir`), building them with cargo when
/// they are missing and we run from the workspace.
pub fn binaries(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .to_path_buf(),
    };
    let missing: Vec<&str> = ["lb", "dbproxy", "webapp", "collector"]
        .into_iter()
        .filter(|b| !dir.join(b).exists())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("no workspace")?;
    if !workspace.join("Cargo.toml").exists() {
        bail!("{} missing from {}", missing.join(", "), dir.display());
    }
    let release = dir.ends_with("release");
    println!(
        "building {} ({})",
        missing.join(", "),
        if release { "release" } else { "debug" }
    );
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    cmd.current_dir(workspace).arg("build");
    if release {
        cmd.arg("--release");
    }
    for b in &missing {
        cmd.args(["-p", b]);
    }
    if !cmd.status()?.success() {
        bail!("cargo build failed");
    }
    Ok(dir)
}

/// Logs in through dbproxy as the application and runs `select 1`.
pub async fn db_ping(port: u16) -> Result<()> {
    let url = format!("postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{port}/{APP_USER}?connect_timeout=2");
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await
    .context("connect timed out")??;
    tokio::spawn(conn);
    tokio::time::timeout(Duration::from_secs(3), client.simple_query("select 1"))
        .await
        .context("query timed out")??;
    Ok(())
}

/// A minimal HTTP/1.1 GET on loopback: (status, body), bounded in size and time.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.take(4 * 1024 * 1024).read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("GET timed out")??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The file in the state directory holding the dashboard's operator password.
pub const OPERATOR_PASSWORD_FILE: &str = "operator-password";

/// Writes `secret` to `path`, readable by its owner only.
fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{secret}")?;
    Ok(())
}

/// 128 random bits from the kernel, in hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
