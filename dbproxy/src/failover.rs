//! Failover building blocks: choosing the standby to promote, promoting it (`sql`, `exec` or
//! `ssh`), and settling the cluster afterwards (waiting for the new primary to accept writes,
//! clearing an inherited `synchronous_standby_names`, re-pointing the other standbys), plus the
//! timeline probe used to find the real primary at start-up.
//!
//! Ranking and placeholder rendering are pure and unit-tested; the steps that talk to servers take
//! explicit addresses and credentials and bound every connect, query and command with a timeout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// What can go wrong in a failover step.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// A server could not be reached or refused a statement.
    #[error("{node}: {message}")]
    Server {
        /// The node's name.
        node: String,
        /// What failed.
        message: String,
    },
    /// A promotion or rejoin command failed or timed out.
    #[error("{node}: command `{command}` {message}")]
    Command {
        /// The node's name.
        node: String,
        /// The rendered command (passwords are never part of templates).
        command: String,
        /// How it failed.
        message: String,
    },
    /// A wait ran out of time.
    #[error("{node}: timed out after {after:?} waiting for {what}")]
    Timeout {
        /// The node's name.
        node: String,
        /// What was awaited.
        what: String,
        /// How long was waited.
        after: Duration,
    },
    /// No standby may be promoted.
    #[error("no standby can be promoted: {0}")]
    NoCandidate(String),
}

/// How a node is promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromoteMethod {
    /// `SELECT pg_promote(wait => true, wait_seconds => timeout)` over a normal connection.
    #[default]
    Sql,
    /// A local command template (e.g. `docker exec {container} pg_ctl promote -D {data_dir}`).
    Exec,
    /// A command run on the node's host over SSH.
    Ssh,
}

/// Per-node promotion settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromoteConfig {
    /// `sql` (default), `exec` or `ssh`.
    pub method: PromoteMethod,
    /// The command template for `exec` and `ssh`: `{node}`, `{node_id}`, `{host}`, `{port}`,
    /// `{data_dir}`, `{container}`, `{old_primary}`, `{old_primary_host}`, `{old_primary_port}`, and
    /// pgpool-II's `%d %h %p %D %m %H %M %P %r %R %N %S %%` with pgpool's meanings.
    pub command: String,
    /// `user@host` for `ssh` (default: the node's host).
    pub ssh_target: String,
    /// Private key file for `ssh`.
    pub ssh_key: String,
    /// The node's data directory, for `{data_dir}` / `%D` / `%R`, when it differs from the
    /// node's own `nodes.data_dir`.
    pub data_dir: String,
    /// The node's container name, for `{container}` (default: the node's name).
    pub container: String,
}

/// How a fenced node is brought back as a standby (POST `/nodes/{id}/attach`, automatic rejoin,
/// and the old primary after a switchover).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RejoinConfig {
    /// `rewind` runs the built-in rejoin for nodes on this host (stop cleanly, `pg_rewind` from the
    /// primary, a fresh `pg_basebackup` if that fails, `standby.signal` and `primary_conninfo`,
    /// start; needs `nodes.data_dir`); `exec` or `ssh` runs `command` first; `sql` (the default)
    /// runs nothing and only checks that the node already streams from the primary (for nodes an
    /// operator rebuilt by hand, like pgpool's `pcp_attach_node`).
    pub method: crate::rejoin::RejoinMethod,
    /// The command template, e.g. a script running pg_rewind or pg_basebackup then starting the
    /// node: `{node}`, `{node_id}`, `{host}`, `{port}`, `{data_dir}`, `{container}` name the
    /// rejoining node, `{primary}`, `{primary_host}`, `{primary_port}` the current primary.
    pub command: String,
    /// `user@host` for `ssh` (default: the node's host).
    pub ssh_target: String,
    /// Private key file for `ssh`.
    pub ssh_key: String,
    /// Seconds the whole rejoin (command or rewind, start, and the wait for the node to stream)
    /// may take.
    pub timeout: f64,
    /// Rejoin fenced nodes on their own (needs `rewind`, `exec` or `ssh`): with `rewind` also a
    /// node that is down (a killed primary is restarted as a standby); with a command, once the
    /// node answers again. After a switchover the old primary rejoins at once with `rewind` or
    /// when this is set.
    pub automatic: bool,
    /// Seconds before an automatic rejoin that failed is tried again on the same node.
    pub retry_interval: f64,
    /// `rewind`: the PostgreSQL binaries' directory (default: `$PG_BINDIR`, `pg_config --bindir`, else the
    /// newest `/usr/lib/postgresql/*/bin`).
    pub pg_bindir: String,
    /// `rewind`: where the restarted server writes its output; `{data_dir}` and `{node}` are
    /// replaced (default: `{data_dir}.log`).
    pub log_file: String,
    /// `rewind`: take a fresh `pg_basebackup` when `pg_rewind` fails.
    pub basebackup_fallback: bool,
}

impl Default for RejoinConfig {
    fn default() -> Self {
        RejoinConfig {
            method: crate::rejoin::RejoinMethod::Sql,
            command: String::new(),
            ssh_target: String::new(),
            ssh_key: String::new(),
            timeout: 300.0,
            automatic: false,
            retry_interval: 30.0,
            pg_bindir: String::new(),
            log_file: String::new(),
            basebackup_fallback: true,
        }
    }
}

/// The `[failover]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// Promote a standby automatically when the primary is marked down.
    pub enabled: bool,
    /// Seconds a promotion (command or `pg_promote`) may take before the next candidate is tried.
    pub promote_timeout: f64,
    /// Seconds to wait for a re-pointed standby to stream from the new primary.
    pub follow_timeout: f64,
    /// Re-point the other standbys at the new primary.
    pub follow: bool,
    /// pgpool's `follow_primary_command`: when set, it runs once for every other standby after a
    /// failover or switchover instead of dbproxy's own re-pointing, with pgpool's placeholders
    /// (`%d %h %p %D` the standby, `%m %H %r %R` the new primary, `%M %P %N %S` the old one);
    /// dbproxy then waits `follow_timeout` for the standby to stream from the new primary.
    pub follow_command: String,
    /// Seconds a client request waits for a primary while there is none (during a failover)
    /// before it gets an error.
    pub session_wait: f64,
    /// Seconds a manual switchover waits for the chosen standby to catch up.
    pub switchover_timeout: f64,
    /// Promotion settings used for nodes without their own entry.
    pub default: PromoteConfig,
    /// Promotion settings by node name.
    pub nodes: BTreeMap<String, PromoteConfig>,
    /// Failover priority by node name; lower wins ties on WAL position (default: config order).
    pub priority: BTreeMap<String, u32>,
    /// Bringing fenced nodes back.
    pub rejoin: RejoinConfig,
    /// Fencing the old primary itself, not only in the routing.
    pub fence: crate::fence::FenceConfig,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            enabled: true,
            promote_timeout: 30.0,
            follow_timeout: 30.0,
            follow: true,
            follow_command: String::new(),
            session_wait: 30.0,
            switchover_timeout: 30.0,
            default: PromoteConfig::default(),
            nodes: BTreeMap::new(),
            priority: BTreeMap::new(),
            rejoin: RejoinConfig::default(),
            fence: crate::fence::FenceConfig::default(),
        }
    }
}

