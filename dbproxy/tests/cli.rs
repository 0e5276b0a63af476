//! The dbproxy binary as a process: `--pgpool-conf` takes the example pgpool.conf unchanged, and
//! a proxy started from a TOML file serves psql and exits 0 on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use testkit::{wait_for, PgCluster, DEADLINE};

const BIN: &str = env!("CARGO_BIN_EXE_dbproxy");

#[test]
fn pgpool_conf_is_taken_unchanged() -> Result<()> {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/examples");
    let out = Command::new(BIN)
        .arg("--pgpool-conf")
        .arg(examples.join("pgpool.conf"))
        .arg("--check-config")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The configuration is valid (dbproxy runs with it), but the migration check fails: with
    // enable_pool_hba = on and no pool_hba.conf, pgpool-II would refuse every client.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");
    assert!(
        stdout.contains("db-primary") && stdout.contains("db-replica"),
        "{stdout}"
    );
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(key))
            .unwrap_or_else(|| panic!("no report line for {key}: {stdout}"))
            .to_string()
    };
    assert!(line("enable_pool_hba").contains("DIFFERENT"), "{stdout}");
    assert!(line("max_pool").contains("ignored"), "{stdout}");
    assert!(line("backend_hostname0").contains("same"), "{stdout}");
    assert!(line("failover_command").contains("approximated"), "{stdout}");
    assert!(stdout.contains("9999"), "{stdout}");
    assert!(
        stdout.contains("ignored"),
        "the ignored keys are listed: {stdout}"
    );
    assert!(
        !stdout.contains("app-secret"),
        "passwords are not printed: {stdout}"
    );

    let out = Command::new(BIN)
        .args(["--pgpool-conf", "/nonexistent/pgpool.conf"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));

    // The admin listener (promote, attach) off loopback needs admin_token, or a stated purpose:
    // without either dbproxy refuses to start (2). With one, the check passes the listener and
    // exits 1 only for the example's `enable_pool_hba` (a DIFFERENT key, checked above).
    let conf = examples.join("pgpool.conf");
    let admin = "admin_listen=0.0.0.0:0";
    for (extra, code) in [
        (&["--set", admin][..], 2),
        (&["--check-config", "--set", admin][..], 2),
        (
            &["--check-config", "--set", admin, "--set", "admin_token=s3cret"][..],
            1,
        ),
        (
            &["--check-config", "--set", admin, "--set", "admin_allow_open=true"][..],
            1,
        ),
    ] {
        let out = Command::new(BIN)
            .arg("--pgpool-conf")
            .arg(&conf)
            .args(extra)
            .env_remove("DBPROXY_ADMIN_TOKEN")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {stderr}");
        if code == 2 {
            assert!(
                stderr.contains("admin_listen") && stderr.contains("admin_token is empty"),
                "{stderr}"
            );
        }
        assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
    }
    Ok(())
}

/// `--pgpool-conf FILE --check-config` reviews every key: 0 when dbproxy does the same or says
/// how it differs, 1 when a key would change behaviour silently, 2 when the file is invalid.
#[test]
fn the_migration_check_reviews_every_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("pgpool.conf");
    let base = "backend_clustering_mode = 'streaming_replication'\nport = 9999\n\
                backend_hostname0 = 'a'\nbackend_port0 = 5432\nbackend_flag0 = 'ALLOW_TO_FAILOVER'\n\
                backend_hostname1 = 'b'\nbackend_weight1 = 0.5\nload_balance_mode = on\n\
                num_init_children = 10\nlog_statement = on\nenable_pool_hba = off\n";
    let check = |text: &str| -> Result<(Option<i32>, String, String)> {
        std::fs::write(&conf, text)?;
        let out = Command::new(BIN)
            .arg("--pgpool-conf")
            .arg(&conf)
            .arg("--check-config")
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, stdout, stderr) = check(base)?;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let report: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("# ") && l.len() > 8)
        .collect();
    for (key, verdict) in [
        ("backend_clustering_mode", "same"),
        ("backend_weight1", "approximated"),
        ("num_init_children", "approximated"),
        ("log_statement", "ignored"),
        ("enable_pool_hba", "approximated"),
    ] {
        let l = report
            .iter()
            .find(|l| l.split_whitespace().nth(2) == Some(key))
            .unwrap_or_else(|| panic!("{key} is not in the report: {stdout}"));
        assert_eq!(l.split_whitespace().nth(3), Some(verdict), "{l}");
    }
    // A key that would change behaviour silently fails the check, naming it and its line.
    for (extra, key) in [
        ("backend_flag1 = 'DISALLOW_TO_FAILOVER'\n", "backend_flag1"),
        ("auto_failback = on\n", "auto_failback"),
        ("use_watchdog = on\n", "use_watchdog"),
        ("no_such_setting = 1\n", "no_such_setting"),
    ] {
        let (code, stdout, stderr) = check(&format!("{base}{extra}"))?;
        assert_eq!(code, Some(1), "{extra}: {stdout}\n{stderr}");
        let l = stdout
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(key))
            .unwrap_or_else(|| panic!("{key} is not in the report: {stdout}"));
        assert!(l.contains("DIFFERENT"), "{l}");
        assert_eq!(l.split_whitespace().nth(1), Some("12"), "the line number: {l}");
        assert!(stderr.contains("DIFFERENT"), "{stderr}");
    }
    // An invalid value is a configuration error (2), as before.
    let (code, _, stderr) = check(&format!("{base}load_balance_mode = maybe\n"))?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("load_balance_mode"), "{stderr}");
    Ok(())
}

