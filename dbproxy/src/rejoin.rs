//! The built-in rejoin (`failover.rejoin.method = "rewind"`): turns a node on this host (its data
//! directory known) back into a standby of the elected primary.
//!
//! Steps, each bounded by what is left of `failover.rejoin.timeout`:
//! 1. a node that already streams from the primary needs nothing;
//! 2. a running server is stopped cleanly (`pg_ctl stop -m fast`, `-m immediate` if that fails);
//! 3. `CHECKPOINT` on the primary, so its control file names its new timeline (pg_rewind compares
//!    the two control files to find where the histories diverged);
//! 4. `pg_rewind --target-pgdata --source-server`; a server that crashed gets crash recovery from
//!    pg_rewind itself in single-user mode (PostgreSQL 13+), which accepts no connection;
//! 5. when pg_rewind fails, a fresh `pg_basebackup` (the old directory is kept aside until it
//!    succeeds, and put back if it fails);
//! 6. the node's own configuration files are put back (pg_rewind and pg_basebackup copy the
//!    primary's, with its port), `standby.signal` is written, and `postgresql.auto.conf` gets
//!    `primary_conninfo` (the primary's address, the node's name as application_name) and
//!    `recovery_target_timeline = 'latest'`;
//! 7. `pg_ctl start`, then a poll until the node streams from the primary on its timeline.
//!
//! The node only ever runs again as a standby (`standby.signal` is in place before it starts),
//! so it takes no write at any point. Programs run as the data directory's owner: `postgres`
//! when dbproxy runs as root (see [`common::postgres::server_account`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::failover::{self, Credentials, FailoverError, NodeRef};

/// How a fenced node is brought back as a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejoinMethod {
    /// No step: only check that the node already streams from the primary.
    #[default]
    Sql,
    /// A local command template.
    Exec,
    /// A command on the node's host over SSH.
    Ssh,
    /// The built-in pg_rewind (or pg_basebackup) rejoin for nodes on this host.
    Rewind,
}

/// Why the built-in rejoin failed.
#[derive(Debug, thiserror::Error)]
pub enum RejoinError {
    /// It cannot run for this node (no data directory, no binaries, no account).
    #[error("{node}: cannot rejoin with pg_rewind: {why}")]
    Setup {
        /// The node's name.
        node: String,
        /// What is missing.
        why: String,
    },
    /// A step failed.
    #[error(transparent)]
    Step(#[from] FailoverError),
    /// Both ways of rebuilding the node failed.
    #[error("{node}: pg_rewind failed ({rewind}); the pg_basebackup fallback failed too: {basebackup}")]
    Rebuild {
        /// The node's name.
        node: String,
        /// pg_rewind's error.
        rewind: String,
        /// pg_basebackup's error.
        basebackup: String,
    },
}

/// What the built-in rejoin needs besides the nodes.
#[derive(Debug, Clone)]
pub struct RewindSettings {
    /// The PostgreSQL binaries (empty: found as testkit and stack find them).
    pub bindir: String,
    /// Where the restarted server writes its output; `{data_dir}` and `{node}` are replaced.
    pub log_file: String,
    /// Fall back to a fresh base backup when pg_rewind fails.
    pub basebackup: bool,
}

impl crate::failover::RejoinConfig {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<(), common::ConfigError> {
        let command = matches!(self.method, RejoinMethod::Exec | RejoinMethod::Ssh);
        if command && self.command.trim().is_empty() {
            return Err(common::ConfigError::invalid(
                "failover.rejoin.command",
                "exec and ssh rejoining need a command",
            ));
        }
        if self.automatic && self.method == RejoinMethod::Sql {
            return Err(common::ConfigError::invalid(
                "failover.rejoin.automatic",
                "needs a way to rejoin (method rewind, exec or ssh)",
            ));
        }
        if self.method == RejoinMethod::Rewind && self.log_file.contains('\0') {
            return Err(common::ConfigError::invalid(
                "failover.rejoin.log_file",
                "must not contain a NUL byte",
            ));
        }
        Ok(())
    }