impl PromoteConfig {
    /// `{container}` for node `name`: the configured container, else the node's name.
    pub fn container_of(&self, name: &str) -> String {
        if self.container.is_empty() {
            name.to_string()
        } else {
            self.container.clone()
        }
    }
}

impl FailoverConfig {
    /// The promotion settings for `node`.
    pub fn promote_for(&self, node: &str) -> &PromoteConfig {
        self.nodes.get(node).unwrap_or(&self.default)
    }

    /// `node` with the data directory its promotion settings give, if they give one (else the
    /// node's own `nodes.data_dir` stays).
    pub fn with_data_dir(&self, mut node: NodeRef) -> NodeRef {
        let dir = &self.promote_for(&node.name).data_dir;
        if !dir.is_empty() {
            node.data_dir.clone_from(dir);
        }
        node
    }

    /// Checks the section against the configured nodes; errors name the key.
    pub fn validate(&self, nodes: &[crate::config::NodeConfig]) -> Result<(), common::ConfigError> {
        let positive = |key: &str, v: f64| {
            if v > 0.0 && v.is_finite() && v <= 86400.0 {
                Ok(())
            } else {
                Err(common::ConfigError::invalid(
                    key,
                    "must be a positive number of seconds (at most 86400)",
                ))
            }
        };
        positive("failover.promote_timeout", self.promote_timeout)?;
        positive("failover.follow_timeout", self.follow_timeout)?;
        positive("failover.session_wait", self.session_wait)?;
        positive("failover.switchover_timeout", self.switchover_timeout)?;
        positive("failover.rejoin.timeout", self.rejoin.timeout)?;
        positive("failover.rejoin.retry_interval", self.rejoin.retry_interval)?;
        self.fence.validate()?;
        let all = std::iter::once(("failover.default".to_string(), &self.default))
            .chain(self.nodes.iter().map(|(n, c)| (format!("failover.nodes.{n}"), c)));
        for (key, c) in all {
            if c.method != PromoteMethod::Sql && c.command.trim().is_empty() {
                return Err(common::ConfigError::invalid(
                    format!("{key}.command"),
                    "exec and ssh promotion need a command",
                ));
            }
        }
        self.rejoin.validate()?;
        let known = |n: &String| nodes.is_empty() || nodes.iter().any(|c| &c.name == n);
        for n in self.nodes.keys() {
            if !known(n) {
                return Err(common::ConfigError::invalid(
                    format!("failover.nodes.{n}"),
                    "names no configured node",
                ));
            }
        }
        for n in self.priority.keys() {
            if !known(n) {
                return Err(common::ConfigError::invalid(
                    format!("failover.priority.{n}"),
                    "names no configured node",
                ));
            }
        }
        Ok(())
    }
}

/// A standby's claim to be promoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Node index (pgpool's node id).
    pub id: usize,
    /// The node's name.
    pub name: String,
    /// Whether the health checks consider it up.
    pub healthy: bool,
    /// Its WAL position (the larger of received and replayed).
    pub lsn: u64,
    /// Lower wins ties.
    pub priority: u32,
    /// Whether it was a synchronous standby of the lost primary.
    pub was_sync: bool,
    /// Whether `lsn` was read from the node just now (else it is the last health check's).
    pub live: bool,
}

/// Orders the standbys that may be promoted, best first: healthy ones only; in synchronous mode
/// those that were synchronous (anything else may miss acknowledged commits), and any other
/// whose live WAL position is at least every synchronous one's (read live too): it holds all
/// they hold, and promoting the most advanced leaves no follower with WAL past the new
/// timeline's start (such a follower could never follow it); highest WAL position first, then
/// lowest priority, then lowest id.
pub fn rank(candidates: &[Candidate], synchronous: bool) -> Result<Vec<usize>, FailoverError> {
    let syncs = || candidates.iter().filter(|c| c.was_sync);
    // Only when every synchronous standby is up and its position was read now.
    let floor = (synchronous && syncs().all(|c| c.healthy && c.live))
        .then(|| syncs().map(|c| c.lsn).max())
        .flatten();
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            c.healthy && (!synchronous || c.was_sync || (c.live && floor.is_some_and(|f| c.lsn >= f)))
        })
        .collect();
    if eligible.is_empty() {
        let why = if candidates.iter().all(|c| !c.healthy) {
            "no healthy standby".to_string()
        } else {
            "synchronous replication is on and no healthy standby was synchronous".to_string()
        };
        return Err(FailoverError::NoCandidate(why));
    }
    eligible.sort_by(|a, b| {
        b.lsn
            .cmp(&a.lsn)
            .then(a.priority.cmp(&b.priority))
            .then(a.id.cmp(&b.id))
    });
    Ok(eligible.into_iter().map(|c| c.id).collect())
}

/// A node as failover steps see it.
#[derive(Debug, Clone, Default)]
pub struct NodeRef {
    /// Node index.
    pub id: usize,
    /// The node's name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Data directory (for templates), may be empty.
    pub data_dir: String,
    /// TLS to it when it differs from `tls.backend`.
    pub tls: Option<crate::config::BackendTlsMode>,
}

/// Login used for control statements (the health-check user).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Role.
    pub user: String,
    /// Password (empty when trusted).
    pub password: String,
    /// Database.
    pub database: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// TLS to the servers.
    pub tls: crate::backend_tls::BackendTls,
}

/// The values a promotion or rejoin template can use.
#[derive(Debug, Clone, Default)]
pub struct Placeholders {
    /// The node the command acts on: `{node} {node_id} {host} {port} {data_dir}`.
    pub subject: NodeRef,
    /// The failed (detached) node: pgpool's `%d %h %p %D`.
    pub failed: NodeRef,
    /// The node being promoted (the current primary for rejoins): pgpool's `%m %H %r %R` and
    /// `{primary} {primary_host} {primary_port}`.
    pub new_primary: NodeRef,
    /// The old primary: pgpool's `%P %N %S` (and `%M`, the old main node).
    pub old_primary: NodeRef,
    /// `{container}` for the node being promoted.
    pub container: String,
}

