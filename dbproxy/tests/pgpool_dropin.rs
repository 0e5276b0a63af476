//! dbproxy started from a pgpool-II `pgpool.conf` as a process, against real PostgreSQL clusters:
//! the failover drill with scripts that read their arguments by position, as pgpool-II's sample
//! `failover.sh` and `follow_primary.sh` do, and a `--set` that overrides the imported
//! `failover_command`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::Value;
use testkit::{wait_for, PgCluster, DEADLINE};

const BIN: &str = env!("CARGO_BIN_EXE_dbproxy");

/// `runuser -u postgres -- ` when running as root (pg_ctl refuses root), else nothing.
fn as_postgres() -> &'static str {
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
fn pgpool_conf(cluster: &PgCluster, data_dirs: &[bool], extra: &str) -> String {
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
struct Dbproxy {
    child: Option<Child>,
    admin: std::net::SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Dbproxy {
    fn start(conf: &Path, sets: &[String]) -> Result<Dbproxy> {
        let port = testkit::free_port()?;
        let admin_port = testkit::free_port()?;
        let mut cmd = Command::new(BIN);
        cmd.arg("--pgpool-conf")
            .arg(conf)
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
        let proxy = Dbproxy {
            child: Some(child),
            admin: format!("127.0.0.1:{admin_port}").parse()?,
            logs,
        };
        wait_for("dbproxy's admin listener", DEADLINE, || {
            Ok(proxy.status().ok().filter(|s| !s["primary"].is_null()))
        })
        .with_context(|| proxy.logs())?;
        Ok(proxy)
    }

    fn status(&self) -> Result<Value> {
        let (code, body) = support::admin_request(self.admin, "GET", "/status")?;
        anyhow::ensure!(code == 200, "status {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    /// Waits for the first failover event and returns it.
    fn failover_event(&self) -> Result<Value> {
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
fn path_with_pg() -> Result<String> {
    Ok(format!(
        "{}:{}",
        testkit::pg_bindir()?.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

/// Writes an executable script and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// The arguments each run of a script logged, one run per line, `|`-separated.
fn runs(log: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect()
}

/// A world-writable temp dir (the scripts run as root, pg_ctl as postgres).
fn tempdir() -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

#[test]
fn pgpool_failover_and_follow_scripts_get_their_arguments_by_position() -> Result<()> {
    let c = PgCluster::builder().standbys(2).start()?;
    c.primary().psql("create table t (id int)")?;
    c.wait_replicated()?;
    let dir = tempdir()?;
    let flog = dir.path().join("failover.log");
    let folog = dir.path().join("follow.log");
    // As pgpool-II's sample failover.sh: positional arguments, promote the new main node
    // with pg_ctl on its data directory (${10}); a standby's failure needs nothing.
    let failover = script(
        dir.path(),
        "failover.sh",
        &format!(
            "#!/bin/sh\nset -e\nprintf '%s|' \"$#\" \"$@\" >> {log}; echo >> {log}\n\
             FAILED_NODE_ID=\"$1\"\nFAILED_NODE_PGDATA=\"$4\"\nNEW_MAIN_NODE_ID=\"$5\"\n\
             OLD_PRIMARY_NODE_ID=\"$8\"\nNEW_MAIN_NODE_PGDATA=\"${{10}}\"\n\
             [ \"$FAILED_NODE_ID\" = \"$OLD_PRIMARY_NODE_ID\" ] || exit 0\n\
             test -f \"$FAILED_NODE_PGDATA/PG_VERSION\"\n\
             {pg}pg_ctl -D \"$NEW_MAIN_NODE_PGDATA\" -w promote\n",
            log = flog.display(),
            pg = as_postgres(),
        ),
    )?;
    // As pgpool-II's sample follow_primary.sh, but re-pointing with ALTER SYSTEM instead of
    // pg_rewind: $1..$4 the standby, $7/$9 the new primary's host and port.
    let follow = script(
        dir.path(),
        "follow_primary.sh",
        &format!(
            "#!/bin/sh\nset -e\nprintf '%s|' \"$#\" \"$@\" >> {log}; echo >> {log}\n\
             NODE_HOST=\"$2\"\nNODE_PORT=\"$3\"\nNEW_PRIMARY_NODE_HOST=\"$6\"\nNEW_PRIMARY_NODE_PORT=\"$9\"\n\
             psql -X -h \"$NODE_HOST\" -p \"$NODE_PORT\" -U postgres -d postgres -c \
             \"alter system set primary_conninfo = 'host=$NEW_PRIMARY_NODE_HOST port=$NEW_PRIMARY_NODE_PORT user=postgres application_name=node$1'\" \
             -c 'select pg_reload_conf()'\n",
            log = folog.display(),
        ),
    )?;
    // Node 2 has no backend_data_directory2: its %D is empty, as in pgpool, and stays an argument.
    let conf = dir.path().join("pgpool.conf");
    std::fs::write(
        &conf,
        pgpool_conf(
            &c,
            &[true, true, false],
            &format!(
                "failover_command = '{} %d %h %p %D %m %H %M %P %r %R %N %S'\n\
                 follow_primary_command = '{} %d %h %p %D %m %H %M %P %r %R'\n",
                failover.display(),
                follow.display()
            ),
        ),
    )?;
    // Node 1 is the candidate: both standbys are level, and node 1 comes first.
    let proxy = Dbproxy::start(&conf, &[])?;
    c.node(0).kill9()?;
    let ev = proxy.failover_event()?;
    assert!(ev["error"].is_null(), "{ev}\n{}", proxy.logs());
    assert_eq!(ev["promoted"], c.node(1).name(), "{ev}");
    let p = |i: usize| c.node(i).port().to_string();
    let d = |i: usize| c.node(i).data_dir().display().to_string();
    let f = runs(&flog);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        f[0][..13],
        [
            "12",
            "0",
            "127.0.0.1",
            &p(0),
            &d(0),
            "1",
            "127.0.0.1",
            "0",
            "0",
            &p(1),
            &d(1),
            "127.0.0.1",
            &p(0)
        ]
    );
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "f");
    // The follow command ran for node 2 (with an empty %D), and it streams from node 1 now.
    let fo = runs(&folog);
    assert_eq!(fo.len(), 1, "{fo:?}");
    assert_eq!(
        fo[0][..11],
        [
            "10",
            "2",
            "127.0.0.1",
            &p(2),
            "",
            "1",
            "127.0.0.1",
            "0",
            "0",
            &p(1),
            &d(1)
        ]
    );
    assert_eq!(ev["followers"][0]["node"], c.node(2).name(), "{ev}");
    assert_eq!(ev["followers"][0]["ok"], true, "{ev}");
    c.node(1).psql("insert into t values (1)")?;
    let lsn = c.node(1).current_lsn()?;
    c.node(2).wait_replayed(&lsn)?;
    assert_eq!(c.node(2).psql("select count(*) from t")?, "1");
    Ok(())
}

#[test]
fn a_set_flag_overrides_the_imported_failover_command() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let log = dir.path().join("failover.log");
    let failover = script(
        dir.path(),
        "failover.sh",
        &format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", log.display()),
    )?;
    let conf = dir.path().join("pgpool.conf");
    std::fs::write(
        &conf,
        pgpool_conf(
            &c,
            &[true, true],
            &format!("failover_command = '{} %d %D'\n", failover.display()),
        ),
    )?;
    // The advice dbproxy prints about the imported command is the flag used here.
    let out = Command::new(BIN)
        .arg("--pgpool-conf")
        .arg(&conf)
        .arg("--check-config")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let flag = "failover.default.method=\"sql\"";
    assert!(stderr.contains(flag), "{stderr}");
    let proxy = Dbproxy::start(&conf, &[flag.to_string()])?;
    c.node(0).kill9()?;
    let ev = proxy.failover_event()?;
    assert!(ev["error"].is_null(), "{ev}\n{}", proxy.logs());
    assert_eq!(ev["promoted"], c.node(1).name(), "{ev}");
    assert!(
        !log.exists(),
        "the failover_command must not run: {:?}",
        std::fs::read_to_string(&log)
    );
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "f");
    Ok(())
}

/// pgpool-II itself, started on the same pgpool.conf and pcp.conf; stopped (fast) on drop.
struct Pgpool {
    child: Child,
}

impl Pgpool {
    fn start(conf: &Path, pcp_conf: &Path, port: u16) -> Result<Pgpool> {
        let log = std::fs::File::create(conf.with_file_name("pgpool.log"))?;
        let child = Command::new("/usr/sbin/pgpool")
            .arg("-n")
            .arg("-f")
            .arg(conf)
            .arg("-F")
            .arg(pcp_conf)
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
fn psql_args(port: u16, sql: &str, header: bool) -> Result<String> {
    let mut cmd = support::pg_program("psql")?;
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

fn psql(port: u16, sql: &str) -> Result<String> {
    psql_args(port, sql, false)
}

/// A pgpool.conf, pool_passwd and pcp.conf for `c` in `dir`, shared by pgpool-II (on `pg_port`
/// and `pg_pcp`) and dbproxy (whose ports come from `--set`).
fn shared_files(c: &PgCluster, dir: &Path, pg_port: u16, pg_pcp: u16) -> Result<(PathBuf, PathBuf)> {
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
                 failover_on_backend_error = off\n"
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

#[test]
fn show_commands_answer_as_pgpool_does() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let (pg_port, pg_pcp, db_port) = (
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
    );
    let (conf, pcp_conf) = shared_files(&c, dir.path(), pg_port, pg_pcp)?;
    let _pgpool = Pgpool::start(&conf, &pcp_conf, pg_port)?;
    let _proxy = Dbproxy::start(&conf, &[format!("listen=\"127.0.0.1:{db_port}\"")])?;
    // The same columns and rows, through psql.
    for sql in [
        "show pool_nodes",
        "show pool_version",
        "SHOW POOL_HEALTH_CHECK_STATS;",
        "show pool_backend_stats",
    ] {
        let a = psql_args(pg_port, sql, true)?;
        let b = psql_args(db_port, sql, true)?;
        let header = |s: &str| s.lines().next().unwrap_or("").to_string();
        assert_eq!(header(&a), header(&b), "{sql}");
        // pgpool-II 4.3 answers SHOW POOL_VERSION with an empty result before the real one.
        let rows = |s: &str| s.lines().filter(|l| *l != header(s)).count();
        assert_eq!(rows(&a), rows(&b), "{sql}:\n{a}\n{b}");
    }
    assert!(psql(db_port, "show pool_version")?.starts_with("dbproxy "));
    let rows = |sql: &str| -> Result<Vec<Vec<String>>> {
        Ok(psql(db_port, sql)?
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect())
    };
    let p0 = c.node(0).port().to_string();
    let hc = rows("show pool_health_check_stats")?;
    assert_eq!(hc[0][..5], ["0", "127.0.0.1", p0.as_str(), "up", "primary"]);
    assert_eq!(hc[1][4], "standby");
    let total: u64 = hc[0][6].parse()?;
    assert!(total >= 1, "checks are counted: {hc:?}");
    assert_eq!(hc[0][6], hc[0][7], "all passed: {hc:?}");
    assert!(!hc[0][16].is_empty() && hc[0][19].is_empty(), "{hc:?}");
    // A stopped standby's failed checks show up.
    c.node(1).stop()?;
    wait_for("node 1's checks to fail", DEADLINE, || {
        let hc = rows("show pool_health_check_stats")?;
        Ok((hc[1][8] != "0" && hc[1][3] == "down" && !hc[1][19].is_empty()).then_some(()))
    })?;
    // Statements routed to each node count as select_cnt, as in SHOW POOL_NODES.
    let before: u64 = rows("show pool_backend_stats")?[0][5].parse()?;
    psql(db_port, "select 1")?;
    let after: u64 = rows("show pool_backend_stats")?[0][5].parse()?;
    assert!(after > before, "{before} -> {after}");
    Ok(())
}
