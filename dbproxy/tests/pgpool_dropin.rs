//! dbproxy started from a pgpool-II `pgpool.conf` as a process, against real PostgreSQL clusters:
//! the failover drill with scripts that read their arguments by position, as pgpool-II's sample
//! `failover.sh` and `follow_primary.sh` do, a `--set` that overrides the imported
//! `failover_command`, and pgpool-II itself started on the same files beside dbproxy, with the same
//! SHOW commands (psql) and `pcp_*` commands (Debian's binaries) run against both.

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
    /// Its own `state_dir` (the cluster record), removed on drop.
    _state: tempfile::TempDir,
}

impl Dbproxy {
    fn start(conf: &Path, sets: &[String]) -> Result<Dbproxy> {
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

    fn status(&self) -> Result<Value> {
        let (code, body) = support::admin_request(self.admin, "GET", "/status")?;
        anyhow::ensure!(code == 200, "status {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
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
fn shared_files(
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
fn side_by_side(conf: &Path, pcp_conf: &Path, pg_port: u16, db_port: u16) -> Result<(Pgpool, Dbproxy)> {
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

#[test]
fn show_commands_answer_as_pgpool_does() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let (pg_port, pg_pcp, db_port) = (
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
    );
    let (conf, pcp_conf) = shared_files(&c, dir.path(), pg_port, pg_pcp, "")?;
    let _both = side_by_side(&conf, &pcp_conf, pg_port, db_port)?;
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

/// Issue 20, item 1: `enable_pool_hba = off` and an empty pool_passwd in front of trust
/// backends. pgpool-II lets the backends authenticate; dbproxy relays the primary's exchange
/// (auth.passthrough, set by the import): `psql -U postgres` works through both.
#[test]
fn an_empty_pool_passwd_passes_logins_through_as_pgpool_does() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let (pg_port, pg_pcp, db_port) = (
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
    );
    let (conf, pcp_conf) = shared_files(&c, dir.path(), pg_port, pg_pcp, "")?;
    std::fs::write(dir.path().join("pool_passwd"), "")?;
    let _both = side_by_side(&conf, &pcp_conf, pg_port, db_port)?;
    for port in [pg_port, db_port] {
        assert!(logs_in(port, "postgres", "")?, "psql -U postgres on port {port}");
        assert_eq!(psql(port, "select current_user")?, "postgres");
        assert!(!logs_in(port, "nobody", "")?, "a role the server does not have");
    }
    Ok(())
}

/// Whether psql logs in as `user` with `password` on `port` and runs a statement.
fn logs_in(port: u16, user: &str, password: &str) -> Result<bool> {
    let out = support::pg_program("psql")?
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", user, "-d", "postgres", "-c", "select 1"])
        .env("PGPASSWORD", password)
        .output()?;
    Ok(out.status.success())
}

#[test]
fn pool_hba_conf_decides_as_in_pgpool() -> Result<()> {
    // The servers ask for passwords too: pgpool-II skips its md5 check when they trust the user.
    let c = PgCluster::builder().standbys(1).password("pw").start()?;
    let dir = tempdir()?;
    let (pg_port, pg_pcp, db_port) = (
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
    );
    let (conf, pcp_conf) = shared_files(
        &c,
        dir.path(),
        pg_port,
        pg_pcp,
        "enable_pool_hba = on\nhealth_check_password = 'pw'\nsr_check_password = 'pw'\n",
    )?;
    std::fs::write(
        dir.path().join("pool_passwd"),
        "postgres:TEXTpw\nalice:TEXTalice\n",
    )?;
    std::fs::write(
        dir.path().join("pool_hba.conf"),
        "# TYPE DATABASE USER ADDRESS METHOD\nlocal all all trust\n\
         host all postgres 127.0.0.1/32 md5\nhost all all 127.0.0.1 255.255.255.255 reject\n",
    )?;
    let _both = side_by_side(&conf, &pcp_conf, pg_port, db_port)?;
    for (user, password, allowed) in [
        ("postgres", "pw", true),
        ("postgres", "wrong", false),
        ("alice", "alice", false),
        ("nobody", "x", false),
    ] {
        assert_eq!(
            logs_in(pg_port, user, password)?,
            allowed,
            "pgpool-II, {user}/{password}"
        );
        assert_eq!(
            logs_in(db_port, user, password)?,
            allowed,
            "dbproxy, {user}/{password}"
        );
    }
    // The migration check takes enable_pool_hba = on as the same now.
    let out = Command::new(BIN)
        .arg("--pgpool-conf")
        .arg(&conf)
        .arg("--check-config")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("enable_pool_hba"))
        .unwrap_or_default();
    assert_eq!(line.split_whitespace().nth(3), Some("same"), "{stdout}");
    Ok(())
}

/// Runs `/usr/sbin/<cmd> <args> -h 127.0.0.1 -p <port> -U pcpadmin -w` with `passfile`;
/// returns (exit code, stdout, stderr).
fn pcp(cmd: &str, args: &[&str], port: u16, passfile: &Path) -> Result<(i32, String, String)> {
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
fn fields(line: &str, n: usize) -> Vec<String> {
    line.split(' ').take(n).map(str::to_string).collect()
}

#[test]
fn pcp_commands_answer_as_pgpool_does() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let (pg_port, pg_pcp, db_port, db_pcp) = (
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
    );
    let (conf, pcp_conf) = shared_files(&c, dir.path(), pg_port, pg_pcp, "")?;
    let passfile = dir.path().join("pcppass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{pg_pcp}:pcpadmin:secret\n127.0.0.1:{db_pcp}:pcpadmin:secret\n"),
    )?;
    let wrongpass = dir.path().join("wrongpass");
    std::fs::write(&wrongpass, "*:*:pcpadmin:wrong\n")?;
    for f in [&passfile, &wrongpass] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))?;
    }
    let pgpool = Pgpool::start(&conf, &pcp_conf, pg_port)?;
    // The same files; only the ports differ, both running at once.
    let proxy = Dbproxy::start(
        &conf,
        &[
            format!("listen=\"127.0.0.1:{db_port}\""),
            format!("pcp.listen=\"127.0.0.1:{db_pcp}\""),
        ],
    )?;
    let both = |cmd: &str, args: &[&str]| -> Result<[(i32, String, String); 2]> {
        Ok([
            pcp(cmd, args, pg_pcp, &passfile)?,
            pcp(cmd, args, db_pcp, &passfile)?,
        ])
    };
    let [a, b] = both("pcp_node_count", &[])?;
    assert_eq!((a.0, a.1.as_str()), (0, "2"), "{a:?}");
    assert_eq!((b.0, b.1.as_str()), (0, "2"), "{b:?}");
    // Node info: host, port, status, weight, status names and roles as pgpool gives them.
    for args in [&["-n", "0"][..], &["-n", "1"], &[]] {
        let [a, b] = both("pcp_node_info", args)?;
        assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
        let la: Vec<Vec<String>> = a.1.lines().map(|l| fields(l, 8)).collect();
        let lb: Vec<Vec<String>> = b.1.lines().map(|l| fields(l, 8)).collect();
        assert_eq!(la, lb, "pcp_node_info {args:?}:\n{}\n{}", a.1, b.1);
        for l in b.1.lines() {
            let time = l.rsplit(' ').next().unwrap_or("");
            assert_eq!(
                time.len(),
                8,
                "the last field is the time of the last change: {l}"
            );
        }
    }
    let [a, b] = both("pcp_node_info", &["-v", "-n", "1"])?;
    let titles = |s: &str| {
        s.lines()
            .map(|l| l.split(':').next().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(titles(&a.1), titles(&b.1));
    let [a, b] = both("pcp_health_check_stats", &["-n", "1"])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(fields(&a.1, 5), fields(&b.1, 5));
    assert_eq!(a.1.split(' ').count(), b.1.split(' ').count(), "{}\n{}", a.1, b.1);
    let [a, b] = both("pcp_health_check_stats", &["-v", "-n", "0"])?;
    assert_eq!(titles(&a.1), titles(&b.1));
    let [a, b] = both("pcp_proc_count", &[])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(b.1.trim(), proxy.pid().to_string());
    // Errors: the same message from both.
    let [a, b] = both("pcp_node_info", &["-n", "7"])?;
    assert!(a.2.starts_with("ERROR:  informing node info failed"), "{a:?}");
    assert!(b.2.starts_with("ERROR:  informing node info failed"), "{b:?}");
    let [a, b] = both("pcp_health_check_stats", &["-n", "9"])?;
    assert!(
        a.2.starts_with("ERROR:  informing health check stats info failed"),
        "{a:?}"
    );
    assert!(
        b.2.starts_with("ERROR:  informing health check stats info failed"),
        "{b:?}"
    );
    for port in [pg_pcp, db_pcp] {
        let (code, _, err) = pcp("pcp_node_count", &[], port, &wrongpass)?;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.starts_with("FATAL:  authentication failed for user \"pcpadmin\""),
            "{err}"
        );
    }
    // Detach a standby: down in both, and dbproxy routes reads to the primary only.
    let [a, b] = both("pcp_detach_node", &["-n", "1"])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    let status = |port| -> Result<String> {
        let (_, out, _) = pcp("pcp_node_info", &["-n", "1"], port, &passfile)?;
        Ok(fields(&out, 5).get(4).cloned().unwrap_or_default())
    };
    wait_for("node 1 detached in both", DEADLINE, || {
        Ok((status(pg_pcp)? == "down" && status(db_pcp)? == "down").then_some(()))
    })?;
    let p0 = c.node(0).port().to_string();
    for _ in 0..5 {
        assert_eq!(psql(db_port, "select inet_server_port()")?, p0);
    }
    // Detaching the primary is refused: it would fail over while the primary runs.
    let (_, _, err) = pcp("pcp_detach_node", &["-n", "0"], db_pcp, &passfile)?;
    assert!(
        err.starts_with("ERROR:  detaching the primary is not supported"),
        "{err}"
    );
    // Attach it again: dbproxy checks it streams from the primary, then routes to it.
    let [a, b] = both("pcp_attach_node", &["-n", "1"])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(status(db_pcp)?, "up");
    drop(pgpool);

    // pcp_promote_node -s: dbproxy switches over for real; the old primary is detached.
    let (code, out, err) = pcp("pcp_promote_node", &["-s", "-n", "1"], db_pcp, &passfile)?;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "f");
    let (_, out, _) = pcp("pcp_node_info", &["-n", "1"], db_pcp, &passfile)?;
    assert_eq!(fields(&out, 7)[6], "primary", "{out}");
    let (_, out, _) = pcp("pcp_node_info", &["-n", "0"], db_pcp, &passfile)?;
    assert_eq!(fields(&out, 7)[4], "down", "{out}");
    assert_eq!(
        psql(db_port, "select inet_server_port()")?,
        c.node(1).port().to_string()
    );
    let (_, _, err) = pcp("pcp_promote_node", &["-s", "-n", "1"], db_pcp, &passfile)?;
    assert!(err.contains("already primary"), "{err}");
    Ok(())
}

