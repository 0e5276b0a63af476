//! The migration check behind `dbproxy --pgpool-conf FILE --check-config`: for every key set in
//! a pgpool.conf, what dbproxy does with it — the same, an approximation, nothing (and why), or
//! something different that an operator would not notice until it mattered. The last kind makes
//! the check fail, so a migration never changes behaviour silently.
//!
//! Pure: it reads the parsed entries and whether files next to pgpool.conf exist.

use std::collections::BTreeMap;
use std::fmt;

/// What dbproxy does with one pgpool.conf key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// dbproxy behaves as pgpool-II does.
    Same,
    /// dbproxy does something close; the difference is stated.
    Approximated,
    /// The key has no effect in dbproxy (a pgpool internal, or a mode dbproxy does not have).
    Ignored,
    /// dbproxy would behave differently without telling anyone: the check fails.
    Different,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Same => "same",
            Verdict::Approximated => "approximated",
            Verdict::Ignored => "ignored",
            Verdict::Different => "DIFFERENT",
        })
    }
}

/// One key's line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    /// The pgpool key.
    pub key: String,
    /// Its line in pgpool.conf.
    pub line: usize,
    /// What dbproxy does.
    pub verdict: Verdict,
    /// How (the dbproxy key it maps to) or why not.
    pub why: String,
}

/// Files next to pgpool.conf that change verdicts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beside {
    /// `pcp.conf` exists (the PCP listener can start).
    pub pcp_conf: bool,
    /// The `pool_hba.conf` pgpool.conf names exists and dbproxy reads it.
    pub pool_hba: bool,
}

/// Groups of keys that only matter to pgpool-II's own machinery, with why.
const IGNORED: &[(&str, &str)] = &[
    (
        "log_",
        "dbproxy logs structured lines to stderr; the level comes from RUST_LOG",
    ),
    ("syslog_", "dbproxy logs to stderr"),
    ("logging_collector", "dbproxy logs to stderr"),
    ("logdir", "dbproxy keeps no status file"),
    ("pid_file_name", "dbproxy writes no pid file"),
    (
        "client_min_messages",
        "dbproxy sends no pgpool debug messages to clients",
    ),
    (
        "max_pool",
        "process model: dbproxy opens backend connections per session, not per child",
    ),
    (
        "connection_cache",
        "process model: backend connections live as long as their session",
    ),
    ("child_life_time", "process model: dbproxy has no child processes"),
    (
        "child_max_connections",
        "process model: dbproxy has no child processes",
    ),
    (
        "connection_life_time",
        "process model: backend connections live as long as their session",
    ),
    (
        "reserved_connections",
        "process model: clients beyond limits.max_connections get 53300 at once",
    ),
    (
        "process_management",
        "process model: dbproxy has no child processes",
    ),
    (
        "min_spare_children",
        "process model: dbproxy has no child processes",
    ),
    (
        "max_spare_children",
        "process model: dbproxy has no child processes",
    ),
    (
        "listen_backlog_multiplier",
        "process model: dbproxy accepts in one event loop",
    ),
    (
        "serialize_accept",
        "process model: dbproxy accepts in one event loop",
    ),
    (
        "relcache_",
        "dbproxy classifies statements itself and keeps no relation cache",
    ),
    ("enable_shared_relcache", "dbproxy keeps no relation cache"),
    (
        "check_temp_table",
        "dbproxy pins a session that creates temporary tables to the primary",
    ),
    (
        "check_unlogged_table",
        "dbproxy sends writes to the primary whatever the table",
    ),
    ("replicate_select", "native replication mode only"),
    ("insert_lock", "native replication mode only"),
    ("lobj_lock_table", "native replication mode only"),
    ("replication_stop_on_mismatch", "native replication mode only"),
    (
        "failover_if_affected_tuples_mismatch",
        "native replication mode only",
    ),
    ("memqcache_", "dbproxy has no query cache"),
    (
        "ignore_leading_white_space",
        "dbproxy's lexer always skips white space and comments",
    ),
    ("allow_sql_comments", "dbproxy's lexer always skips comments"),
    (
        "allow_clear_text_frontend_auth",
        "dbproxy never asks clients for clear-text passwords",
    ),
    ("pcp_socket_dir", "the PCP listener is TCP only"),
    ("use_watchdog", "off: nothing to do"),
    ("hostname", "watchdog settings (use_watchdog is off)"),
    ("wd_", "watchdog settings (use_watchdog is off)"),
    ("heartbeat_", "watchdog settings (use_watchdog is off)"),
    ("other_pgpool_", "watchdog settings (use_watchdog is off)"),
    ("pgpool_port", "watchdog settings (use_watchdog is off)"),
    ("delegate_ip", "watchdog settings (use_watchdog is off)"),
    ("if_", "watchdog settings (use_watchdog is off)"),
    ("arping_", "watchdog settings (use_watchdog is off)"),
    ("trusted_servers", "watchdog settings (use_watchdog is off)"),
    (
        "trusted_server_command",
        "watchdog settings (use_watchdog is off)",
    ),
    ("ping_path", "watchdog settings (use_watchdog is off)"),
    (
        "failover_require_consensus",
        "watchdog settings (use_watchdog is off)",
    ),
    (
        "failover_when_quorum_exists",
        "watchdog settings (use_watchdog is off)",
    ),
    (
        "allow_multiple_failover_requests_from_node",
        "watchdog settings (use_watchdog is off)",
    ),
    (
        "enable_consensus_with_half_votes",
        "watchdog settings (use_watchdog is off)",
    ),
    ("ssl_", "client TLS comes from tls.cert_file and tls.key_file"),
];

