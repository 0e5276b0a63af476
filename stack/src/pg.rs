//! The stack's PostgreSQL servers: a primary made with `initdb` and standbys made with
//! `pg_basebackup -R`, under the state directory, on loopback ports. Created once; later `up`s
//! start what is there (after a failover drill the roles may have moved, which dbproxy finds out).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::State;

/// The superuser's password (also used for replication and health checks).
pub const SUPERUSER_PASSWORD: &str = "pg-secret";
/// The application's role, password and database.
pub const APP_USER: &str = "app";
/// The application's password.
pub const APP_PASSWORD: &str = "app-secret";

/// One server of the stack.
#[derive(Debug, Clone)]
pub struct PgNode {
    /// `pg0` (the first primary), `pg1`, ...
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// The servers, their binaries and the account they run as.
#[derive(Debug, Clone)]
pub struct Pg {
    /// The server binaries.
    pub bindir: PathBuf,
    /// The account to run servers as (`postgres` when we are root).
    pub account: Option<(u32, u32)>,
    /// Every node, primary first.
    pub nodes: Vec<PgNode>,
}

impl Pg {
    /// The layout for a primary plus `standbys`, ports from `base_port` up.
    pub fn new(state: &State, standbys: usize, base_port: u16) -> Result<Pg> {
        let bindir = ensure_server_installed()?;
        let account = common::postgres::server_account().map_err(anyhow::Error::msg)?;
        let nodes = (0..=standbys)
            .map(|i| PgNode {
                name: format!("pg{i}"),
                port: base_port + i as u16,
                data_dir: state.root.join("pg").join(format!("pg{i}")),
            })
            .collect();
        Ok(Pg {
            bindir,
            account,
            nodes,
        })
    }

    fn server_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.account {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        cmd.env("PGPASSWORD", SUPERUSER_PASSWORD);
        cmd
    }

    /// Creates whatever node does not exist yet and starts every node.
    pub async fn up(&self, state: &State) -> Result<()> {
        let pg_root = state.root.join("pg");
        fs::create_dir_all(&pg_root)?;
        if let Some((uid, gid)) = self.account {
            check_reachable(&pg_root)?;
            std::os::unix::fs::chown(&pg_root, Some(uid), Some(gid))?;
        }
        let primary = &self.nodes[0];
        if !primary.data_dir.join("PG_VERSION").exists() {
            println!("creating the primary {} (initdb)", primary.name);
            self.initdb(primary)?;
            self.start(state, primary).await?;
            self.psql(
                primary,
                &format!("create role {APP_USER} login password '{APP_PASSWORD}'"),
            )?;
            self.psql(primary, &format!("create database {APP_USER} owner {APP_USER}"))?;
        } else {
            self.start(state, primary).await?;
        }
        for node in &self.nodes[1..] {
            if !node.data_dir.join("PG_VERSION").exists() {
                println!(
                    "creating the standby {} (pg_basebackup from {})",
                    node.name, primary.name
                );
                self.basebackup(primary, node)?;
            }
            self.start(state, node).await?;
        }
        Ok(())
    }

    fn initdb(&self, node: &PgNode) -> Result<()> {
        let pwfile = node.data_dir.with_extension("pw");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n"))?;
        if let Some((uid, gid)) = self.account {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        let out = self
            .server_cmd("initdb")
            .arg("-D")
            .arg(&node.data_dir)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg("--pwfile")
            .arg(&pwfile)
            .output()?;
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf = "\n# ---- ha-stack ----\n\
            listen_addresses = '127.0.0.1'\n\
            unix_socket_directories = ''\n\
            wal_level = replica\n\
            max_wal_senders = 10\n\
            max_replication_slots = 10\n\
            hot_standby = on\n\
            hot_standby_feedback = on\n\
            wal_keep_size = '256MB'\n\
            wal_log_hints = on\n\
            wal_receiver_status_interval = '1s'\n\
            shared_buffers = '64MB'\n\
            log_line_prefix = '%m [%p] %q%a '\n";
        append(&node.data_dir.join("postgresql.conf"), conf)?;
        self.set_identity(node)
    }

    fn basebackup(&self, primary: &PgNode, node: &PgNode) -> Result<()> {
        let out = self
            .server_cmd("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
            ])
            .arg(&node.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast"])
            .output()?;
        if !out.status.success() {
            bail!("pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.set_identity(node)
    }

    /// The node's own port and name; the last line of postgresql.conf wins over what a base backup copied.
    fn set_identity(&self, node: &PgNode) -> Result<()> {
        append(
            &node.data_dir.join("postgresql.conf"),
            &format!("port = {}\ncluster_name = '{}'\n", node.port, node.name),
        )
    }

    /// Starts `node` (unless running) and waits until it accepts logins.
    pub async fn start(&self, state: &State, node: &PgNode) -> Result<()> {
        if state.pid(&node.name).is_none() {
            let mut cmd = Command::new(self.bindir.join("postgres"));
            cmd.arg("-D").arg(&node.data_dir);
            state.spawn(&node.name, &mut cmd, self.account)?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.psql(node, "select 1").is_ok() {
                return Ok(());
            }
            if state.pid(&node.name).is_none() {
                bail!(
                    "{} exited during start-up; see {}",
                    node.name,
                    state.log(&node.name).display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept connections within 60 s; see {}",
                    node.name,
                    state.log(&node.name).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs SQL as the superuser through psql.
    pub fn psql(&self, node: &PgNode, sql: &str) -> Result<String> {
        let out = common::postgres::psql_command(&self.bindir, node.port, Some(SUPERUSER_PASSWORD), sql)
            .output()?;
        if !out.status.success() {
            bail!("{}: {}", node.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Finds the server binaries; as root, installs `postgresql-15` when they are missing.
pub fn ensure_server_installed() -> Result<PathBuf> {
    if let Some(dir) = common::postgres::bindir() {
        return Ok(dir);
    }
    if !common::postgres::is_root() || Command::new("apt-get").arg("--version").output().is_err() {
        bail!("{}", common::postgres::INSTALL_HINT);
    }
    println!("PostgreSQL server binaries are missing: installing postgresql-15 (apt-get)");
    fs::create_dir_all("/etc/postgresql-common")?;
    let createcluster = Path::new("/etc/postgresql-common/createcluster.conf");
    if !createcluster.exists() {
        // Our own clusters live in the state directory; the package need not start one on 5432.
        fs::write(createcluster, "create_main_cluster = false\n")?;
    }
    for args in [
        &["update", "-q"][..],
        &[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confold",
            "postgresql-15",
        ][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if !status.success() {
            bail!(
                "apt-get {} failed; install postgresql-15 yourself",
                args.join(" ")
            );
        }
    }
    common::postgres::bindir().context(common::postgres::INSTALL_HINT)
}

/// As root, the servers run as `postgres`, which must be able to reach the state directory.
fn check_reachable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut cur = dir.parent();
    while let Some(d) = cur {
        let mode = fs::metadata(d)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "the postgres user cannot reach {} ({} is mode {:o}); use --state-dir under /var/tmp or /srv",
                dir.display(),
                d.display(),
                mode & 0o777
            );
        }
        cur = d.parent();
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