#[test]
fn the_binary_serves_and_stops_on_sigterm() -> Result<()> {
    let cluster = PgCluster::builder().standbys(1).password("pw").start()?;
    let port = testkit::free_port()?;
    let admin = testkit::free_port()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("dbproxy.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nstate_dir = \"{state}\"\n\
             [[nodes]]\nport = {}\n[[nodes]]\nport = {}\n\
             [[users]]\nname = \"postgres\"\npassword_env = \"SECRET_FOR_DBPROXY\"\n\
             [health]\npassword = \"pw\"\nperiod = 0.2\n",
            cluster.primary().port(),
            cluster.standby(0).port(),
            state = dir.path().join("state").display()
        ),
    )?;
    // The variable must not start with DBPROXY_: those are config keys.
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&conf)
        .env("SECRET_FOR_DBPROXY", "pw")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut child = KillOnDrop(Some(child));
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = std::thread::spawn({
        let logs = logs.clone();
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                logs.lock().expect("logs").push(line);
            }
        }
    });
    let logged = |what: &str| logs.lock().expect("logs").iter().any(|l| l.contains(what));
    let psql = |sql: &str| -> Result<String> {
        let out = support::pg_program("psql")?
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", "pw")
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let got = wait_for("dbproxy to serve", DEADLINE, || {
        Ok(psql("select inet_server_port()").ok())
    })?;
    assert_eq!(got, cluster.standby(0).port().to_string());
    // SIGHUP reloads: a broken file is refused and the running configuration kept; a good one
    // applies to new connections (here: no more load balancing).
    let text = std::fs::read_to_string(&conf)?;
    std::fs::write(&conf, format!("{text}[routing]\nbogus = 1\n"))?;
    signal(child.0.as_ref().context("child")?.id(), "-HUP")?;
    wait_for("the broken file to be rejected", DEADLINE, || {
        Ok(logged("configuration rejected").then_some(()))
    })?;
    assert_eq!(psql("select 1")?, "1", "still serving with the old configuration");
    std::fs::write(&conf, format!("{text}[routing]\nload_balance = false\n"))?;
    signal(child.0.as_ref().context("child")?.id(), "-HUP")?;
    let primary = cluster.primary().port().to_string();
    wait_for("the reload to send reads to the primary", DEADLINE, || {
        Ok((psql("select inet_server_port()")? == primary).then_some(()))
    })?;

    // An idle client stays connected; shutdown ends it (57P01) instead of waiting for it.
    let mut idle = support::pg_program("psql")?
        .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .env("PGPASSWORD", "pw")
        .env("PGAPPNAME", "idle-client")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_for("the idle client to connect", DEADLINE, || {
        let n = cluster
            .primary()
            .psql("select count(*) from pg_stat_activity where application_name = 'idle-client'")?;
        Ok((n == "1").then_some(()))
    })?;
    let mut child = child.0.take().context("child")?;
    let stopping = std::time::Instant::now();
    signal(child.id(), "-TERM")?;
    let status = child.wait()?;
    assert!(
        stopping.elapsed() < dbproxy::server::DRAIN_DEADLINE,
        "idle sessions do not hold up shutdown ({:?})",
        stopping.elapsed()
    );
    let _ = idle.kill();
    let _ = idle.wait();
    assert!(status.success(), "exit status {status}");
    reader.join().expect("log reader");
    let logs = logs.lock().expect("logs").join("\n");
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(!logs.contains("pw\""), "no password in the logs: {logs}");
    Ok(())
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill failed");
    Ok(())
}

/// Kills the proxy if the test fails before stopping it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