fn on(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "on" | "true" | "yes" | "1"
    )
}

/// Reviews every entry (`key → (line, value)`, as pgpool.conf set them).
pub fn review(entries: &BTreeMap<String, (usize, String)>, beside: Beside) -> Vec<Review> {
    let mut out: Vec<Review> = entries
        .iter()
        .map(|(key, (line, value))| {
            let (verdict, why) = judge(key, value, beside);
            Review {
                key: key.clone(),
                line: *line,
                verdict,
                why,
            }
        })
        .collect();
    out.sort_by_key(|r| r.line);
    out
}

fn judge(key: &str, value: &str, beside: Beside) -> (Verdict, String) {
    use Verdict::*;
    let s = |v: Verdict, why: &str| (v, why.to_string());
    if let Some(field) = key
        .strip_prefix("backend_")
        .map(|r| r.trim_end_matches(|c: char| c.is_ascii_digit()))
        .filter(|f| key.ends_with(|c: char| c.is_ascii_digit()) && !f.is_empty())
    {
        return match field {
            "hostname" => s(Same, "nodes.N.host"),
            "port" => s(Same, "nodes.N.port"),
            "data_directory" => s(Same, "nodes.N.data_dir, for %D and %R"),
            "application_name" => s(Same, "nodes.N.name, the name looked up in pg_stat_replication"),
            "weight" if value.contains('.') => s(
                Approximated,
                "nodes.N.weight: scaled by 1000 (weights are integers); the ratios stay",
            ),
            "weight" => s(Same, "nodes.N.weight"),
            "flag" => {
                let flags = value.to_ascii_uppercase();
                if flags.contains("DISALLOW_TO_FAILOVER") || flags.contains("ALWAYS_PRIMARY") {
                    s(
                        Different,
                        "not enforced: dbproxy may promote any healthy standby and fails over any primary; \
                         order candidates with failover.priority, or turn failover.enabled off",
                    )
                } else {
                    s(Same, "ALLOW_TO_FAILOVER is dbproxy's behaviour")
                }
            }
            _ => s(Different, "a per-node setting dbproxy does not know"),
        };
    }
    if key
        .strip_prefix("health_check_")
        .is_some_and(|r| r.ends_with(|c: char| c.is_ascii_digit()))
    {
        return s(
            Different,
            "per-node health-check settings are not supported: every node uses the global health.* values",
        );
    }
    match key {
        "listen_addresses" if value.contains(',') => {
            s(Approximated, "listen: dbproxy listens on the first address only")
        }
        "listen_addresses" | "port" => s(Same, "listen"),
        "unix_socket_directories" | "socket_dir" => s(
            Approximated,
            "dbproxy listens on TCP only: clients using the socket must connect to listen's address",
        ),
        "backend_clustering_mode" | "master_slave_mode" | "master_slave_sub_mode" => {
            s(Same, "streaming replication")
        }
        "load_balance_mode" => s(Same, "routing.load_balance"),
        "disable_load_balance_on_write" => match value.to_ascii_lowercase().as_str() {
            "transaction" | "trans_transaction" | "always" => {
                s(Same, "routing.disable_load_balance_on_write")
            }
            "off" => s(
                Approximated,
                "routing.disable_load_balance_on_write = off: a transaction's reads after its first \
                 write go to the primary (pgpool balances them, and they do not see that write)",
            ),
            _ => s(
                Approximated,
                "routing.disable_load_balance_on_write = transaction: every read of a transaction \
                 after its first write goes to the primary, whatever table it reads",
            ),
        },
        "statement_level_load_balance" if on(value) => s(Same, "dbproxy balances each statement"),
        "statement_level_load_balance" => s(
            Approximated,
            "dbproxy picks a standby per statement, pgpool per session: reads of one session may \
             see standbys at different replay positions (routing.read_your_writes helps)",
        ),
        "delay_threshold" => s(Same, "routing.max_replica_lag_bytes"),
        "delay_threshold_by_time" => s(Same, "routing.max_replica_lag_ms"),
        "prefer_lower_delay_standby" => s(
            Approximated,
            "standbys past the lag limits get no reads; the rest share reads by weight",
        ),
        "read_only_function_list" => s(Same, "routing.read_only_functions"),
        "write_function_list" | "black_function_list" => s(
            Approximated,
            "functions not in routing.read_only_functions always go to the primary",
        ),
        "database_redirect_preference_list"
        | "app_name_redirect_preference_list"
        | "primary_routing_query_pattern_list"
        | "black_query_pattern_list"
        | "black_memqcache_table_list"
        | "white_memqcache_table_list"
        | "cache_safe_memqcache_table_list"
        | "cache_unsafe_memqcache_table_list"
            if value.trim().is_empty() =>
        {
            s(Ignored, "empty")
        }
        "database_redirect_preference_list"
        | "app_name_redirect_preference_list"
        | "primary_routing_query_pattern_list"
        | "black_query_pattern_list" => s(
            Different,
            "not supported: reads are spread by weight whatever the database, application or query",
        ),
        "health_check_period" if value.trim().parse::<f64>().is_ok_and(|p| p <= 0.0) => s(
            Approximated,
            "0 turns pgpool's checks off; dbproxy always checks (health.period)",
        ),
        "health_check_timeout" if value.trim().parse::<f64>().is_ok_and(|p| p <= 0.0) => s(
            Approximated,
            "0 means no timeout in pgpool; dbproxy bounds every probe (health.timeout = 30)",
        ),
        "health_check_period"
        | "health_check_timeout"
        | "health_check_max_retries"
        | "health_check_retry_delay"
        | "health_check_user"
        | "health_check_password"
        | "health_check_database" => s(Same, "health.*"),
        "sr_check_period" | "sr_check_user" | "sr_check_password" | "sr_check_database" => s(
            Approximated,
            "replication lag is measured by the health check itself, every health.period",
        ),
        "connect_timeout" => s(Approximated, "backend connects are bounded by health.timeout"),
        "num_init_children" => s(
            Approximated,
            "limits.max_connections: pgpool queues clients past it, dbproxy refuses them with 53300",
        ),
        "client_idle_limit" => s(Same, "limits.client_idle_timeout"),
        "authentication_timeout" => s(Same, "limits.startup_timeout"),
        "failover_command" if value.trim().is_empty() => s(
            Approximated,
            "empty: dbproxy promotes with pg_promote() itself (failover.default.method = sql)",
        ),
        "failover_command" => s(
            Approximated,
            "failover.default (exec): runs when the primary fails, with pgpool's placeholders; \
             pgpool also runs it when a standby fails, dbproxy then only stops reads to it",
        ),
        "follow_primary_command" if value.trim().is_empty() => s(
            Approximated,
            "empty: dbproxy re-points the other standbys itself (failover.follow)",
        ),
        "follow_primary_command" => s(
            Same,
            "failover.follow_command, run for every other standby after a failover",
        ),
        "failover_on_backend_error" if on(value) => s(
            Approximated,
            "a failed backend connection triggers a health check at once; failover follows only if it fails",
        ),
        "failover_on_backend_error" => s(Same, "failover follows failed health checks only"),
        "auto_failback" if on(value) => s(
            Different,
            "dbproxy re-attaches a node on its own only with failover.rejoin.automatic and a way to rejoin (method rewind, exec or ssh)",
        ),
        "auto_failback" | "auto_failback_interval" => s(Same, "no automatic failback"),
        "detach_false_primary" if on(value) => s(Same, "a false primary is fenced"),
        "detach_false_primary" => s(
            Approximated,
            "dbproxy always fences a node that claims to be primary without being elected",
        ),
        "search_primary_node_timeout" => s(
            Approximated,
            "without a primary, writes wait failover.session_wait, then fail",
        ),
        "pool_passwd" => s(Same, "users (from the file)"),
        "enable_pool_hba" if on(value) && beside.pool_hba => s(Same, "hba (from pool_hba.conf)"),
        "enable_pool_hba" if on(value) => s(
            Different,
            "there is no pool_hba.conf beside pgpool.conf: pgpool-II would refuse every client, \
             dbproxy asks every pool_passwd user for SCRAM-SHA-256 (md5 for md5 entries) from \
             anywhere; add the file or give [[hba]] rules",
        ),
        "enable_pool_hba" => s(
            Approximated,
            "off: pool_passwd users authenticate against dbproxy, the others against the primary \
             (auth.passthrough, trust/password/md5/SCRAM relayed); after a relayed md5 or SCRAM \
             login that client's queries all run on the primary (set auth.user for auth_query \
             to balance them)",
        ),
        "pcp_listen_addresses" | "pcp_port" if beside.pcp_conf => {
            s(Same, "pcp.listen, with pcp.conf beside pgpool.conf")
        }
        "pcp_listen_addresses" | "pcp_port" => s(
            Approximated,
            "no pcp.conf beside pgpool.conf: the PCP listener stays off (set pcp.users_file)",
        ),
        "use_watchdog" if on(value) => s(
            Different,
            "dbproxy has no watchdog or virtual IP: run one dbproxy, or several behind a load balancer",
        ),
        "memory_cache_enabled" if on(value) => s(
            Approximated,
            "dbproxy has no query cache: every read runs on a server",
        ),
        "memory_cache_enabled" => s(Same, "no query cache"),
        "ssl" if on(value) => s(
            Different,
            "TLS to the servers is tls.backend = prefer; client TLS needs tls.cert_file and \
             tls.key_file (ssl_cert/ssl_key are not imported)",
        ),
        "ssl" => s(
            Approximated,
            "no client TLS; dbproxy still asks the servers for TLS (tls.backend = prefer)",
        ),
        "ssl_ca_cert" => s(Same, "tls.backend_ca_file, for tls.backend = verify-full"),
        k if k.starts_with("recovery_") || k == "client_idle_limit_in_recovery" => s(
            Approximated,
            "pcp_recovery_node is not supported: rebuild nodes with failover.rejoin.command",
        ),
        k => match IGNORED.iter().find(|(p, _)| k.starts_with(p)) {
            Some((_, why)) => s(Ignored, why),
            None => s(
                Different,
                "not a pgpool-II 4.3 key dbproxy knows: check what it does before relying on dbproxy",
            ),
        },
    }
}

