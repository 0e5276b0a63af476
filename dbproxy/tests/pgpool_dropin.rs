//! dbproxy started from a pgpool-II `pgpool.conf` as a process, against real PostgreSQL clusters:
//! the failover drill with scripts that read their arguments by position, as pgpool-II's sample
//! `failover.sh` and `follow_primary.sh` do, a `--set` that overrides the imported
//! `failover_command`, and pgpool-II itself started on the same files beside dbproxy, with the same
//! SHOW commands and logins (psql) run against both (`pgpool_pcp.rs`: the `pcp_*` commands;
//! `pgpool/`: the shared helpers).

mod pgpool;
mod support;

use std::process::Command;

use anyhow::Result;
use pgpool::*;
use testkit::{wait_for, PgCluster, DEADLINE};

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