/// Renders `{name}` and pgpool-style `%x` placeholders for `sh -c`; unknown ones are left as they
/// are. Every substituted value is quoted for the shell where it stands (bare, inside '...' or
/// inside "..."), so an empty value stays one empty argument and later positional arguments
/// (`$4`, `${10}`) do not shift, and a value cannot inject shell syntax.
pub fn render(template: &str, p: &Placeholders) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut quote = Quote::None;
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '%' => {
                let Some(&n) = chars.peek() else {
                    out.push('%');
                    break;
                };
                let v = match n {
                    'd' => p.failed.id.to_string(),
                    'h' => p.failed.host.clone(),
                    'p' => p.failed.port.to_string(),
                    'D' => p.failed.data_dir.clone(),
                    'm' => p.new_primary.id.to_string(),
                    'H' => p.new_primary.host.clone(),
                    'r' => p.new_primary.port.to_string(),
                    'R' => p.new_primary.data_dir.clone(),
                    'M' | 'P' => p.old_primary.id.to_string(),
                    'N' => p.old_primary.host.clone(),
                    'S' => p.old_primary.port.to_string(),
                    '%' => {
                        chars.next();
                        out.push('%');
                        continue;
                    }
                    _ => {
                        out.push('%');
                        continue;
                    }
                };
                chars.next();
                quote.push_value(&v, &mut out);
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for x in chars.by_ref() {
                    if x == '}' {
                        closed = true;
                        break;
                    }
                    name.push(x);
                }
                let v = match name.as_str() {
                    "node" => Some(p.subject.name.clone()),
                    "node_id" => Some(p.subject.id.to_string()),
                    "host" => Some(p.subject.host.clone()),
                    "port" => Some(p.subject.port.to_string()),
                    "data_dir" => Some(p.subject.data_dir.clone()),
                    "container" => Some(p.container.clone()),
                    "primary" => Some(p.new_primary.name.clone()),
                    "primary_host" => Some(p.new_primary.host.clone()),
                    "primary_port" => Some(p.new_primary.port.to_string()),
                    "old_primary" => Some(p.old_primary.name.clone()),
                    "old_primary_host" => Some(p.old_primary.host.clone()),
                    "old_primary_port" => Some(p.old_primary.port.to_string()),
                    _ => None,
                };
                match (v, closed) {
                    (Some(v), true) => quote.push_value(&v, &mut out),
                    (_, true) => {
                        out.push('{');
                        out.push_str(&name);
                        out.push('}');
                    }
                    (_, false) => {
                        out.push('{');
                        out.push_str(&name);
                    }
                }
            }
            '\\' if quote != Quote::Single => {
                // An escaped character never opens or closes a quote.
                out.push(c);
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            '\'' => {
                quote = match quote {
                    Quote::None => Quote::Single,
                    Quote::Single => Quote::None,
                    Quote::Double => Quote::Double,
                };
                out.push(c);
            }
            '"' => {
                quote = match quote {
                    Quote::None => Quote::Double,
                    Quote::Double => Quote::None,
                    Quote::Single => Quote::Single,
                };
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Where in a shell word a placeholder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    None,
    Single,
    Double,
}

impl Quote {
    /// Appends `v` so that the shell reads it back unchanged at this position.
    fn push_value(self, v: &str, out: &mut String) {
        match self {
            Quote::None => out.push_str(&shell_quote(v)),
            Quote::Single => out.push_str(&v.replace('\'', r"'\''")),
            Quote::Double => {
                for c in v.chars() {
                    if matches!(c, '"' | '\\' | '$' | '`') {
                        out.push('\\');
                    }
                    out.push(c);
                }
            }
        }
    }
}

/// Connects to `node` with a bounded connect; the connection task runs in the background.
pub async fn connect(node: &NodeRef, cred: &Credentials) -> Result<tokio_postgres::Client, FailoverError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&node.host)
        .port(node.port)
        .user(&cred.user)
        .dbname(&cred.database)
        .application_name("dbproxy-failover")
        .connect_timeout(cred.connect_timeout);
    if !cred.password.is_empty() {
        cfg.password(&cred.password);
    }
    let server = |message: String| FailoverError::Server {
        node: node.name.clone(),
        message,
    };
    let mode = node.tls.unwrap_or(cred.tls.mode);
    let client = tokio::time::timeout(
        cred.connect_timeout,
        cred.tls.connect_postgres(mode, &node.host, node.port, &cfg),
    )
    .await
    .map_err(|_| server(format!("connect timed out after {:?}", cred.connect_timeout)))?
    .map_err(|e| server(format!("connect failed: {e}")))?;
    Ok(client)
}

/// Runs one statement that returns one text column, with a timeout.
async fn query_text(
    client: &tokio_postgres::Client,
    node: &NodeRef,
    sql: &str,
    limit: Duration,
) -> Result<Option<String>, FailoverError> {
    Ok(query_row(client, node, sql, limit)
        .await?
        .into_iter()
        .next()
        .flatten())
}

/// What a promotion did, for the log and the `/status` history.
#[derive(Debug, Clone)]
pub struct PromoteOutcome {
    /// How long the promotion step took.
    pub elapsed: Duration,
    /// The command's output (exec/ssh), trimmed; empty for sql.
    pub output: String,
}

/// Promotes `target` with its configured method, bounded by `timeout`, then waits until it
/// accepts writes. On error the caller moves on to the next candidate.
pub async fn promote(
    target: &NodeRef,
    cfg: &PromoteConfig,
    placeholders: &Placeholders,
    cred: &Credentials,
    timeout: Duration,
) -> Result<PromoteOutcome, FailoverError> {
    let start = Instant::now();
    let output = match cfg.method {
        PromoteMethod::Sql => {
            let client = connect(target, cred).await?;
            let secs = timeout.as_secs().max(1);
            let sql = format!("select pg_promote(wait => true, wait_seconds => {secs})");
            let r = query_text(&client, target, &sql, timeout + Duration::from_secs(1)).await?;
            if r.as_deref() != Some("t") {
                return Err(FailoverError::Server {
                    node: target.name.clone(),
                    message: format!("pg_promote returned {}", r.as_deref().unwrap_or("nothing")),
                });
            }
            String::new()
        }
        PromoteMethod::Exec => {
            run_command(&target.name, &render(&cfg.command, placeholders), timeout).await?
        }
        PromoteMethod::Ssh => {
            let remote = render(&cfg.command, placeholders);
            let line = ssh_line(&cfg.ssh_target, &cfg.ssh_key, &target.host, &remote, timeout);
            run_command(&target.name, &line, timeout).await?
        }
    };
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_secs(1));
    wait_writable(target, cred, left).await?;
    Ok(PromoteOutcome {
        elapsed: start.elapsed(),
        output,
    })
}

