//! Real PostgreSQL clusters for tests: a primary plus N streaming standbys in a temporary
//! directory, on free loopback ports, with the means to crash, hang, stop, restart and promote
//! any node.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the servers (and `initdb`,
//! `pg_basebackup`) run as the `postgres` user; client commands run as whoever we are.
//! Every wait polls with a deadline; nothing sleeps to synchronise.
//!
//! ```no_run
//! let cluster = testkit::PgCluster::builder().standbys(2).start().unwrap();
//! cluster.primary().psql("create table t(x int); insert into t values (1)").unwrap();
//! cluster.wait_replicated().unwrap();
//! assert_eq!(cluster.standby(0).psql("select count(*) from t").unwrap(), "1");
//! ```

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod etcd;
pub mod fuzz;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a server may take to start, stop, promote or catch up before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// How often waits poll.
const POLL: Duration = Duration::from_millis(25);

/// Finds the PostgreSQL server binaries (see [`common::postgres::bindir`]).
pub fn pg_bindir() -> Result<PathBuf> {
    common::postgres::bindir().ok_or_else(|| anyhow!(common::postgres::INSTALL_HINT))
}

/// The uid/gid to run servers as: `postgres` when we are root, nobody else otherwise.
fn run_as() -> Result<Option<(u32, u32)>> {
    common::postgres::server_account().map_err(|e| anyhow!(e))
}

/// Picks a loopback port nobody in this process has been handed yet.
pub fn free_port() -> Result<u16> {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if taken.lock().expect("port set poisoned").insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free loopback port")
}

/// Runs `openssl` with `args` in `dir` (test certificates; Debian package openssl).
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A self-signed certificate (RSA, two days) for common name `cn`, written to `stem.crt` and
/// `stem.key` in `dir`; also what a test CA is.
pub fn self_signed(dir: &Path, stem: &str, cn: &str) -> Result<()> {
    let (subject, key, crt) = (format!("/CN={cn}"), format!("{stem}.key"), format!("{stem}.crt"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject, "-keyout",
            &key, "-out", &crt,
        ],
    )
}

/// Polls `f` until it returns `Ok(Some(_))`, failing after `deadline` with the last error.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {deadline:?} waiting for {what}")),
                None => anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Builds a [`PgCluster`].
#[derive(Debug, Clone, Default)]
pub struct PgClusterBuilder {
    standbys: usize,
    synchronous: bool,
    password: Option<String>,
    settings: Vec<(String, String)>,
    tls: Option<(PathBuf, PathBuf)>,
}

impl PgClusterBuilder {
    /// How many streaming standbys to start besides the primary.
    pub fn standbys(mut self, n: usize) -> Self {
        self.standbys = n;
        self
    }

    /// Synchronous replication: the primary waits for one standby (`synchronous_standby_names = '*'`).
    /// The setting is in `postgresql.conf`, so standbys inherit it through their base backup, exactly
    /// the trap a failover must clear.
    pub fn synchronous(mut self, on: bool) -> Self {
        self.synchronous = on;
        self
    }

    /// Gives the `postgres` superuser this password and requires SCRAM-SHA-256 for TCP logins.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// Turns `ssl` on with this PEM certificate and key (copied into the data directory as
    /// `server.crt` and `server.key`, owned by the server's user, so standbys get them through
    /// their base backup).
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls = Some((cert.into(), key.into()));
        self
    }

    /// Adds a `postgresql.conf` setting on every node (e.g. `log_statement = 'all'`).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// Creates and starts the cluster; returns once every standby streams from the primary.
    pub fn start(self) -> Result<PgCluster> {
        let bin = pg_bindir()?;
        let owner = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("testkit-")
            .tempdir()
            .context("creating temp dir")?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).context("chown temp dir")?;
        }
        let ctx = Ctx {
            bin,
            owner,
            base: dir.path().to_path_buf(),
            password: self.password.clone(),
        };
        let mut cluster = PgCluster {
            nodes: Vec::new(),
            primary: AtomicUsize::new(0),
            ctx,
            _dir: dir,
        };
        let primary = cluster.create_primary(&self)?;
        cluster.nodes.push(primary);
        for i in 1..=self.standbys {
            let standby = cluster.create_standby(i)?;
            cluster.nodes.push(standby);
        }
        for node in cluster.standbys() {
            let name = node.name.clone();
            wait_for(&format!("{name} to stream from the primary"), DEADLINE, || {
                let n = cluster.primary().psql(&format!(
                    "select count(*) from pg_stat_replication where application_name = '{name}' \
                     and state = 'streaming'"
                ))?;
                Ok((n == "1").then_some(()))
            })?;
        }
        if self.synchronous && self.standbys > 0 {
            // A walsender reports `sync` a moment after `streaming`; commits only wait once it does.
            wait_for("a synchronous standby", DEADLINE, || {
                let n = cluster
                    .primary()
                    .psql("select count(*) from pg_stat_replication where sync_state = 'sync'")?;
                Ok((n != "0").then_some(()))
            })?;
        }
        Ok(cluster)
    }
}