    /// What the built-in rejoin takes from the section.
    pub fn rewind_settings(&self) -> RewindSettings {
        RewindSettings {
            bindir: self.pg_bindir.clone(),
            log_file: self.log_file.clone(),
            basebackup: self.basebackup_fallback,
        }
    }
}

/// The configuration files a node keeps through a rewind or a base backup.
const OWN_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

/// `postgresql.auto.conf` settings the rejoin replaces.
const REPLACED: [&str; 4] = [
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "default_transaction_read_only",
];

/// Brings `node` back as a standby of `primary` within `limit`, reporting each step to `step`.
/// Returns what it did.
pub async fn rejoin(
    node: &NodeRef,
    primary: &NodeRef,
    settings: &RewindSettings,
    cred: &Credentials,
    limit: Duration,
    step: &(dyn Fn(&str) + Send + Sync),
) -> Result<String, RejoinError> {
    let deadline = Instant::now() + limit;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1))
    };
    let setup = |why: String| RejoinError::Setup {
        node: node.name.clone(),
        why,
    };
    if node.data_dir.trim().is_empty() {
        return Err(setup(
            "its data directory is unknown: set nodes[].data_dir (or failover.nodes.<name>.data_dir)".into(),
        ));
    }
    let dir = PathBuf::from(&node.data_dir);
    put_back_interrupted(&dir).map_err(&setup)?;
    if !dir.join("PG_VERSION").exists() {
        return Err(setup(format!(
            "{} is not a PostgreSQL data directory",
            dir.display()
        )));
    }
    let bindir = if settings.bindir.is_empty() {
        common::postgres::bindir().ok_or_else(|| setup(common::postgres::INSTALL_HINT.into()))?
    } else {
        PathBuf::from(&settings.bindir)
    };
    let account = common::postgres::server_account().map_err(setup)?;
    let tools = Tools {
        node: node.name.clone(),
        bindir,
        account,
    };

    if failover::wait_following(node, primary, cred, Duration::from_millis(300))
        .await
        .is_ok()
    {
        return Ok(format!("{} already streams from {}", node.name, primary.name));
    }

    if tools.running(&dir).await {
        step(&format!("stopping {} cleanly", node.name));
        let fast = tools
            .run("pg_ctl", &stop_args(&dir, "fast", left()), &[], left())
            .await;
        if let Err(e) = fast {
            tracing::warn!(node = %node.name, error = %e, "a fast shutdown failed: stopping immediately");
            let immediate = tools
                .run("pg_ctl", &stop_args(&dir, "immediate", left()), &[], left())
                .await;
            // A server killed just before (its postmaster.pid left behind, the process a
            // zombie for a moment) makes both fail with "no such process": it is stopped.
            if let Err(e) = immediate {
                if tools.running(&dir).await {
                    return Err(e.into());
                }
                tracing::warn!(node = %node.name, error = %e, "the server was already gone");
            }
        }
    }

    step(&format!("checkpoint on {}", primary.name));
    if let Err(e) = checkpoint(primary, cred).await {
        tracing::warn!(node = %primary.name, error = %e, "CHECKPOINT failed; pg_rewind may see the old timeline");
    }
    let saved = SavedConfig::read(&dir);
    let password = [("PGPASSWORD", cred.password.as_str())];
    let env: &[(&str, &str)] = if cred.password.is_empty() { &[] } else { &password };

    step(&format!("pg_rewind {} from {}", node.name, primary.name));
    let source = format!(
        "host={} port={} user={} dbname={} connect_timeout={}",
        conninfo_quote(&primary.host),
        primary.port,
        conninfo_quote(&cred.user),
        conninfo_quote(&cred.database),
        cred.connect_timeout.as_secs().max(1)
    );
    let rewind_args: Vec<OsString> = vec![
        path_arg("--target-pgdata=", &dir),
        format!("--source-server={source}").into(),
    ];
    let how = match tools.run("pg_rewind", &rewind_args, env, left()).await {
        Ok(_) => "rewound with pg_rewind".to_string(),
        Err(rewind) if settings.basebackup => {
            tracing::warn!(node = %node.name, error = %rewind, "pg_rewind failed: taking a fresh base backup");
            step(&format!("pg_basebackup {} from {}", node.name, primary.name));
            basebackup(&tools, &dir, primary, cred, env, left())
                .await
                .map_err(|basebackup| RejoinError::Rebuild {
                    node: node.name.clone(),
                    rewind: rewind.to_string(),
                    basebackup,
                })?;
            format!("rebuilt with pg_basebackup (pg_rewind failed: {rewind})")
        }
        Err(rewind) => return Err(rewind.into()),
    };

    step(&format!(
        "configuring {} as a standby of {}",
        node.name, primary.name
    ));
    saved
        .restore(&dir, &primary_conninfo(&saved, node, primary, cred), account)
        .map_err(|e| setup(format!("writing its configuration: {e}")))?;

    step(&format!("starting {}", node.name));
    let log = log_path(&settings.log_file, node);
    prepare_log(&log, account).map_err(|e| setup(format!("log file {}: {e}", log.display())))?;
    let start_args: Vec<OsString> = vec![
        "start".into(),
        "-D".into(),
        dir.clone().into(),
        "-l".into(),
        log.clone().into(),
        "-w".into(),
        "-t".into(),
        left().as_secs().max(1).to_string().into(),
    ];
    tools.run("pg_ctl", &start_args, &[], left()).await?;

    step(&format!(
        "waiting for {} to stream from {}",
        node.name, primary.name
    ));
    failover::wait_following(node, primary, cred, left()).await?;
    wait_timeline(node, primary, cred, left()).await?;
    Ok(format!("{} {how}; streams from {}", node.name, primary.name))
}