/// Runs `sh -c command` with a timeout; returns its output, or an error with it.
pub async fn run_command(node: &str, command: &str, timeout: Duration) -> Result<String, FailoverError> {
    tracing::info!(node, command, "running failover command");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command);
    run_process(cmd, node, command, timeout).await
}

/// Runs `cmd` (no stdin, killed if the wait is dropped) for at most `limit`: its stdout and
/// stderr as one trimmed text, each line logged under `node`, or an error naming `shown` (the
/// command as the operator would write it) with that text. Failover, fencing and rejoin commands
/// all run through here.
pub(crate) async fn run_process(
    mut cmd: Command,
    node: &str,
    shown: &str,
    limit: Duration,
) -> Result<String, FailoverError> {
    let err = |message: String| FailoverError::Command {
        node: node.to_string(),
        command: shown.to_string(),
        message,
    };
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| err(format!("timed out after {limit:?}")))?
        .map_err(|e| err(format!("could not start: {e}")))?;
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr.trim());
    }
    for line in text.lines() {
        tracing::info!(node, "command output: {line}");
    }
    if !out.status.success() {
        return Err(err(format!("failed ({}): {text}", out.status)));
    }
    Ok(text)
}

/// The `ssh` command line running `remote` on `target` (default: `host`) with key `key`.
pub fn ssh_line(target: &str, key: &str, host: &str, remote: &str, timeout: Duration) -> String {
    let dest = if target.is_empty() { host } else { target };
    let mut line = String::from("ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new");
    line.push_str(&format!(" -o ConnectTimeout={}", timeout.as_secs().clamp(1, 30)));
    if !key.is_empty() {
        line.push_str(&format!(" -i {}", shell_quote(key)));
    }
    line.push_str(&format!(" {} {}", shell_quote(dest), shell_quote(remote)));
    line
}

/// Runs one statement and returns the columns of its first row, with a timeout.
async fn query_row(
    client: &tokio_postgres::Client,
    node: &NodeRef,
    sql: &str,
    limit: Duration,
) -> Result<Vec<Option<String>>, FailoverError> {
    let server = |message: String| FailoverError::Server {
        node: node.name.clone(),
        message,
    };
    let msgs = tokio::time::timeout(limit, client.simple_query(sql))
        .await
        .map_err(|_| server(format!("`{sql}` timed out after {limit:?}")))?
        .map_err(|e| server(format!("`{sql}` failed: {e}")))?;
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(Vec::new())
}

/// Whether `node` is a primary, and the newest timeline it knows: the one it writes on (a
/// primary) or the newest it has received or replayed (a standby; `None` when it cannot tell).
pub async fn node_timeline(node: &NodeRef, cred: &Credentials) -> Result<(bool, Option<u32>), FailoverError> {
    let client = connect(node, cred).await?;
    let row = query_row(
        &client,
        node,
        "select pg_is_in_recovery(), case when not pg_is_in_recovery() \
         then substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) end",
        cred.connect_timeout,
    )
    .await?;
    let primary = row.first().and_then(|v| v.as_deref()) == Some("f");
    if primary {
        let hex = row.get(1).and_then(|v| v.as_deref()).unwrap_or("");
        return Ok((true, u32::from_str_radix(hex, 16).ok()));
    }
    // Reading the control data needs privileges the check user may lack: then the timeline is
    // unknown, which never outranks a primary.
    let tl = query_row(
        &client,
        node,
        "select greatest((select received_tli from pg_stat_wal_receiver), \
         (select timeline_id from pg_control_checkpoint()), \
         (select min_recovery_end_timeline from pg_control_recovery()))",
        cred.connect_timeout,
    )
    .await
    .ok()
    .and_then(|r| r.first().cloned().flatten())
    .and_then(|v| v.parse().ok());
    Ok((false, tl))
}