/// What every node of a cluster shares.
#[derive(Debug, Clone)]
struct Ctx {
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    base: PathBuf,
    password: Option<String>,
}

impl Ctx {
    /// A command for a server-side program, run as the cluster's owner.
    fn server_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.base).env_remove("PGDATA");
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// A base backup of the server on `port` into `data_dir`, with `-R` (a standby's settings),
    /// run as the owner since it writes the files.
    fn base_backup(&self, port: u16, data_dir: &Path) -> Result<()> {
        let mut bb = self.client_cmd("pg_basebackup");
        if let Some((uid, gid)) = self.owner {
            bb.uid(uid).gid(gid);
        }
        bb.current_dir(&self.base)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-D"])
            .arg(data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(&mut bb, "pg_basebackup").map(|_| ())
    }

    /// A command for a client program (psql, pg_basebackup runs as the owner since it writes files).
    fn client_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p);
        }
        cmd
    }
}

/// A primary with its standbys. Dropping it stops every server and removes the directory.
pub struct PgCluster {
    nodes: Vec<PgNode>,
    primary: AtomicUsize,
    ctx: Ctx,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("base", &self.ctx.base)
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl PgCluster {
    /// Starts building a cluster (a lone primary unless told otherwise).
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// Every node; index 0 is the node created as primary.
    pub fn nodes(&self) -> &[PgNode] {
        &self.nodes
    }

    /// Node `i` (0 is the original primary).
    pub fn node(&self, i: usize) -> &PgNode {
        &self.nodes[i]
    }

    /// The node that is primary as far as the kit knows (updated by [`PgCluster::promote`]).
    pub fn primary(&self) -> &PgNode {
        &self.nodes[self.primary.load(Ordering::SeqCst)]
    }

    /// The `i`-th standby of the original layout (node `i + 1`).
    pub fn standby(&self, i: usize) -> &PgNode {
        &self.nodes[i + 1]
    }

    /// Every node but the current primary.
    pub fn standbys(&self) -> impl Iterator<Item = &PgNode> {
        let p = self.primary.load(Ordering::SeqCst);
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != p)
            .map(|(_, n)| n)
    }

    /// The temporary directory holding every node.
    pub fn base_dir(&self) -> &Path {
        &self.ctx.base
    }

    /// Promotes node `i` and records it as the primary.
    pub fn promote(&self, i: usize) -> Result<()> {
        self.nodes[i].promote()?;
        self.primary.store(i, Ordering::SeqCst);
        Ok(())
    }

    /// Waits until every running standby has replayed the primary's current WAL position.
    pub fn wait_replicated(&self) -> Result<()> {
        let lsn = self.primary().current_lsn()?;
        for node in self.standbys().filter(|n| n.is_running()) {
            node.wait_replayed(&lsn)?;
        }
        Ok(())
    }