/// The programs, their directory and the account they run as.
struct Tools {
    node: String,
    bindir: PathBuf,
    account: Option<(u32, u32)>,
}

impl Tools {
    /// Runs `program args` from the binaries' directory as the account, within `limit`; its
    /// output, or an error with it.
    async fn run(
        &self,
        program: &str,
        args: &[OsString],
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Result<String, FailoverError> {
        let shown = format!(
            "{program} {}",
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        tracing::info!(node = %self.node, command = %shown, "rejoin step");
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.args(args)
            .current_dir("/")
            .env_remove("PGDATA")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .envs(env.iter().copied());
        if let Some((uid, gid)) = self.account {
            cmd.uid(uid).gid(gid);
        }
        crate::failover::run_process(cmd, &self.node, &shown, limit).await
    }

    /// Whether a server runs on `dir` (`pg_ctl status` answers 0).
    async fn running(&self, dir: &Path) -> bool {
        let args: Vec<OsString> = vec!["status".into(), "-D".into(), dir.into()];
        self.run("pg_ctl", &args, &[], Duration::from_secs(10))
            .await
            .is_ok()
    }
}

fn stop_args(dir: &Path, mode: &str, limit: Duration) -> Vec<OsString> {
    vec![
        "stop".into(),
        "-D".into(),
        dir.into(),
        "-m".into(),
        mode.into(),
        "-w".into(),
        "-t".into(),
        limit.as_secs().clamp(1, 60).to_string().into(),
    ]
}

fn path_arg(flag: &str, p: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push(p);
    s
}

/// `CHECKPOINT` on the new primary.
async fn checkpoint(primary: &NodeRef, cred: &Credentials) -> Result<(), FailoverError> {
    let client = failover::connect(primary, cred).await?;
    let limit = cred.connect_timeout.max(Duration::from_secs(30));
    tokio::time::timeout(limit, client.simple_query("checkpoint"))
        .await
        .map_err(|_| FailoverError::Server {
            node: primary.name.clone(),
            message: format!("CHECKPOINT timed out after {limit:?}"),
        })?
        .map_err(|e| FailoverError::Server {
            node: primary.name.clone(),
            message: format!("CHECKPOINT failed: {e}"),
        })?;
    Ok(())
}

/// A fresh base backup of `primary` into `dir`; the old directory is kept aside until it
/// succeeds and put back when it fails.
async fn basebackup(
    tools: &Tools,
    dir: &Path,
    primary: &NodeRef,
    cred: &Credentials,
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<(), String> {
    let aside = dir.with_extension("rejoin-old");
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(|e| format!("removing {}: {e}", aside.display()))?;
    }
    std::fs::rename(dir, &aside).map_err(|e| format!("moving {} aside: {e}", dir.display()))?;
    let args: Vec<OsString> = vec![
        "-h".into(),
        primary.host.clone().into(),
        "-p".into(),
        primary.port.to_string().into(),
        "-U".into(),
        cred.user.clone().into(),
        "-D".into(),
        dir.into(),
        "-X".into(),
        "stream".into(),
        "-c".into(),
        "fast".into(),
    ];
    let backup_dir_ok = make_dir(dir, tools.account);
    let r = match backup_dir_ok {
        Ok(()) => tools
            .run("pg_basebackup", &args, env, limit)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("creating {}: {e}", dir.display())),
    };
    match r {
        Ok(()) => {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                tracing::warn!(dir = %aside.display(), error = %e, "cannot remove the old data directory");
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            if let Err(back) = std::fs::rename(&aside, dir) {
                return Err(format!(
                    "{e}; and putting the old directory back failed: {back} (it is {})",
                    aside.display()
                ));
            }
            Err(e)
        }
    }
}

/// A base backup interrupted before it ended (a failover stopped the rejoin, dbproxy was killed)
/// left the old directory aside: the partial copy goes and the old directory comes back, so the
/// next attempt starts from what the node had.
fn put_back_interrupted(dir: &Path) -> Result<(), String> {
    let aside = dir.with_extension("rejoin-old");
    if !aside.join("PG_VERSION").exists() {
        return Ok(());
    }
    tracing::warn!(dir = %dir.display(), "an interrupted base backup left the old directory aside: putting it back");
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| format!("removing the partial copy {}: {e}", dir.display()))?;
    }
    std::fs::rename(&aside, dir).map_err(|e| format!("putting {} back: {e}", aside.display()))
}