/// Polls until `node` is a standby streaming from `primary`.
pub async fn wait_following(
    node: &NodeRef,
    primary: &NodeRef,
    cred: &Credentials,
    limit: Duration,
) -> Result<(), FailoverError> {
    let deadline = Instant::now() + limit;
    let primary_ips: Vec<std::net::IpAddr> = tokio::net::lookup_host((primary.host.as_str(), primary.port))
        .await
        .map(|a| a.map(|a| a.ip()).collect())
        .unwrap_or_default();
    let mut last = String::from("not reachable");
    loop {
        if let Ok(client) = connect(node, cred).await {
            let sql = "select pg_is_in_recovery(), w.status, w.sender_host, w.sender_port \
                       from (select 1) one left join pg_stat_wal_receiver w on true";
            match query_row(&client, node, sql, cred.connect_timeout).await {
                Ok(r) => {
                    let col = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                    let (recovery, status, host, port) = (col(0), col(1), col(2), col(3));
                    let same_host = host == primary.host
                        || tokio::net::lookup_host((host.as_str(), primary.port))
                            .await
                            .is_ok_and(|mut a| a.any(|a| primary_ips.contains(&a.ip())));
                    if recovery != "t" {
                        last = "it is not in recovery (a primary)".into();
                    } else if status != "streaming" {
                        last = format!("its WAL receiver is `{status}`");
                    } else if !(same_host && port == primary.port.to_string()) {
                        last = format!("it streams from {host}:{port}");
                    } else {
                        return Ok(());
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        if Instant::now() >= deadline {
            return Err(FailoverError::Timeout {
                node: node.name.clone(),
                what: format!("it to stream from {} (last: {last})", primary.name),
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops writes on a primary that is being switched away from: new transactions default to
/// read-only, client connections are closed (waiting for each to end), and the WAL position
/// after that is returned, which a standby must replay before it may take over.
pub async fn quiesce(node: &NodeRef, cred: &Credentials) -> Result<u64, FailoverError> {
    let client = connect(node, cred).await?;
    let t = cred.connect_timeout.max(Duration::from_secs(5));
    let terminate = "select count(pg_terminate_backend(pid, 5000)) from pg_stat_activity \
                     where backend_type = 'client backend' and pid <> pg_backend_pid()";
    // Sessions end first (dbproxy holds their next write until the new primary is up); then
    // the server turns read-only for anything else, and whatever slipped in meanwhile ends too.
    // Writes committed before that are in the WAL position returned.
    query_text(&client, node, terminate, t + Duration::from_secs(6)).await?;
    query_text(
        &client,
        node,
        "alter system set default_transaction_read_only = on",
        t,
    )
    .await?;
    query_text(&client, node, "select pg_reload_conf()", t).await?;
    query_text(&client, node, terminate, t + Duration::from_secs(6)).await?;
    let lsn = query_text(&client, node, "select pg_current_wal_lsn()::text", t).await?;
    lsn.as_deref()
        .and_then(crate::cluster::parse_lsn)
        .ok_or_else(|| FailoverError::Server {
            node: node.name.clone(),
            message: format!("odd WAL position {lsn:?}"),
        })
}

/// Undoes [`quiesce`] after a switchover that did not happen.
pub async fn unquiesce(node: &NodeRef, cred: &Credentials) -> Result<(), FailoverError> {
    let client = connect(node, cred).await?;
    let t = cred.connect_timeout.max(Duration::from_secs(5));
    query_text(
        &client,
        node,
        "alter system reset default_transaction_read_only",
        t,
    )
    .await?;
    query_text(&client, node, "select pg_reload_conf()", t).await?;
    Ok(())
}

/// Polls until standby `node` has replayed WAL up to `lsn`.
pub async fn wait_replayed(
    node: &NodeRef,
    lsn: u64,
    cred: &Credentials,
    limit: Duration,
) -> Result<(), FailoverError> {
    let sql = "select pg_last_wal_replay_lsn()::text";
    let replayed = |v: &str| crate::cluster::parse_lsn(v).is_some_and(|r| r >= lsn);
    poll_until(
        node,
        cred,
        sql,
        replayed,
        limit,
        "it to replay the old primary's last WAL",
    )
    .await
}

/// Runs `sql` on `node` (a fresh connection each time) every 50 ms until its one value satisfies
/// `done`, or fails with a timeout naming `what` after `limit`.
async fn poll_until(
    node: &NodeRef,
    cred: &Credentials,
    sql: &str,
    done: impl Fn(&str) -> bool,
    limit: Duration,
    what: &str,
) -> Result<(), FailoverError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(client) = connect(node, cred).await {
            if let Ok(Some(v)) = query_text(&client, node, sql, cred.connect_timeout).await {
                if done(&v) {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(FailoverError::Timeout {
                node: node.name.clone(),
                what: what.to_string(),
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Polls until `node` answers `pg_is_in_recovery() = false`.
pub async fn wait_writable(node: &NodeRef, cred: &Credentials, limit: Duration) -> Result<(), FailoverError> {
    let sql = "select pg_is_in_recovery()";
    poll_until(node, cred, sql, |v| v == "f", limit, "the node to leave recovery").await
}

/// The timeline a primary writes on (from its current WAL file name), or `None` for a standby.
pub async fn primary_timeline(node: &NodeRef, cred: &Credentials) -> Result<Option<u32>, FailoverError> {
    let client = connect(node, cred).await?;
    let sql = "select case when pg_is_in_recovery() then null \
               else substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) end";
    let Some(hex) = query_text(&client, node, sql, cred.connect_timeout).await? else {
        return Ok(None);
    };
    u32::from_str_radix(&hex, 16)
        .map(Some)
        .map_err(|_| FailoverError::Server {
            node: node.name.clone(),
            message: format!("odd WAL file name {hex}"),
        })
}

/// Re-points a standby at `primary` by rewriting the host and port of its `primary_conninfo` (the
/// other keys, such as user, password and application_name, are kept) and reloading. Returns the
/// application_name the standby streams under.
pub async fn repoint(
    standby: &NodeRef,
    primary: &NodeRef,
    cred: &Credentials,
) -> Result<String, FailoverError> {
    let client = connect(standby, cred).await?;
    let current = query_text(&client, standby, "show primary_conninfo", cred.connect_timeout)
        .await?
        .unwrap_or_default();
    let mut pairs = parse_conninfo(&current);
    pairs.retain(|(k, _)| k != "host" && k != "port" && k != "hostaddr");
    pairs.insert(0, ("port".into(), primary.port.to_string()));
    pairs.insert(0, ("host".into(), primary.host.clone()));
    if !pairs.iter().any(|(k, _)| k == "application_name") {
        pairs.push(("application_name".into(), standby.name.clone()));
    }
    let conninfo = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", conninfo_quote(v)))
        .collect::<Vec<_>>()
        .join(" ");
    let sql = format!("alter system set primary_conninfo = {}", sql_literal(&conninfo));
    query_text(&client, standby, &sql, cred.connect_timeout).await?;
    query_text(&client, standby, "select pg_reload_conf()", cred.connect_timeout).await?;
    let app = pairs
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    Ok(app)
}

/// Polls `primary`'s `pg_stat_replication` until `standby_app_name` streams from it.
pub async fn wait_streaming(
    primary: &NodeRef,
    standby_app_name: &str,
    cred: &Credentials,
    limit: Duration,
) -> Result<(), FailoverError> {
    let sql = format!(
        "select count(*) from pg_stat_replication where application_name = {} and state = 'streaming'",
        sql_literal(standby_app_name)
    );
    let what = format!("{standby_app_name} to stream from it");
    poll_until(primary, cred, &sql, |n| n != "0", limit, &what).await
}

/// Makes sure writes on a new primary do not hang on a synchronous standby that is gone: when
/// `synchronous_standby_names` is set and no standby is synchronous within `grace`, it is cleared.
/// Returns whether it cleared it.
pub async fn settle_synchronous(
    primary: &NodeRef,
    cred: &Credentials,
    grace: Duration,
) -> Result<bool, FailoverError> {
    let client = connect(primary, cred).await?;
    let names = query_text(
        &client,
        primary,
        "show synchronous_standby_names",
        cred.connect_timeout,
    )
    .await?;
    if names.as_deref().unwrap_or("").trim().is_empty() {
        return Ok(false);
    }
    let deadline = Instant::now() + grace;
    loop {
        let n = query_text(
            &client,
            primary,
            "select count(*) from pg_stat_replication where sync_state in ('sync', 'quorum')",
            cred.connect_timeout,
        )
        .await?;
        if n.as_deref().is_some_and(|n| n != "0") {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(node = %primary.name, "no synchronous standby left: clearing synchronous_standby_names");
    query_text(
        &client,
        primary,
        "alter system set synchronous_standby_names = ''",
        cred.connect_timeout,
    )
    .await?;
    query_text(&client, primary, "select pg_reload_conf()", cred.connect_timeout).await?;
    Ok(true)
}

/// Splits a libpq key=value connection string (values may be single-quoted with `\` escapes).
pub fn parse_conninfo(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            break;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
    out
}

fn conninfo_quote(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn sql_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: usize, healthy: bool, lsn: u64, priority: u32, was_sync: bool) -> Candidate {
        Candidate {
            id,
            name: format!("node{id}"),
            healthy,
            lsn,
            priority,
            was_sync,
            live: false,
        }
    }

    fn live(c: Candidate) -> Candidate {
        Candidate { live: true, ..c }
    }

    #[test]
    fn rank_prefers_the_most_advanced_healthy_standby() {
        let c = [
            cand(1, true, 100, 0, false),
            cand(2, true, 200, 5, false),
            cand(3, false, 900, 0, false),
        ];
        assert_eq!(rank(&c, false).unwrap(), vec![2, 1]);
    }

    #[test]
    fn rank_breaks_ties_by_priority_then_id() {
        let c = [
            cand(1, true, 100, 2, false),
            cand(2, true, 100, 1, false),
            cand(3, true, 100, 1, false),
        ];
        assert_eq!(rank(&c, false).unwrap(), vec![2, 3, 1]);
    }

    #[test]
    fn synchronous_mode_only_promotes_former_sync_standbys() {
        let c = [cand(1, true, 500, 0, false), cand(2, true, 400, 0, true)];
        assert_eq!(rank(&c, true).unwrap(), vec![2]);
        let none = [cand(1, true, 500, 0, false)];
        let e = rank(&none, true).unwrap_err().to_string();
        assert!(e.contains("no healthy standby was synchronous"), "{e}");
        let down = [cand(1, false, 500, 0, true)];
        assert!(rank(&down, false)
            .unwrap_err()
            .to_string()
            .contains("no healthy standby"));
        assert!(rank(&[], false).is_err());
    }

    #[test]
    fn synchronous_mode_promotes_a_standby_ahead_of_every_sync_one() {
        // Read live, the potential standby is ahead of the synchronous one: it holds every
        // acknowledged commit, and the synchronous one can follow it (not the other way round).
        let c = [
            live(cand(1, true, 500, 0, false)),
            live(cand(2, true, 400, 0, true)),
        ];
        assert_eq!(rank(&c, true).unwrap(), vec![1, 2]);
        let behind = [
            live(cand(1, true, 300, 0, false)),
            live(cand(2, true, 400, 0, true)),
        ];
        assert_eq!(rank(&behind, true).unwrap(), vec![2]);
        // A position from the last health check, on either side, proves nothing.
        let stale = [cand(1, true, 500, 0, false), live(cand(2, true, 400, 0, true))];
        assert_eq!(rank(&stale, true).unwrap(), vec![2]);
        let sync_stale = [live(cand(1, true, 500, 0, false)), cand(2, true, 400, 0, true)];
        assert_eq!(rank(&sync_stale, true).unwrap(), vec![2]);
        // A synchronous standby that is down may hold commits nobody else has.
        let sync_down = [
            live(cand(1, true, 500, 0, false)),
            live(cand(2, true, 400, 0, true)),
            cand(3, false, 450, 0, true),
        ];
        assert_eq!(rank(&sync_down, true).unwrap(), vec![2]);
        assert_eq!(
            rank(&[live(cand(1, true, 500, 0, false))], false).unwrap(),
            vec![1]
        );
    }

    fn placeholders() -> Placeholders {
        let b = NodeRef {
            id: 1,
            name: "b".into(),
            host: "hb".into(),
            port: 5433,
            data_dir: "/d/b".into(),
            tls: None,
        };
        Placeholders {
            subject: b.clone(),
            failed: NodeRef {
                id: 0,
                name: "a".into(),
                host: "ha".into(),
                port: 5432,
                data_dir: "/d/a".into(),
                tls: None,
            },
            new_primary: NodeRef {
                id: 1,
                name: "b".into(),
                host: "hb".into(),
                port: 5433,
                data_dir: "/d/b".into(),
                tls: None,
            },
            old_primary: NodeRef {
                id: 0,
                name: "a".into(),
                host: "ha".into(),
                port: 5432,
                data_dir: "/d/a".into(),
                tls: None,
            },
            container: "pg-b".into(),
        }
    }

    #[test]
    fn render_fills_both_placeholder_styles() {
        let p = placeholders();
        assert_eq!(
            render("failover.sh %d %h %p %D %m %H %M %P %r %R %N %S %%", &p),
            "failover.sh '0' 'ha' '5432' '/d/a' '1' 'hb' '0' '0' '5433' '/d/b' 'ha' '5432' %"
        );
        assert_eq!(
            render(
                "docker exec {container} pg_ctl promote -D {data_dir} # {node} {node_id} {host}:{port}",
                &p
            ),
            "docker exec 'pg-b' pg_ctl promote -D '/d/b' # 'b' '1' 'hb':'5433'"
        );
        assert_eq!(
            render("{old_primary}@{old_primary_host}:{old_primary_port}", &p),
            "'a'@'ha':'5432'"
        );
        // Inside quotes a value is escaped for that quote; an escaped quote opens nothing.
        let mut q = placeholders();
        q.failed.data_dir = "it's \"$x\"".into();
        assert_eq!(
            render(r#"a '%D' "%D" \' %D"#, &q),
            r#"a 'it'\''s "$x"' "it's \"\$x\"" \' 'it'\''s "$x"'"#
        );
        q.failed.data_dir.clear();
        assert_eq!(render("s %d %D %m", &q), "s '0' '' '1'");
        // Unknown or unfinished placeholders stay as written.
        assert_eq!(render("%x {nope} {open %", &p), "%x {nope} {open %");
    }

    #[test]
    fn conninfo_round_trips() {
        let v = parse_conninfo(
            "user=postgres passfile='/root/.pgpass' host=127.0.0.1 port=5432 password='a b\\'c'",
        );
        assert_eq!(v[0], ("user".into(), "postgres".into()));
        assert_eq!(v[1], ("passfile".into(), "/root/.pgpass".into()));
        assert_eq!(v[4], ("password".into(), "a b'c".into()));
        assert_eq!(conninfo_quote("a b'c"), "'a b\\'c'");
        assert_eq!(conninfo_quote(""), "''");
        assert!(parse_conninfo("").is_empty());
        assert_eq!(parse_conninfo("broken"), vec![]);
    }

    #[test]
    fn config_validation_names_keys() {
        let mut c = FailoverConfig::default();
        c.validate(&[]).unwrap();
        c.nodes.insert(
            "n1".into(),
            PromoteConfig {
                method: PromoteMethod::Exec,
                ..Default::default()
            },
        );
        assert!(c
            .validate(&[])
            .unwrap_err()
            .to_string()
            .contains("failover.nodes.n1.command"));
        let c = FailoverConfig {
            promote_timeout: 0.0,
            ..Default::default()
        };
        assert!(c
            .validate(&[])
            .unwrap_err()
            .to_string()
            .contains("failover.promote_timeout"));
        let c = FailoverConfig {
            priority: [("ghost".to_string(), 1)].into(),
            ..Default::default()
        };
        let nodes = [crate::config::NodeConfig {
            name: "n0".into(),
            ..Default::default()
        }];
        assert!(c
            .validate(&nodes)
            .unwrap_err()
            .to_string()
            .contains("failover.priority.ghost"));
    }

    #[tokio::test]
    async fn commands_time_out_and_report_failures() {
        let out = run_command("n", "echo hello; echo oops >&2", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(out, "hello\noops");
        let e = run_command("n", "echo nope; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit status: 3") && e.contains("nope"), "{e}");
        let e = run_command("n", "sleep 5", Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("timed out"), "{e}");
    }
}

/// What the orchestration needs from the node table, and the one atomic change it makes to it.
pub trait Topology: Send + Sync {
    /// Every node, by id.
    fn nodes(&self) -> Vec<NodeRef>;
    /// What the health checks last learned about each standby that may be promoted or re-pointed
    /// (fenced nodes excluded): (id, healthy, last known LSN, whether the lost primary reported it
    /// synchronous).
    fn standby_states(&self, failed: usize) -> Vec<(usize, bool, u64, bool)>;
    /// Records that `new_primary` replaces `old_primary` (fenced), then routes writes to it in one
    /// step; on error routing is left as it was.
    fn switch_primary(&self, new_primary: usize, old_primary: usize) -> BoxFuture<'_, Result<(), String>>;
    /// Records candidate `id` as fenced (its promotion failed, and may yet take effect) and stops
    /// routing to it, before the next candidate is tried.
    fn fence_candidate(&self, id: usize) -> BoxFuture<'_, Result<(), String>>;
    /// Records that candidate `id` is about to be promoted in place of `failed`, before the
    /// promotion starts (so a leader that dies meanwhile leaves a record of it); an error stops
    /// the failover. Nothing to record by default.
    fn promoting(&self, _id: usize, _failed: usize) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// One failover or switchover, as the log and the `/status` history report it.
#[derive(Debug, Clone)]
pub struct FailoverEvent {
    /// The primary that was lost.
    pub failed: String,
    /// The node promoted in its place.
    pub promoted: Option<String>,
    /// When the loss was detected.
    pub detected_at: std::time::SystemTime,
    /// When the lost primary was fenced in the routing (sessions holding a connection to it are
    /// cut from then on); set by the failover manager.
    pub fenced_at: Option<std::time::SystemTime>,
    /// When the promotion finished (the node accepted writes).
    pub promoted_at: Option<std::time::SystemTime>,
    /// When routing switched to it.
    pub resumed_at: Option<std::time::SystemTime>,
    /// Candidates that were tried and failed, with why.
    pub failed_attempts: Vec<(String, String)>,
    /// Standbys re-pointed at the new primary, and whether each streams from it.
    pub followers: Vec<(String, Result<(), String>)>,
    /// Whether an inherited `synchronous_standby_names` was cleared.
    pub cleared_synchronous: bool,
    /// Why the failover did not complete, if it did not.
    pub error: Option<String>,
}

impl FailoverEvent {
    /// An event for losing (or leaving) primary `failed`, noticed at `detected_at`; nothing done yet.
    pub fn new(failed: String, detected_at: std::time::SystemTime) -> FailoverEvent {
        FailoverEvent {
            failed,
            promoted: None,
            detected_at,
            fenced_at: None,
            promoted_at: None,
            resumed_at: None,
            failed_attempts: Vec::new(),
            followers: Vec::new(),
            cleared_synchronous: false,
            error: None,
        }
    }
}

/// Replaces the lost primary `failed`: ranks the standbys (live WAL positions where reachable),
/// promotes the best one, falling back to the next on failure, switches routing atomically, then
/// re-points the other standbys and makes sure writes cannot hang on a vanished synchronous standby.
pub async fn fail_over(
    topo: &dyn Topology,
    failed: usize,
    cfg: &FailoverConfig,
    cred: &Credentials,
    detected_at: std::time::SystemTime,
) -> FailoverEvent {
    let nodes: Vec<NodeRef> = topo.nodes().into_iter().map(|n| cfg.with_data_dir(n)).collect();
    let name = |i: usize| nodes.get(i).map(|n| n.name.clone()).unwrap_or_default();
    let mut event = FailoverEvent::new(name(failed), detected_at);
    let states = topo.standby_states(failed);
    let synchronous = states.iter().any(|s| s.3);
    let mut candidates = Vec::new();
    for (id, healthy, known_lsn, was_sync) in states {
        let Some(node) = nodes.get(id) else { continue };
        // The primary is gone, so standby positions are frozen: ask for the freshest one.
        let fresh = if healthy { live_lsn(node, cred).await } else { None };
        let priority = cfg.priority.get(&node.name).copied().unwrap_or(id as u32);
        candidates.push(Candidate {
            id,
            name: node.name.clone(),
            healthy,
            lsn: fresh.unwrap_or(known_lsn),
            priority,
            was_sync,
            live: fresh.is_some(),
        });
    }
    let order = match rank(&candidates, synchronous) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(failed = %event.failed, error = %e, "failover impossible");
            event.error = Some(e.to_string());
            return event;
        }
    };
    let timeout = Duration::from_secs_f64(cfg.promote_timeout);
    let old = nodes[failed].clone();
    let mut promoted = None;
    for id in order {
        let target = nodes[id].clone();
        let pcfg = cfg.promote_for(&target.name);
        let placeholders = Placeholders {
            subject: target.clone(),
            failed: old.clone(),
            new_primary: target.clone(),
            old_primary: old.clone(),
            container: pcfg.container_of(&target.name),
        };
        tracing::warn!(failed = %old.name, candidate = %target.name, method = ?pcfg.method, "promoting");
        if let Err(e) = topo.promoting(id, failed).await {
            event.error = Some(format!("cannot record the promotion of {}: {e}", target.name));
            return event;
        }
        match promote(&target, pcfg, &placeholders, cred, timeout).await {
            Ok(out) => {
                tracing::warn!(node = %target.name, elapsed = ?out.elapsed, "promoted");
                promoted = Some(id);
                break;
            }
            Err(e) => {
                tracing::error!(node = %target.name, error = %e, "promotion failed: fencing it, then trying the next candidate");
                event.failed_attempts.push((target.name.clone(), e.to_string()));
                // It may still turn primary (a promotion that timed out): never two primaries.
                if let Err(e) = topo.fence_candidate(id).await {
                    event.error = Some(format!(
                        "cannot fence {} after its failed promotion: {e}",
                        target.name
                    ));
                    return event;
                }
            }
        }
    }
    let Some(new) = promoted else {
        event.error = Some("every candidate failed to promote".into());
        return event;
    };
    event.promoted = Some(name(new));
    event.promoted_at = Some(std::time::SystemTime::now());
    if let Err(e) = topo.switch_primary(new, failed).await {
        event.error = Some(format!(
            "{} was promoted but routing did not switch: {e}",
            name(new)
        ));
        return event;
    }
    event.resumed_at = Some(std::time::SystemTime::now());
    let followers: Vec<usize> = candidates.iter().map(|c| c.id).filter(|&i| i != new).collect();
    // Its new timeline starts where its WAL ended, at or before the position read live.
    let fork = candidates.iter().find(|c| c.id == new && c.live).map(|c| c.lsn);
    for id in settle(&nodes, new, &followers, cfg, cred, &mut event, fork).await {
        // Its data has WAL the new primary never had: no reads from it until it is rewound.
        if let Err(e) = topo.fence_candidate(id).await {
            tracing::error!(node = %name(id), error = %e, "cannot fence a standby ahead of the new primary");
        }
    }
    event
}

/// After `new` was promoted: re-points `followers` at it (when configured) and makes sure writes
/// cannot hang on a synchronous standby that is gone. `fork`: a position at or past the start
/// of `new`'s timeline (its WAL position read just before its promotion); a follower that has
/// replayed past it can never follow `new` (PostgreSQL: "new timeline forked off current
/// database system timeline before current recovery point"): it is not re-pointed or waited
/// for, and is returned, to be fenced until a rejoin rewinds it.
pub async fn settle(
    nodes: &[NodeRef],
    new: usize,
    followers: &[usize],
    cfg: &FailoverConfig,
    cred: &Credentials,
    event: &mut FailoverEvent,
    fork: Option<u64>,
) -> Vec<usize> {
    let mut ahead = Vec::new();
    let nodes: Vec<NodeRef> = nodes.iter().map(|n| cfg.with_data_dir(n.clone())).collect();
    let new_ref = nodes[new].clone();
    // The event names the primary that was left; pgpool's %M %P %N %S describe it.
    let old_ref = nodes
        .iter()
        .find(|n| n.name == event.failed)
        .cloned()
        .unwrap_or_default();
    let follow_timeout = Duration::from_secs_f64(cfg.follow_timeout);
    if cfg.follow || !cfg.follow_command.is_empty() {
        for &id in followers {
            let node = &nodes[id];
            let past = match fork {
                Some(f) => replayed_lsn(node, cred).await.filter(|&r| r > f),
                None => None,
            };
            let r = if let Some(r) = past {
                ahead.push(id);
                Err(format!(
                    "it replayed WAL up to {} past the start of {}'s timeline (at or before {}): it cannot follow it and needs a rejoin",
                    lsn_text(r),
                    new_ref.name,
                    lsn_text(fork.unwrap_or_default())
                ))
            } else if cfg.follow_command.is_empty() {
                match repoint(node, &new_ref, cred).await {
                    Ok(app) => wait_streaming(&new_ref, &app, cred, follow_timeout)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                follow_by_command(node, &new_ref, &old_ref, cfg, cred, follow_timeout).await
            };
            if let Err(e) = &r {
                tracing::error!(node = %node.name, error = %e, "standby did not follow the new primary");
            }
            event.followers.push((node.name.clone(), r));
        }
    }
    // A follower that streams in time may become the new synchronous standby; otherwise clear.
    let grace = if event.followers.iter().any(|(_, r)| r.is_ok()) {
        follow_timeout
    } else {
        Duration::ZERO
    };
    match settle_synchronous(&new_ref, cred, grace).await {
        Ok(cleared) => event.cleared_synchronous = cleared,
        Err(e) => tracing::error!(node = %new_ref.name, error = %e, "cannot check synchronous_standby_names"),
    }
    ahead
}

/// A standby's replayed WAL position.
async fn replayed_lsn(node: &NodeRef, cred: &Credentials) -> Option<u64> {
    let client = connect(node, cred).await.ok()?;
    let sql = "select pg_last_wal_replay_lsn()::text";
    let text = query_text(&client, node, sql, cred.connect_timeout)
        .await
        .ok()??;
    crate::cluster::parse_lsn(&text)
}

/// An LSN as PostgreSQL writes it.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Runs pgpool's `follow_primary_command` for standby `node` (pgpool's placeholders: `%d %h %p %D`
/// the standby, `%m %H %r %R` the new primary, `%M %P %N %S` the old one), then waits for the
/// standby to stream from `new`.
async fn follow_by_command(
    node: &NodeRef,
    new: &NodeRef,
    old: &NodeRef,
    cfg: &FailoverConfig,
    cred: &Credentials,
    limit: Duration,
) -> Result<(), String> {
    let placeholders = Placeholders {
        subject: node.clone(),
        failed: node.clone(),
        new_primary: new.clone(),
        old_primary: old.clone(),
        container: cfg.promote_for(&node.name).container_of(&node.name),
    };
    let start = Instant::now();
    run_command(&node.name, &render(&cfg.follow_command, &placeholders), limit)
        .await
        .map_err(|e| e.to_string())?;
    let left = limit.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
    wait_following(node, new, cred, left)
        .await
        .map_err(|e| e.to_string())
}

/// A standby's freshest WAL position: the larger of received and replayed.
async fn live_lsn(node: &NodeRef, cred: &Credentials) -> Option<u64> {
    let client = connect(node, cred).await.ok()?;
    let sql = "select greatest(coalesce(pg_last_wal_receive_lsn(), '0/0'), coalesce(pg_last_wal_replay_lsn(), '0/0'))::text";
    let text = query_text(&client, node, sql, cred.connect_timeout)
        .await
        .ok()??;
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}