/// The report as `--check-config` prints it, one key per line, and whether it passes (no
/// `DIFFERENT` line).
pub fn report(reviews: &[Review]) -> (String, bool) {
    let mut text = String::from("# pgpool.conf key by key: line, key, what dbproxy does, how or why\n");
    let width = reviews.iter().map(|r| r.key.len()).max().unwrap_or(0);
    for r in reviews {
        text.push_str(&format!(
            "# {:>4}  {:width$}  {:<12}  {}\n",
            r.line,
            r.key,
            r.verdict.to_string(),
            r.why
        ));
    }
    let different = reviews.iter().filter(|r| r.verdict == Verdict::Different).count();
    if different > 0 {
        text.push_str(&format!(
            "# {different} key(s) would make dbproxy behave differently from pgpool-II without notice: \
             change them in pgpool.conf or give dbproxy the setting that replaces them\n"
        ));
    }
    (text, different == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(t: &[(&str, &str)]) -> BTreeMap<String, (usize, String)> {
        t.iter()
            .enumerate()
            .map(|(i, (k, v))| (k.to_string(), (i + 1, v.to_string())))
            .collect()
    }

    fn verdict(k: &str, v: &str) -> Verdict {
        review(&entries(&[(k, v)]), Beside::default())[0].verdict
    }

    #[test]
    fn verdicts_follow_values() {
        assert_eq!(verdict("backend_hostname0", "h"), Verdict::Same);
        assert_eq!(verdict("backend_weight1", "0.5"), Verdict::Approximated);
        assert_eq!(
            verdict("backend_flag0", "DISALLOW_TO_FAILOVER"),
            Verdict::Different
        );
        assert_eq!(verdict("backend_flag0", "ALLOW_TO_FAILOVER"), Verdict::Same);
        assert_eq!(verdict("auto_failback", "on"), Verdict::Different);
        assert_eq!(verdict("auto_failback", "off"), Verdict::Same);
        assert_eq!(verdict("enable_pool_hba", "on"), Verdict::Different);
        let hba = Beside {
            pool_hba: true,
            ..Beside::default()
        };
        assert_eq!(
            review(&entries(&[("enable_pool_hba", "on")]), hba)[0].verdict,
            Verdict::Same
        );
        assert_eq!(verdict("log_min_messages", "warning"), Verdict::Ignored);
        assert_eq!(verdict("max_pool", "4"), Verdict::Ignored);
        assert_eq!(verdict("use_watchdog", "on"), Verdict::Different);
        assert_eq!(verdict("use_watchdog", "off"), Verdict::Ignored);
        assert_eq!(verdict("health_check_period1", "3"), Verdict::Different);
        assert_eq!(verdict("database_redirect_preference_list", ""), Verdict::Ignored);
        assert_eq!(
            verdict("database_redirect_preference_list", "postgres:1"),
            Verdict::Different
        );
        assert_eq!(verdict("no_such_key", "1"), Verdict::Different);
        assert_eq!(verdict("pcp_port", "9898"), Verdict::Approximated);
    }

    #[test]
    fn the_report_fails_on_a_different_key() {
        let r = review(
            &entries(&[("port", "9999"), ("auto_failback", "on")]),
            Beside::default(),
        );
        let (text, ok) = report(&r);
        assert!(!ok);
        assert!(
            text.contains("auto_failback") && text.contains("DIFFERENT"),
            "{text}"
        );
        let (_, ok) = report(&r[..1]);
        assert!(ok);
    }
}