    /// The server logs of every node, for a failing test's output.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "----- {} ({}) -----\n",
                node.name,
                node.log_path.display()
            ));
            out.push_str(&node.log_tail(200));
        }
        out
    }

    fn create_primary(&self, b: &PgClusterBuilder) -> Result<PgNode> {
        let name = "node0".to_string();
        let data_dir = self.ctx.base.join(&name);
        let mut initdb = self.ctx.server_cmd("initdb");
        initdb
            .args(["-D"])
            .arg(&data_dir)
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        if let Some(pw) = &b.password {
            let pwfile = self.ctx.base.join("pwfile");
            fs::write(&pwfile, format!("{pw}\n"))?;
            if let Some((uid, gid)) = self.ctx.owner {
                std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
            }
            initdb
                .arg("--pwfile")
                .arg(&pwfile)
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"]);
        } else {
            initdb.args(["--auth=trust"]);
        }
        run(&mut initdb, "initdb")?;
        let mut conf = String::from("\n# ---- testkit ----\n");
        for (k, v) in [
            ("listen_addresses", "'127.0.0.1'"),
            ("unix_socket_directories", "''"),
            ("wal_level", "replica"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("hot_standby", "on"),
            ("hot_standby_feedback", "on"),
            ("wal_keep_size", "'128MB'"),
            ("wal_log_hints", "on"),
            ("fsync", "off"),
            ("shared_buffers", "'16MB'"),
            ("max_connections", "100"),
            ("wal_receiver_status_interval", "'1s'"),
            ("log_line_prefix", "'%m [%p] %q%a '"),
        ] {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        if b.synchronous {
            conf.push_str("synchronous_standby_names = '*'\n");
        }
        for (k, v) in &b.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        if let Some((cert, key)) = &b.tls {
            use std::os::unix::fs::PermissionsExt;
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let to = data_dir.join(to);
                fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
                // PostgreSQL refuses a key others can read.
                fs::set_permissions(&to, fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = self.ctx.owner {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
                }
            }
            conf.push_str("ssl = on\n");
        }
        append(&data_dir.join("postgresql.conf"), &conf)?;
        let node = PgNode::new(&self.ctx, name, data_dir)?;
        node.start()?;
        Ok(node)
    }

    fn create_standby(&self, i: usize) -> Result<PgNode> {
        let name = format!("node{i}");
        let data_dir = self.ctx.base.join(&name);
        self.ctx.base_backup(self.primary().port, &data_dir)?;
        let node = PgNode::new(&self.ctx, name, data_dir)?;
        node.start()?;
        Ok(node)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("testkit: a test failed; server logs follow\n{}", self.logs());
        }
        for node in &self.nodes {
            node.shutdown_now();
        }
    }
}

/// One PostgreSQL server of a cluster.
pub struct PgNode {
    name: String,
    port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    ctx: Ctx,
    child: Mutex<Option<Child>>,
    /// Children of a killed postmaster, which must be gone before the node restarts.
    orphans: Mutex<Vec<i32>>,
}

impl std::fmt::Debug for PgNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgNode")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish()
    }
}

impl PgNode {
    fn new(ctx: &Ctx, name: String, data_dir: PathBuf) -> Result<PgNode> {
        let port = free_port()?;
        // The last line wins, so this overrides whatever a base backup copied from the primary.
        append(
            &data_dir.join("postgresql.conf"),
            &format!("port = {port}\ncluster_name = '{name}'\n"),
        )?;
        let log_path = ctx.base.join(format!("{name}.log"));
        Ok(PgNode {
            name,
            port,
            data_dir,
            log_path,
            ctx: ctx.clone(),
            child: Mutex::new(None),
            orphans: Mutex::new(Vec::new()),
        })
    }

