//! `--pgpool-conf`: reads an existing pgpool-II `pgpool.conf` (and the `pool_passwd` it names) and
//! translates the keys that matter into dbproxy's own configuration tree, so an operator can move
//! from pgpool-II without rewriting anything. Keys that only matter to pgpool's internals are
//! accepted and listed, so nothing is silently dropped.
//!
//! The file format is PostgreSQL's GUC syntax: `name = value` (the `=` is optional), values bare or
//! single-quoted (`''` or `\'` for a quote), `#` starting a comment outside quotes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// What went wrong reading a pgpool configuration.
#[derive(Debug, thiserror::Error)]
pub enum PgpoolConfError {
    /// A line is not `name = value`.
    #[error("pgpool.conf line {line}: {message}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A key has a value dbproxy cannot honour.
    #[error("pgpool.conf line {line}: `{key}` = '{value}': {message}")]
    Unsupported {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// Why it cannot be honoured.
        message: String,
    },
    /// pool_hba.conf could not be read, or has a line dbproxy cannot honour.
    #[error("{path}: {message}")]
    PoolHba {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The pool_passwd file could not be read or parsed.
    #[error("pool_passwd {path}: {message}")]
    PoolPasswd {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The translation of a pgpool.conf.
#[derive(Debug, Clone, Default)]
pub struct PgpoolImport {
    /// dbproxy configuration keys, to be layered under the TOML file, environment and flags.
    pub table: Table,
    /// Keys that were accepted but have no effect in dbproxy, with their line numbers.
    pub ignored: Vec<String>,
    /// How some keys were interpreted (approximations an operator should know about).
    pub notes: Vec<String>,
    /// pgpool's `failover_command`, when set (automatic failover uses it as an `exec` step).
    pub failover_command: Option<String>,
    /// pgpool's `follow_primary_command`, when set.
    pub follow_primary_command: Option<String>,
    /// Key by key, what dbproxy does with what pgpool.conf set (the migration check).
    pub review: Vec<crate::pgpool_check::Review>,
}

/// Reads `path` and the `pool_passwd` file it names (relative to its directory).
pub fn load(path: &Path) -> Result<PgpoolImport, PgpoolConfError> {
    let text = std::fs::read_to_string(path).map_err(|e| PgpoolConfError::Syntax {
        line: 0,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
}

/// Parses pgpool.conf text; `base_dir` resolves a relative `pool_passwd`.
pub fn parse(text: &str, base_dir: &Path) -> Result<PgpoolImport, PgpoolConfError> {
    let entries = parse_lines(text)?;
    let get = |k: &str| entries.get(k).map(|(_, v)| v.as_str());
    let mut out = PgpoolImport::default();
    // pgpool reads pool_hba.conf from beside pgpool.conf (Debian: /etc/pgpool2).
    let hba_on = get("enable_pool_hba").and_then(boolean) == Some(true);
    let pool_hba = base_dir.join("pool_hba.conf");
    let beside = crate::pgpool_check::Beside {
        pcp_conf: base_dir.join("pcp.conf").exists(),
        pool_hba: hba_on && pool_hba.exists(),
    };
    out.review = crate::pgpool_check::review(&entries, beside);
    let mut routing = Table::new();
    let mut health = Table::new();
    let mut limits = Table::new();
    let mut tls = Table::new();
    let mut nodes: BTreeMap<u32, Table> = BTreeMap::new();

    for (key, (line, value)) in &entries {
        let line = *line;
        let unsupported = |message: &str| PgpoolConfError::Unsupported {
            line,
            key: key.clone(),
            value: value.clone(),
            message: message.to_string(),
        };
        if let Some((field, n)) = backend_key(key) {
            let node = nodes.entry(n).or_default();
            match field {
                "hostname" => {
                    node.insert("host".into(), Value::String(value.clone()));
                }
                "port" => {
                    node.insert(
                        "port".into(),
                        Value::Integer(int(value).ok_or_else(|| unsupported("not a port"))?),
                    );
                }
                "weight" => {
                    // pgpool accepts fractional weights; dbproxy's are integers, so scale by 1000.
                    let w: f64 = value.parse().map_err(|_| unsupported("not a number"))?;
                    if !(0.0..=1e6).contains(&w) {
                        return Err(unsupported("weight must be between 0 and 1000000"));
                    }
                    let scaled = if w.fract() == 0.0 {
                        w as i64
                    } else {
                        (w * 1000.0).round() as i64
                    };
                    node.insert("weight".into(), Value::Integer(scaled));
                    if w.fract() != 0.0 {
                        out.notes.push(format!(
                            "line {line}: {key} = {value} scaled to {scaled} (weights are integers)"
                        ));
                    }
                }
                "data_directory" => {
                    node.insert("data_dir".into(), Value::String(value.clone()));
                }
                "application_name" if !value.is_empty() => {
                    node.insert("name".into(), Value::String(value.clone()));
                }
                "flag" => {
                    let flags: Vec<&str> = value.split('|').map(str::trim).collect();
                    for f in &flags {
                        match f.to_ascii_uppercase().as_str() {
                            "ALLOW_TO_FAILOVER" | "" => {}
                            "DISALLOW_TO_FAILOVER" | "ALWAYS_PRIMARY" => out.notes.push(format!(
                                "line {line}: {key} = {f} is not enforced: dbproxy may promote any healthy standby (use failover.priority to order them)"
                            )),
                            _ => return Err(unsupported("unknown backend flag")),
                        }
                    }
                }
                _ => out.ignored.push(format!("{key} (line {line})")),
            }
            continue;
        }
        match key.as_str() {
            "listen_addresses" | "port" => {}
            "backend_clustering_mode" => {
                if value != "streaming_replication" {
                    return Err(unsupported("dbproxy supports only streaming_replication"));
                }
            }
            "master_slave_mode" | "master_slave_sub_mode" => {
                if key == "master_slave_sub_mode" && value != "stream" {
                    return Err(unsupported("dbproxy supports only streaming replication ('stream')"));
                }
            }
            "load_balance_mode" => {
                routing.insert("load_balance".into(), Value::Boolean(boolean(value).ok_or_else(|| unsupported("not a boolean"))?));
            }
            "disable_load_balance_on_write" => {
                let mapped = match value.to_ascii_lowercase().as_str() {
                    "transaction" => "transaction",
                    "always" => "always",
                    "off" => {
                        out.notes.push(format!(
                            "line {line}: disable_load_balance_on_write = 'off' works as 'transaction': a \
                             transaction's reads after its first write go to the primary, so they see it"
                        ));
                        "off"
                    }
                    "trans_transaction" => "trans_transaction",
                    "dml_adaptive" => {
                        out.notes.push(format!(
                            "line {line}: disable_load_balance_on_write = 'dml_adaptive' treated as \
                             'transaction' (stricter: every read of a transaction after its first write \
                             goes to the primary, whatever table it reads)"
                        ));
                        "transaction"
                    }
                    _ => return Err(unsupported("expected transaction, trans_transaction, always, dml_adaptive or off")),
                };
                routing.insert("disable_load_balance_on_write".into(), Value::String(mapped.into()));
            }
            "delay_threshold" => {
                routing.insert("max_replica_lag_bytes".into(), Value::Integer(int(value).ok_or_else(|| unsupported("not a number"))?));
            }
            "delay_threshold_by_time" => {
                routing.insert("max_replica_lag_ms".into(), Value::Integer(int(value).ok_or_else(|| unsupported("not a number"))?));
            }
            "read_only_function_list" => {
                let list: Vec<Value> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|f| !f.is_empty())
                    .map(|f| Value::String(f.to_ascii_lowercase()))
                    .collect();
                routing.insert("read_only_functions".into(), Value::Array(list));
            }
            "write_function_list" => out.notes.push(format!(
                "line {line}: write_function_list is not needed: functions not known to be read-only always go to the primary"
            )),
            "statement_level_load_balance" => out.notes.push(format!(
                "line {line}: statement_level_load_balance: dbproxy always balances statement by statement"
            )),
            "health_check_period" | "health_check_timeout" | "health_check_retry_delay" => {
                let secs: f64 = value.parse().map_err(|_| unsupported("not a number of seconds"))?;
                let field = &key["health_check_".len()..];
                if key == "health_check_period" && secs <= 0.0 {
                    out.notes.push(format!("line {line}: health_check_period = 0 disables pgpool's checks; dbproxy always checks, every 1 s"));
                    continue;
                }
                if key == "health_check_timeout" && secs <= 0.0 {
                    // pgpool: 0 means no timeout. dbproxy bounds every check, so use a generous one.
                    health.insert("timeout".into(), Value::Float(30.0));
                    continue;
                }
                health.insert(field.into(), Value::Float(secs));
            }
            "health_check_max_retries" => {
                health.insert("max_retries".into(), Value::Integer(int(value).ok_or_else(|| unsupported("not a number"))?));
            }
            "health_check_user" | "health_check_password" | "health_check_database" => {
                let field = &key["health_check_".len()..];
                if !(field == "database" && value.is_empty()) {
                    health.insert(field.into(), Value::String(value.clone()));
                }
            }
            "sr_check_period" | "sr_check_user" | "sr_check_password" | "sr_check_database" => out.notes.push(format!(
                "line {line}: {key}: replication lag is measured by the health check itself (health.period)"
            )),
            "num_init_children" => {
                limits.insert("max_connections".into(), Value::Integer(int(value).ok_or_else(|| unsupported("not a number"))?));
            }
            "client_idle_limit" => {
                limits.insert("client_idle_timeout".into(), Value::Float(value.parse().map_err(|_| unsupported("not a number"))?));
            }
            "authentication_timeout" => {
                let secs: f64 = value.parse().map_err(|_| unsupported("not a number"))?;
                if secs > 0.0 {
                    limits.insert("startup_timeout".into(), Value::Float(secs));
                }
            }
            "failover_command" if !value.is_empty() => out.failover_command = Some(value.clone()),
            "follow_primary_command" if !value.is_empty() => out.follow_primary_command = Some(value.clone()),
            // pgpool with ssl = on tries TLS to the backends and falls back to clear text.
            "ssl" if boolean(value) == Some(true) => {
                tls.insert("backend".into(), Value::String("prefer".into()));
            }
            "ssl" => out.notes.push(format!(
                "line {line}: ssl = off: dbproxy still asks the servers for TLS (tls.backend = prefer); \
                 set tls.backend = \"disable\" to match pgpool"
            )),
            // pgpool checks the backends' certificates against ssl_ca_cert.
            "ssl_ca_cert" if !value.is_empty() => {
                tls.insert("backend_ca_file".into(), Value::String(value.clone()));
                out.notes.push(format!(
                    "line {line}: ssl_ca_cert is tls.backend_ca_file; set tls.backend = \"verify-full\" \
                     to refuse servers whose certificate it does not sign"
                ));
            }
            "pool_passwd" | "enable_pool_hba" | "pcp_listen_addresses" | "pcp_port" => {}
            _ => out.ignored.push(format!("{key} (line {line})")),
        }
    }

    // listen_addresses + port → listen.
    let port = match entries.get("port") {
        Some((line, v)) => {
            int(v)
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| PgpoolConfError::Unsupported {
                    line: *line,
                    key: "port".into(),
                    value: v.clone(),
                    message: "not a port".into(),
                })?
        }
        None => 9999,
    };
    let listen = socket_addr(
        "listen_addresses",
        get("listen_addresses").unwrap_or("*"),
        port,
        &mut out.notes,
    );
    out.table.insert("listen".into(), Value::String(listen));

    // PCP: pgpool's pcp_listen_addresses (default localhost) and pcp_port, with the pcp.conf
    // that pgpool reads from beside pgpool.conf.
    let pcp_conf = base_dir.join("pcp.conf");
    let pcp_addresses = get("pcp_listen_addresses").unwrap_or("localhost");
    if pcp_conf.exists() && !pcp_addresses.trim().is_empty() {
        let pcp_port =
            match entries.get("pcp_port") {
                Some((line, v)) => int(v).filter(|p| (1..=65535).contains(p)).ok_or_else(|| {
                    PgpoolConfError::Unsupported {
                        line: *line,
                        key: "pcp_port".into(),
                        value: v.clone(),
                        message: "not a port".into(),
                    }
                })?,
                None => 9898,
            };
        let mut pcp = Table::new();
        pcp.insert(
            "listen".into(),
            Value::String(socket_addr(
                "pcp_listen_addresses",
                pcp_addresses,
                pcp_port,
                &mut out.notes,
            )),
        );
        pcp.insert("users_file".into(), Value::String(pcp_conf.display().to_string()));
        out.table.insert("pcp".into(), Value::Table(pcp));
    } else if entries.contains_key("pcp_port") || entries.contains_key("pcp_listen_addresses") {
        out.notes.push(format!(
            "the PCP listener is off: {} (set pcp.listen and pcp.users_file)",
            if pcp_addresses.trim().is_empty() {
                "pcp_listen_addresses is empty (dbproxy has no unix socket)".to_string()
            } else {
                format!("no {} beside pgpool.conf", pcp_conf.display())
            }
        ));
    }

    // Backends, in pgpool's order; gaps in the numbering are kept as they are (node ids matter).
    let mut node_list = Vec::new();
    for (n, mut node) in nodes {
        if !node.contains_key("host") {
            return Err(PgpoolConfError::Syntax {
                line: 0,
                message: format!("backend {n} has settings but no backend_hostname{n}"),
            });
        }
        node.entry("name")
            .or_insert_with(|| Value::String(format!("node{n}")));
        node_list.push(Value::Table(node));
    }
    let mut failover = Table::new();
    if let Some(cmd) = &out.failover_command {
        let mut p = Table::new();
        p.insert("method".into(), Value::String("exec".into()));
        p.insert("command".into(), Value::String(cmd.clone()));
        failover.insert("default".into(), Value::Table(p));
        out.notes.push(
            "failover_command runs as the promotion step when the primary fails, with pgpool's %-placeholders \
             (not for standby failures, which only stop reads); to let dbproxy promote with pg_promote() \
             instead, add --set 'failover.default.method=\"sql\"' (or the same key in the TOML file)"
                .into(),
        );
    }
    if let Some(cmd) = &out.follow_primary_command {
        failover.insert("follow_command".into(), Value::String(cmd.clone()));
        out.notes.push(
            "follow_primary_command runs for every other standby after a failover or switchover, in place of \
             dbproxy's own re-pointing; add --set 'failover.follow_command=\"\"' to let dbproxy re-point them"
                .into(),
        );
    }
    if !failover.is_empty() {
        out.table.insert("failover".into(), Value::Table(failover));
    }
    if !node_list.is_empty() {
        out.table.insert("nodes".into(), Value::Array(node_list));
    }

    crate::pgpool_clients::import(get("pool_passwd"), base_dir, hba_on, &pool_hba, &mut out)?;
    for (name, t) in [
        ("routing", routing),
        ("health", health),
        ("limits", limits),
        ("tls", tls),
    ] {
        if !t.is_empty() {
            out.table.insert(name.into(), Value::Table(t));
        }
    }
    Ok(out)
}

/// `address:port` for pgpool's address list `list` (`*`, `localhost`, names or addresses; dbproxy
/// binds the first).
fn socket_addr(key: &str, list: &str, port: i64, notes: &mut Vec<String>) -> String {
    let list = list.trim();
    let first = list.split(',').next().unwrap_or("").trim();
    if list.contains(',') {
        notes.push(format!("{key} = '{list}': dbproxy listens on the first, {first}"));
    }
    let addr = match first {
        "*" | "" => "0.0.0.0",
        "localhost" => "127.0.0.1",
        a => a,
    };
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Splits `backend_hostname12` into ("hostname", 12).
fn backend_key(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("backend_")?;
    let digits = rest.len() - rest.bytes().rev().take_while(u8::is_ascii_digit).count();
    if digits == rest.len() {
        return None;
    }
    let n = rest[digits..].parse().ok()?;
    Some((&rest[..digits], n))
}

fn int(v: &str) -> Option<i64> {
    v.trim().parse().ok()
}

fn boolean(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses every `name = value` line; later lines win, as in pgpool.
fn parse_lines(text: &str) -> Result<BTreeMap<String, (usize, String)>, PgpoolConfError> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        let name_end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(s.len());
        if name_end == 0 {
            return Err(PgpoolConfError::Syntax {
                line,
                message: format!("expected a setting name: {s}"),
            });
        }
        let name = s[..name_end].to_ascii_lowercase();
        let mut rest = s[name_end..].trim_start();
        if let Some(r) = rest.strip_prefix('=') {
            rest = r.trim_start();
        }
        let value = if let Some(body) = rest.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = body.chars();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\'' => {
                        if chars.as_str().starts_with('\'') {
                            v.push('\'');
                            chars.next();
                        } else {
                            closed = true;
                            break;
                        }
                    }
                    '\\' => match chars.next() {
                        Some(n) => v.push(n),
                        None => break,
                    },
                    c => v.push(c),
                }
            }
            if !closed {
                return Err(PgpoolConfError::Syntax {
                    line,
                    message: format!("unterminated quoted value for {name}"),
                });
            }
            let tail = chars.as_str().trim();
            if !(tail.is_empty() || tail.starts_with('#')) {
                return Err(PgpoolConfError::Syntax {
                    line,
                    message: format!("unexpected text after the value of {name}"),
                });
            }
            v
        } else {
            let v = rest.split('#').next().unwrap_or("").trim();
            if v.is_empty() {
                return Err(PgpoolConfError::Syntax {
                    line,
                    message: format!("{name} has no value"),
                });
            }
            if v.contains(char::is_whitespace) {
                return Err(PgpoolConfError::Syntax {
                    line,
                    message: format!("the value of {name} must be quoted"),
                });
            }
            v.to_string()
        };
        out.insert(name, (line, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/examples")
    }

    #[test]
    fn the_seed_pgpool_conf_translates() {
        let imp = load(&examples().join("pgpool.conf")).expect("the example pgpool.conf");
        let t = &imp.table;
        assert_eq!(t["listen"].as_str(), Some("0.0.0.0:9999"));
        let nodes = t["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0]["host"].as_str(), Some("db-primary"));
        assert_eq!(nodes[0]["name"].as_str(), Some("db-primary"));
        assert_eq!(nodes[1]["host"].as_str(), Some("db-replica"));
        assert_eq!(nodes[1]["port"].as_integer(), Some(5432));
        assert_eq!(nodes[1]["weight"].as_integer(), Some(1));
        assert_eq!(t["routing"]["load_balance"].as_bool(), Some(true));
        assert_eq!(
            t["routing"]["disable_load_balance_on_write"].as_str(),
            Some("transaction")
        );
        assert_eq!(
            t["routing"]["max_replica_lag_bytes"].as_integer(),
            Some(10_000_000)
        );
        assert_eq!(t["health"]["period"].as_float(), Some(5.0));
        assert_eq!(t["health"]["timeout"].as_float(), Some(20.0));
        assert_eq!(t["health"]["max_retries"].as_integer(), Some(3));
        assert_eq!(t["health"]["user"].as_str(), Some("postgres"));
        assert_eq!(t["limits"]["max_connections"].as_integer(), Some(32));
        let users = t["users"].as_array().unwrap();
        let app = users.iter().find(|u| u["name"].as_str() == Some("app")).unwrap();
        assert_eq!(app["password"].as_str(), Some("app-secret"));
        let pg = users
            .iter()
            .find(|u| u["name"].as_str() == Some("postgres"))
            .unwrap();
        assert_eq!(pg["secret"].as_str(), Some("md5768d94c3a0b6e118442bc70ee41c3b82"));
        let hba = t["hba"].as_array().unwrap();
        assert_eq!(hba[0]["user"].as_str(), Some("postgres"));
        assert_eq!(hba[0]["method"].as_str(), Some("md5"));
        assert_eq!(hba.last().unwrap()["method"].as_str(), Some("scram-sha-256"));
        assert!(imp
            .failover_command
            .as_deref()
            .unwrap()
            .starts_with("/etc/pgpool-II/failover.sh %d"));
        assert_eq!(imp.follow_primary_command, None);
        let f = &t["failover"];
        assert_eq!(f["default"]["method"].as_str(), Some("exec"));
        assert!(
            f.get("nodes").is_none(),
            "one promotion setting, so one key overrides it"
        );
        assert!(f.get("follow_command").is_none());
        assert_eq!(nodes[0]["data_dir"].as_str(), Some("/var/lib/postgresql/data"));
        assert!(t.get("pcp").is_none(), "no pcp.conf beside the example");
        assert!(
            imp.notes.iter().any(|n| n.contains("PCP listener is off")),
            "{:?}",
            imp.notes
        );
        for k in ["max_pool", "log_destination"] {
            assert!(
                imp.ignored.iter().any(|i| i.starts_with(k)),
                "{k} should be reported: {:?}",
                imp.ignored
            );
        }
    }

    #[test]
    fn the_translation_loads_as_a_dbproxy_config() {
        let imp = load(&examples().join("pgpool.conf")).unwrap();
        let cfg: crate::config::Config = common::ConfigSource::new()
            .base(imp.table)
            .load()
            .expect("valid config");
        assert_eq!(cfg.nodes.len(), 2);
        assert_eq!(cfg.listen, "0.0.0.0:9999");
    }

    #[test]
    fn later_layers_override_the_imported_failover() {
        let t = "backend_hostname0 = 'a'\nbackend_data_directory0 = '/d/0'\nbackend_hostname1 = 'b'\n\
                 failover_command = 'f.sh %d %D'\nfollow_primary_command = 'follow.sh %d'\n";
        let imp = parse(t, Path::new("/nonexistent")).unwrap();
        let load = |sets: &[(&str, &str)]| {
            let mut src = common::ConfigSource::new().base(imp.table.clone());
            for (k, v) in sets {
                src = src.set(k, *v);
            }
            src.load::<crate::config::Config>().unwrap()
        };
        let cfg = load(&[]);
        assert_eq!(
            cfg.failover.promote_for("node1").method,
            crate::failover::PromoteMethod::Exec
        );
        assert_eq!(cfg.failover.follow_command, "follow.sh %d");
        assert_eq!(cfg.nodes[0].data_dir, "/d/0");
        assert_eq!(cfg.nodes[1].data_dir, "");
        let cfg = load(&[
            ("failover.default.method", "\"sql\""),
            ("failover.follow_command", "\"\""),
        ]);
        for n in ["node0", "node1"] {
            assert_eq!(
                cfg.failover.promote_for(n).method,
                crate::failover::PromoteMethod::Sql,
                "{n}"
            );
        }
        assert_eq!(cfg.failover.follow_command, "");
        // The advice printed names the key that works.
        assert!(
            imp.notes
                .iter()
                .any(|n| n.contains("failover.default.method=\"sql\"")),
            "{:?}",
            imp.notes
        );
    }

    #[test]
    fn quoting_comments_and_later_lines() {
        let t = "port = 5433 # comment\nlisten_addresses = 'localhost'\nhealth_check_user = 'o''brien'\n\
                 health_check_password 'a\\'b#c' # x\nport = 6000\nbackend_hostname0 = 'h'\nbackend_weight0 = 0.5\n";
        let imp = parse(t, Path::new("/nonexistent")).unwrap();
        assert_eq!(imp.table["listen"].as_str(), Some("127.0.0.1:6000"));
        assert_eq!(imp.table["health"]["user"].as_str(), Some("o'brien"));
        assert_eq!(imp.table["health"]["password"].as_str(), Some("a'b#c"));
        assert_eq!(imp.table["nodes"][0]["weight"].as_integer(), Some(500));
        assert_eq!(imp.table["nodes"][0]["name"].as_str(), Some("node0"));
    }

    #[test]
    fn ssl_is_tls_to_the_servers() {
        let imp = parse(
            "ssl = on\nssl_ca_cert = '/etc/ca.pem'\n",
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(imp.table["tls"]["backend"].as_str(), Some("prefer"));
        assert_eq!(imp.table["tls"]["backend_ca_file"].as_str(), Some("/etc/ca.pem"));
        let imp = parse("ssl = off\n", Path::new("/nonexistent")).unwrap();
        assert!(imp.table.get("tls").is_none());
        assert!(
            imp.notes[0].contains("tls.backend = \"disable\""),
            "{:?}",
            imp.notes
        );
    }

    #[test]
    fn write_stickiness_modes() {
        let mode = |v: &str| {
            let imp = parse(
                &format!("disable_load_balance_on_write = '{v}'\n"),
                Path::new("/"),
            )
            .unwrap();
            let m = imp.table["routing"]["disable_load_balance_on_write"]
                .as_str()
                .map(str::to_string);
            (m, imp.notes.len())
        };
        assert_eq!(mode("transaction"), (Some("transaction".into()), 0));
        assert_eq!(mode("trans_transaction"), (Some("trans_transaction".into()), 0));
        assert_eq!(mode("ALWAYS"), (Some("always".into()), 0));
        assert_eq!(mode("off"), (Some("off".into()), 1), "noted: stricter");
        assert_eq!(
            mode("dml_adaptive"),
            (Some("transaction".into()), 1),
            "noted: stricter"
        );
    }

    #[test]
    fn bad_input_names_the_line() {
        let bad = [
            ("port = 'x'\n", "line 1"),
            ("listen_addresses = 'unterminated\n", "line 1"),
            ("\n\nbackend_clustering_mode = 'native_replication'\n", "line 3"),
            ("load_balance_mode = maybe\n", "line 1"),
            ("disable_load_balance_on_write = 'sometimes'\n", "line 1"),
            ("= 1\n", "line 1"),
            ("health_check_period = soon\n", "line 1"),
            ("backend_flag0 = 'FLY'\nbackend_hostname0 = 'h'\n", "line 1"),
            ("delay_threshold\n", "line 1"),
        ];
        for (text, want) in bad {
            let e = parse(text, Path::new("/nonexistent")).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = parse("backend_port1 = 5432\n", Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend_hostname1"), "{e}");
        let e = parse("pool_passwd = 'missing'\n", Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("file not found"), "{e}");
    }

    #[test]
    fn pcp_settings_with_the_pcp_conf_beside() {
        let dir = std::env::temp_dir().join(format!("pgpool-pcp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = "pcp_listen_addresses = '*'\npcp_port = 9898\nbackend_hostname0 = 'h'\n";
        let imp = parse(t, &dir).unwrap();
        assert!(imp.table.get("pcp").is_none());
        assert!(imp.notes.iter().any(|n| n.contains("PCP listener is off")));
        std::fs::write(
            dir.join("pcp.conf"),
            "pcpadmin:5ebe2294ecd0e0f08eab7690d2a6ee69\n",
        )
        .unwrap();
        let imp = parse(t, &dir).unwrap();
        assert_eq!(imp.table["pcp"]["listen"].as_str(), Some("0.0.0.0:9898"));
        let file = dir.join("pcp.conf").display().to_string();
        assert_eq!(imp.table["pcp"]["users_file"].as_str(), Some(file.as_str()));
        // pgpool's default is localhost:9898.
        let imp = parse("backend_hostname0 = 'h'\n", &dir).unwrap();
        assert_eq!(imp.table["pcp"]["listen"].as_str(), Some("127.0.0.1:9898"));
        assert!(parse("pcp_port = 'x'\n", &dir)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pool_hba_conf_is_read_when_enabled() {
        let dir = std::env::temp_dir().join(format!("pgpool-hba-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pool_passwd"), "u:md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n").unwrap();
        let base = "backend_hostname0 = 'h'\npool_passwd = 'pool_passwd'\n";
        // Without the file: the md5-for-md5-users rules, and a note.
        let imp = parse(&format!("{base}enable_pool_hba = on\n"), &dir).unwrap();
        assert_eq!(imp.table["hba"][0]["method"].as_str(), Some("md5"));
        assert!(imp.notes.iter().any(|n| n.contains("no ")), "{:?}", imp.notes);
        std::fs::write(dir.join("pool_hba.conf"), "host all u 127.0.0.1/32 trust\n").unwrap();
        let imp = parse(&format!("{base}enable_pool_hba = on\n"), &dir).unwrap();
        let hba = imp.table["hba"].as_array().unwrap();
        assert_eq!(hba[0]["method"].as_str(), Some("trust"));
        assert_eq!(hba[1]["method"].as_str(), Some("reject"));
        let review = |imp: &PgpoolImport| {
            imp.review
                .iter()
                .find(|r| r.key == "enable_pool_hba")
                .unwrap()
                .verdict
        };
        assert_eq!(review(&imp), crate::pgpool_check::Verdict::Same);
        // Off: the file is not read.
        let imp = parse(&format!("{base}enable_pool_hba = off\n"), &dir).unwrap();
        assert_eq!(imp.table["hba"][0]["method"].as_str(), Some("md5"));
        assert_eq!(
            imp.table["auth"]["passthrough"].as_bool(),
            Some(true),
            "off: pass-through"
        );
        assert_eq!(review(&imp), crate::pgpool_check::Verdict::Approximated);
        // A line dbproxy cannot honour stops the import.
        std::fs::write(dir.join("pool_hba.conf"), "hostssl all all 0.0.0.0/0 md5\n").unwrap();
        let e = parse(&format!("{base}enable_pool_hba = on\n"), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool_hba.conf") && e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
