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
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("db-primary") && stdout.contains("db-replica"),
        "{stdout}"
    );
    assert!(stdout.contains("9999"), "{stdout}");
    assert!(
        stderr.contains("ignored"),
        "the ignored keys are listed: {stderr}"
    );
    assert!(
        !stdout.contains("app-secret"),
        "passwords are not printed: {stdout}"
    );

    let out = Command::new(BIN)
        .args(["--pgpool-conf", "/nonexistent/pgpool.conf"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
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