    /// The node's name (`node0`, `node1`, ...), also its `cluster_name` and replication application_name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file its server output goes to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A libpq key/value connection string as the superuser.
    pub fn conn_string(&self) -> String {
        let mut s = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port);
        if let Some(p) = &self.ctx.password {
            s.push_str(&format!(" password={p}"));
        }
        s
    }

    /// The postmaster's PID while it runs: the kit's own child, or a server someone else started
    /// on this data directory (dbproxy's built-in rejoin runs `pg_ctl start`), found by its
    /// `postmaster.pid`.
    pub fn pid(&self) -> Option<i32> {
        let own = {
            let mut guard = self.child.lock().expect("child poisoned");
            match guard.as_mut() {
                Some(c) => matches!(c.try_wait(), Ok(None)).then(|| c.id() as i32),
                None => None,
            }
        };
        own.or_else(|| self.foreign_pid())
    }

    /// Whether the postmaster process is alive (it may be stopped by SIGSTOP).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// A live postmaster named by the data directory's `postmaster.pid` that is not the kit's child.
    fn foreign_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "postgres" && process_alive(pid)).then_some(pid)
    }

    /// Takes the kit's child if it is still alive (an exited one is reaped and dropped).
    fn take_live_child(&self) -> Option<Child> {
        let mut child = self.child.lock().expect("child poisoned").take()?;
        if matches!(child.try_wait(), Ok(None)) {
            Some(child)
        } else {
            None
        }
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start(&self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        self.wait_orphans_gone()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = self.ctx.server_cmd("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning postgres for {}", self.name))?;
        *self.child.lock().expect("child poisoned") = Some(child);
        wait_for(&format!("{} to accept connections", self.name), DEADLINE, || {
            if !self.is_running() {
                bail!(
                    "{} exited during start-up; log:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            Ok(self
                .psql_timeout("select 1", Duration::from_secs(5))
                .ok()
                .map(|_| ()))
        })
    }

    /// Crashes the server: SIGKILL to the postmaster, as a power cut would look to clients.
    pub fn kill9(&self) -> Result<()> {
        if let Some(mut child) = self.take_live_child() {
            let pid = child.id() as i32;
            *self.orphans.lock().expect("orphans poisoned") = children_of(pid);
            kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            child.wait()?;
            return Ok(());
        }
        let pid = self
            .foreign_pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        *self.orphans.lock().expect("orphans poisoned") = children_of(pid);
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        wait_for(&format!("{} to die", self.name), DEADLINE, || {
            Ok((!process_alive(pid)).then_some(()))
        })
    }

    /// Freezes the postmaster (SIGSTOP): it still accepts TCP connections but never answers them.
    pub fn sigstop(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Thaws a node frozen by [`PgNode::sigstop`].
    pub fn sigcont(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    /// A clean, fast shutdown (SIGINT); waits until the server has exited.
    pub fn stop(&self) -> Result<()> {
        let Some(mut child) = self.take_live_child() else {
            let pid = self
                .foreign_pid()
                .ok_or_else(|| anyhow!("{} is not running", self.name))?;
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            kill(Pid::from_raw(pid), Signal::SIGINT)?;
            return wait_for(&format!("{} to stop", self.name), DEADLINE, || {
                Ok((!process_alive(pid)).then_some(()))
            });
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGCONT);
        kill(pid, Signal::SIGINT)?;
        let exited = wait_for(&format!("{} to stop", self.name), DEADLINE, || {
            Ok(child.try_wait()?.map(|_| ()))
        });
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        exited
    }

    /// Stops the server without ceremony (Drop): SIGQUIT, then SIGKILL after a deadline.
    fn shutdown_now(&self) {
        let child = self.child.lock().map(|mut g| g.take()).unwrap_or(None);
        if let Some(mut child) = child {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGQUIT);
            if wait_for("server exit", Duration::from_secs(10), || {
                Ok(child.try_wait()?.map(|_| ()))
            })
            .is_err()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(pid) = self.foreign_pid() {
            let p = Pid::from_raw(pid);
            let _ = kill(p, Signal::SIGCONT);
            let _ = kill(p, Signal::SIGQUIT);
            if wait_for("server exit", Duration::from_secs(10), || {
                Ok((!process_alive(pid)).then_some(()))
            })
            .is_err()
            {
                let _ = kill(p, Signal::SIGKILL);
            }
        }
        for pid in self.orphans.lock().map(|g| g.clone()).unwrap_or_default() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    fn wait_orphans_gone(&self) -> Result<()> {
        let orphans = self.orphans.lock().expect("orphans poisoned").clone();
        if orphans.is_empty() {
            return Ok(());
        }
        wait_for(
            &format!("old processes of {} to exit", self.name),
            DEADLINE,
            || Ok(orphans.iter().all(|&p| !process_alive(p)).then_some(())),
        )?;
        self.orphans.lock().expect("orphans poisoned").clear();
        Ok(())
    }

    /// Promotes a standby with `pg_promote(wait => true)` and waits until it accepts writes.
    pub fn promote(&self) -> Result<()> {
        let out = self.psql("select pg_promote(true, 60)")?;
        if out != "t" {
            bail!("pg_promote on {} returned {out:?}", self.name);
        }
        wait_for(&format!("{} to leave recovery", self.name), DEADLINE, || {
            Ok((self.psql("select pg_is_in_recovery()")? == "f").then_some(()))
        })
    }

    /// Re-points a standby at `primary` (`primary_conninfo` + reload) and waits until it streams.
    pub fn follow(&self, primary: &PgNode) -> Result<()> {
        let mut conninfo = format!(
            "host=127.0.0.1 port={} user=postgres application_name={}",
            primary.port, self.name
        );
        if let Some(p) = &self.ctx.password {
            conninfo.push_str(&format!(" password={p}"));
        }
        self.psql(&format!("alter system set primary_conninfo = '{conninfo}'"))?;
        self.psql("select pg_reload_conf()")?;
        self.wait_streaming_from(primary)
    }

    /// Waits until this standby streams from `primary` (its `pg_stat_replication` says so).
    pub fn wait_streaming_from(&self, primary: &PgNode) -> Result<()> {
        let name = &self.name;
        wait_for(
            &format!("{name} to stream from {}", primary.name),
            DEADLINE,
            || {
                let n = primary.psql(&format!(
                "select count(*) from pg_stat_replication where application_name = '{name}' and state = 'streaming'"
            ))?;
                Ok((n == "1").then_some(()))
            },
        )
    }

    /// Throws this node's data away and makes it a fresh standby of `primary` (a new base
    /// backup with `-R`, as an operator's rejoin script would), then starts it and waits until it
    /// streams from `primary`. A running server is killed first.
    pub fn rebuild_as_standby(&self, primary: &PgNode) -> Result<()> {
        if self.is_running() {
            self.kill9()?;
        }
        self.wait_orphans_gone()?;
        fs::remove_dir_all(&self.data_dir)
            .with_context(|| format!("removing {}", self.data_dir.display()))?;
        self.ctx.base_backup(primary.port, &self.data_dir)?;
        append(
            &self.data_dir.join("postgresql.conf"),
            &format!("port = {}\ncluster_name = '{}'\n", self.port, self.name),
        )?;
        self.start()?;
        self.wait_streaming_from(primary)
    }

    /// The current WAL insert position (on a primary).
    pub fn current_lsn(&self) -> Result<String> {
        self.psql("select pg_current_wal_lsn()")
    }

    /// Waits until this standby has replayed WAL up to `lsn`.
    pub fn wait_replayed(&self, lsn: &str) -> Result<()> {
        wait_for(&format!("{} to replay up to {lsn}", self.name), DEADLINE, || {
            let ok = self.psql(&format!(
                "select coalesce(pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn, false)"
            ))?;
            Ok((ok == "t").then_some(()))
        })
    }

    /// Runs SQL through `psql` (unaligned, tuples only) with a 30 s limit and returns its trimmed output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_timeout(sql, Duration::from_secs(30))
    }

    /// Like [`PgNode::psql`] with an explicit limit; the client is killed when it expires.
    pub fn psql_timeout(&self, sql: &str, limit: Duration) -> Result<String> {
        let mut cmd =
            common::postgres::psql_command(&self.ctx.bin, self.port, self.ctx.password.as_deref(), sql);
        run_limited(&mut cmd, limit).with_context(|| format!("psql on {}: {sql}", self.name))
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        let mut out = all[from..].join("\n");
        out.push('\n');
        out
    }
}

/// Runs a command to completion, failing with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    run_limited(cmd, DEADLINE).with_context(|| format!("running {what}"))
}

/// Runs a command with a time limit; returns stdout trimmed, or an error with stderr.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    // Readers on threads, so a chatty command cannot fill a pipe and block while we wait for it.
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(out.trim().to_string()),
        Some(s) => bail!("{s}: {}", err.trim()),
        None => bail!("killed after {limit:?} without finishing: {}", err.trim()),
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// PIDs whose parent is `pid` (read from /proc).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((ppid, _)) = proc_stat(child) {
            if ppid == pid {
                out.push(child);
            }
        }
    }
    out
}

/// (parent pid, state) of a process, from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(i32, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Alive and not a zombie.
fn process_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((_, state)) if state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_reads_our_own_process() {
        let me = std::process::id() as i32;
        let (ppid, state) = proc_stat(me).expect("our own stat");
        assert!(ppid > 0);
        assert!(state != 'Z');
        assert!(process_alive(me));
    }

    #[test]
    fn free_ports_are_distinct() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn wait_for_times_out_with_context() {
        let err = wait_for::<()>("nothing", Duration::from_millis(60), || Ok(None)).unwrap_err();
        assert!(err.to_string().contains("waiting for nothing"), "{err}");
        let v = wait_for("a value", Duration::from_secs(1), || Ok(Some(7))).unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn run_limited_kills_slow_commands() {
        let err = run_limited(Command::new("sleep").arg("5"), Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("killed after"), "{err}");
        assert_eq!(
            run_limited(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap(),
            "hi"
        );
    }
}