/// An empty data directory (mode 0700) owned by the account.
fn make_dir(dir: &Path, account: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some((uid, gid)) = account {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The node's own configuration files, read before the rewind.
struct SavedConfig {
    files: Vec<(&'static str, Option<String>)>,
}

impl SavedConfig {
    fn read(dir: &Path) -> SavedConfig {
        SavedConfig {
            files: OWN_FILES
                .iter()
                .map(|f| (*f, std::fs::read_to_string(dir.join(f)).ok()))
                .collect(),
        }
    }

    fn auto_conf(&self) -> &str {
        self.files
            .iter()
            .find(|(f, _)| *f == "postgresql.auto.conf")
            .and_then(|(_, t)| t.as_deref())
            .unwrap_or("")
    }

    /// Writes the files back, `postgresql.auto.conf` with `conninfo` as `primary_conninfo`, and
    /// `standby.signal`.
    fn restore(&self, dir: &Path, conninfo: &str, account: Option<(u32, u32)>) -> std::io::Result<()> {
        for (name, text) in &self.files {
            let text = if *name == "postgresql.auto.conf" {
                Some(standby_auto_conf(text.as_deref().unwrap_or(""), conninfo))
            } else {
                text.clone()
            };
            if let Some(text) = text {
                write_owned(&dir.join(name), &text, account)?;
            }
        }
        let _ = std::fs::remove_file(dir.join("recovery.signal"));
        write_owned(&dir.join("standby.signal"), "", account)
    }
}

fn write_owned(path: &Path, text: &str, account: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    if let Some((uid, gid)) = account {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// `postgresql.auto.conf` for a standby: `old` without the settings the rejoin replaces, plus
/// `primary_conninfo` and `recovery_target_timeline = 'latest'`.
pub fn standby_auto_conf(old: &str, conninfo: &str) -> String {
    let mut out: String = old
        .lines()
        .filter(|l| setting_of(l).is_none_or(|(k, _)| !REPLACED.contains(&k.as_str())))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!(
        "primary_conninfo = '{}'\nrecovery_target_timeline = 'latest'\n",
        conninfo.replace('\'', "''")
    ));
    out
}

/// `(name, value)` of a `name = value` line of a configuration file (the value unquoted).
pub fn setting_of(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (k, v) = line.split_once('=')?;
    let v = v.trim();
    let value = match v.strip_prefix('\'') {
        Some(rest) => {
            let mut out = String::new();
            let mut chars = rest.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\'' if chars.peek() == Some(&'\'') => {
                        chars.next();
                        out.push('\'');
                    }
                    '\'' => break,
                    '\\' => {
                        if let Some(n) = chars.next() {
                            out.push(n);
                        }
                    }
                    c => out.push(c),
                }
            }
            out
        }
        None => v.split_whitespace().next().unwrap_or("").to_string(),
    };
    Some((k.trim().to_ascii_lowercase(), value))
}

/// The node's `primary_conninfo` pointing at `primary`: the keys of its old one (user, password,
/// sslmode, ...) when it had one, else the check user's login; the primary's host and port; the
/// node's name as application_name.
fn primary_conninfo(saved: &SavedConfig, node: &NodeRef, primary: &NodeRef, cred: &Credentials) -> String {
    let old = saved
        .auto_conf()
        .lines()
        .rev()
        .filter_map(setting_of)
        .find(|(k, _)| k == "primary_conninfo")
        .map(|(_, v)| v)
        .unwrap_or_default();
    let mut pairs: Vec<(String, String)> = failover::parse_conninfo(&old)
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "host" | "hostaddr" | "port" | "application_name"))
        .collect();
    if !pairs.iter().any(|(k, _)| k == "user") {
        pairs.push(("user".into(), cred.user.clone()));
        if !cred.password.is_empty() {
            pairs.push(("password".into(), cred.password.clone()));
        }
    }
    pairs.insert(0, ("port".into(), primary.port.to_string()));
    pairs.insert(0, ("host".into(), primary.host.clone()));
    pairs.push(("application_name".into(), node.name.clone()));
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", conninfo_quote(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn conninfo_quote(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The server log of the restarted node.
fn log_path(template: &str, node: &NodeRef) -> PathBuf {
    let t = if template.is_empty() {
        "{data_dir}.log"
    } else {
        template
    };
    PathBuf::from(
        t.replace("{data_dir}", node.data_dir.trim_end_matches('/'))
            .replace("{node}", &node.name),
    )
}

/// The log file exists and the account may append to it.
fn prepare_log(path: &Path, account: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if let Some((uid, gid)) = account {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Polls until `node` has received WAL of `primary`'s timeline (not only the old one).
async fn wait_timeline(
    node: &NodeRef,
    primary: &NodeRef,
    cred: &Credentials,
    limit: Duration,
) -> Result<(), FailoverError> {
    let deadline = Instant::now() + limit;
    let want = failover::primary_timeline(primary, cred).await?.unwrap_or(0);
    let mut last = None;
    loop {
        if let Ok((false, tl)) = failover::node_timeline(node, cred).await {
            if tl.is_some_and(|t| t >= want) {
                return Ok(());
            }
            last = tl;
        }
        if Instant::now() >= deadline {
            return Err(FailoverError::Timeout {
                node: node.name.clone(),
                what: format!(
                    "it to reach timeline {want} of {} (it is on {})",
                    primary.name,
                    last.map_or("an unknown timeline".to_string(), |t| t.to_string())
                ),
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_conf_gets_the_standby_settings_and_drops_the_old_ones() {
        let old = "# Do not edit this file manually!\n\
                   primary_conninfo = 'user=rep password=''x y'' host=old port=1'\n\
                   default_transaction_read_only = 'on'\n\
                   work_mem = '8MB'\n";
        let out = standby_auto_conf(old, "host=h port=2 user=rep application_name=n0");
        assert!(out.contains("work_mem = '8MB'"), "{out}");
        assert!(!out.contains("default_transaction_read_only"), "{out}");
        assert!(!out.contains("host=old"), "{out}");
        assert!(out.contains("primary_conninfo = 'host=h port=2 user=rep application_name=n0'"));
        assert!(out.contains("recovery_target_timeline = 'latest'"));
        let conninfo = old
            .lines()
            .filter_map(setting_of)
            .find(|(k, _)| k == "primary_conninfo");
        assert_eq!(conninfo.unwrap().1, "user=rep password='x y' host=old port=1");
    }

    #[test]
    fn the_new_conninfo_keeps_the_old_login_and_names_the_node() {
        let saved = SavedConfig {
            files: vec![(
                "postgresql.auto.conf",
                Some(
                    "primary_conninfo = 'user=rep password=''s p'' host=a port=1 application_name=x'\n"
                        .into(),
                ),
            )],
        };
        let node = NodeRef {
            name: "n0".into(),
            ..NodeRef::default()
        };
        let primary = NodeRef {
            name: "n1".into(),
            host: "127.0.0.1".into(),
            port: 5433,
            ..NodeRef::default()
        };
        let cred = Credentials {
            user: "check".into(),
            password: "pw".into(),
            database: "postgres".into(),
            connect_timeout: Duration::from_secs(1),
            tls: Default::default(),
        };
        assert_eq!(
            primary_conninfo(&saved, &node, &primary, &cred),
            "host=127.0.0.1 port=5433 user=rep password='s p' application_name=n0"
        );
        let none = SavedConfig { files: vec![] };
        assert_eq!(
            primary_conninfo(&none, &node, &primary, &cred),
            "host=127.0.0.1 port=5433 user=check password=pw application_name=n0"
        );
    }

    #[test]
    fn an_interrupted_base_backup_puts_the_old_directory_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("n0");
        let aside = tmp.path().join("n0.rejoin-old");
        put_back_interrupted(&dir).unwrap();
        assert!(!dir.exists(), "nothing to do");
        std::fs::create_dir_all(&aside).unwrap();
        std::fs::write(aside.join("PG_VERSION"), "15\n").unwrap();
        std::fs::create_dir_all(dir.join("base")).unwrap();
        std::fs::write(dir.join("backup_label"), "partial").unwrap();
        put_back_interrupted(&dir).unwrap();
        assert!(dir.join("PG_VERSION").exists() && !dir.join("backup_label").exists());
        assert!(!aside.exists());
    }

    #[test]
    fn log_path_defaults_next_to_the_data_directory() {
        let node = NodeRef {
            name: "n0".into(),
            data_dir: "/d/n0/".into(),
            ..NodeRef::default()
        };
        assert_eq!(log_path("", &node), PathBuf::from("/d/n0.log"));
        assert_eq!(log_path("/logs/{node}.log", &node), PathBuf::from("/logs/n0.log"));
    }
}