/// Bad input on the PCP port: each gets pgpool's FATAL error and the connection is closed.
#[test]
fn pcp_bad_input_gets_a_clean_error() -> Result<()> {
    use std::io::{Read, Write};
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let port = testkit::free_port()?;
    let conf = dir.path().join("pgpool.conf");
    std::fs::write(
        &conf,
        pgpool_conf(
            &c,
            &[false, false],
            &format!("pcp_listen_addresses = '127.0.0.1'\npcp_port = {port}\n"),
        ),
    )?;
    std::fs::write(
        dir.path().join("pcp.conf"),
        format!("pcpadmin:{}\n", dbproxy::pcp::protocol::password_md5("secret")),
    )?;
    let _proxy = Dbproxy::start(&conf, &[])?;
    let exchange = |bytes: &[u8]| -> Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(bytes)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?; // the server closes: read_to_end ends
        Ok(out)
    };
    let fatal = |out: &[u8], what: &str| {
        let text = String::from_utf8_lossy(out);
        assert_eq!(out.first(), Some(&b'E'), "{text}");
        assert!(text.contains("SFATAL") && text.contains(what), "{text}");
    };
    // A command before logging in.
    fatal(
        &exchange(b"L\0\0\0\x04")?,
        "authentication failed for new PCP connection",
    );
    // A length that is too large, and one that is too small.
    fatal(&exchange(b"I\0\x01\0\0")?, "invalid PCP packet length 65536");
    fatal(&exchange(b"I\0\0\0\x02")?, "invalid PCP packet length 2");
    // A login without a salt first, and a malformed login.
    fatal(&exchange(b"R\0\0\0\x0apcp\0x\0")?, "authentication failed");
    let mut salted = b"M\0\0\0\x04".to_vec();
    salted.extend_from_slice(b"R\0\0\0\x08pcp\0");
    let out = exchange(&salted)?;
    assert_eq!(out[0], b'm', "the salt comes first");
    fatal(&out[9..], "no password hash");
    // A client that says nothing, or trickles a login, is not a problem for the next one, and
    // is closed once the login time is up.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port))?;
    slow.write_all(b"M\0")?;
    fatal(&exchange(b"L\0\0\0\x04")?, "authentication failed");
    let started = std::time::Instant::now();
    for s in [&mut idle, &mut slow] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        assert!(rest.is_empty(), "{rest:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(25),
        "closed after {waited:?}"
    );
    Ok(())
}
