//! The real `collector` binary: `--print --once`, flag and config errors, and SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_collector");

fn collector() -> Command {
    let mut c = Command::new(BIN);
    // The tests' environment must not leak config into the binary under test.
    for (k, _) in std::env::vars() {
        if k.starts_with("COLLECTOR_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// Runs a command to completion, killing it if it outlives `limit`.
fn output(mut cmd: Command, limit: Duration) -> Result<std::process::Output> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning collector")?;
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            anyhow::bail!("collector did not finish within {limit:?}")
        }
    }
}

#[test]
fn print_once_prints_one_valid_json_sample() -> Result<()> {
    let mut cmd = collector();
    cmd.args(["--print", "--once", "0.1"]);
    let out = output(cmd, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}: {stderr}", out.status);
    let stdout = String::from_utf8(out.stdout)?;
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let s: schema::Sample = serde_json::from_str(stdout.trim())?;
    let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    assert_eq!(s.host, hostname.trim());
    assert!(s.mem_total_bytes > 0 && s.mem_used_bytes <= s.mem_total_bytes);
    assert!(s.process_count > 0);
    assert!(s.uptime_seconds > 0.0);
    assert!(
        s.cpu_percent.is_some_and(|c| (0.0..=100.0).contains(&c)),
        "{stdout}"
    );
    assert!(s.disks.iter().any(|d| d.mount == "/"), "{stdout}");
    assert!(s.net.iter().any(|n| n.iface == "lo"), "{stdout}");
    assert!(
        v["sampled_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn bad_flags_and_config_are_clear_errors() -> Result<()> {
    for (args, env, want) in [
        (
            vec!["--print", "--once", "--interval", "soon"],
            None,
            "invalid value for `interval`",
        ),
        (
            vec!["--print", "--once", "0"],
            None,
            "`interval`: must be at least 1ms",
        ),
        (
            vec!["--print", "--once"],
            Some(("COLLECTOR_INTERVAL", "-3")),
            "`interval`",
        ),
        (
            vec!["--once", "--database-url", "port=notaport"],
            None,
            "`database_url`",
        ),
        (vec!["--print", "--once", "--set", "colour=blue"], None, "colour"),
        // An admin listener off loopback without a token: refused before anything starts.
        (
            vec!["--once", "--set", "admin_listen=0.0.0.0:0"],
            None,
            "`admin_listen`: `0.0.0.0:0` is reachable from other hosts and admin_token is empty",
        ),
    ] {
        let mut cmd = collector();
        cmd.args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = output(cmd, Duration::from_secs(30))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A spool file that cannot be created stops the collector at once, saying where.
    let mut cmd = collector();
    cmd.args(["--once", "--set", "spool_file=\"/nonexistent-dir/spool.jsonl\""]);
    let out = output(cmd, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spool file /nonexistent-dir/spool.jsonl"),
        "{stderr}"
    );

    // With a token, or said to be on purpose, the same listener is accepted.
    for extra in ["admin_token=s3cret", "admin_allow_open=true"] {
        let mut cmd = collector();
        cmd.args([
            "--check-config",
            "--set",
            "admin_listen=0.0.0.0:0",
            "--set",
            extra,
        ]);
        let out = output(cmd, Duration::from_secs(30))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{extra}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
    }

    // Both an interval flag and a positional interval: refused by the parser.
    let mut cmd = collector();
    cmd.args(["--print", "--interval", "1", "2"]);
    let out = output(cmd, Duration::from_secs(30))?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[test]
fn the_example_config_is_valid_and_equals_the_defaults() -> Result<()> {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/collector.example.toml");
    let mut cmd = collector();
    cmd.args(["--check-config", "--config", example]);
    let out = output(cmd, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let printed: toml::Table = toml::from_str(std::str::from_utf8(&out.stdout)?)?;
    let parsed: collector::Config = common::config::from_table(printed)?;
    assert_eq!(parsed, collector::Config::default());
    Ok(())
}

#[test]
fn unreadable_proc_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("sys/kernel"))?;
    std::fs::write(dir.path().join("sys/kernel/hostname"), "fakehost\n")?;
    std::fs::write(dir.path().join("stat"), "cpu 1 2 3 4 5 6 7 8\n")?;
    std::fs::write(dir.path().join("loadavg"), "garbage\n")?;
    let mut cmd = collector();
    cmd.args(["--print", "--once", "0.01", "--set"])
        .arg(format!("proc_root=\"{}\"", dir.path().display()));
    let out = output(cmd, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot parse loadavg: `garbage` is not a load average"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_exits_zero() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let mut cmd = collector();
    cmd.args([
        "--interval",
        "200ms",
        "--database-url",
        &cluster.primary().conn_string(),
    ])
    .args(["--set", "host=sigterm-host", "--set"])
    .arg(format!("spool_file=\"{}\"", spool.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let cl = cluster.clone();
    wait_for("samples from the binary", move || {
        Ok((count(cl.primary(), "sigterm-host")? >= 3).then_some(()))
    })
    .await?;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
    let status = tokio::task::spawn_blocking(move || {
        testkit::wait_for("collector to exit", Duration::from_secs(30), || {
            Ok(child.try_wait()?)
        })
    })
    .await??;
    assert_eq!(status.code(), Some(0));
    let rows = rows(cluster.primary(), "sigterm-host")?;
    assert_in_order_once(&rows);
    assert_eq!(
        std::fs::metadata(&spool)?.len(),
        0,
        "everything was written before exit"
    );

    // With the database gone, `--once` keeps its sample in the spool file and says so.
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().stop()).await??;
    let mut cmd = collector();
    cmd.args([
        "--once",
        "0.01",
        "--database-url",
        &cluster.primary().conn_string(),
    ])
    .args([
        "--set",
        "host=sigterm-host",
        "--set",
        "connect_timeout=\"1s\"",
        "--set",
    ])
    .arg(format!("spool_file=\"{}\"", spool.display()));
    let out = tokio::task::spawn_blocking(move || output(cmd, Duration::from_secs(60))).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 sample(s) could not be written and remain in the spool file"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&spool)?.lines().count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_interval_and_survives_a_bad_file() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("collector.toml");
    let log = dir.path().join("collector.log");
    let base = format!(
        "database_url = \"{}\"\nhost = \"hup-host\"\nspool_file = \"{}\"\n",
        cluster.primary().conn_string(),
        dir.path().join("spool.jsonl").display()
    );
    // An hour between samples: only the first (taken after a one-second warm-up) arrives unless
    // the reload works.
    std::fs::write(&conf, format!("{base}interval = \"1h\"\n"))?;
    let mut child = collector()
        .arg("--config")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    let cl = cluster.clone();
    wait_for("the first sample", move || {
        Ok((count(cl.primary(), "hup-host")? >= 1).then_some(()))
    })
    .await?;

    // A broken file is refused; the process keeps running with what it had.
    std::fs::write(&conf, format!("{base}interval = \"soon\"\n"))?;
    kill(pid, Signal::SIGHUP)?;
    let l = log.clone();
    wait_for("the reload error in the log", move || {
        Ok(std::fs::read_to_string(&l)?
            .contains("reload failed")
            .then_some(()))
    })
    .await?;
    assert!(
        child.try_wait()?.is_none(),
        "a bad reload must not stop the collector"
    );
    assert!(std::fs::read_to_string(&log)?.contains("`interval`"));

    std::fs::write(&conf, format!("{base}interval = \"200ms\"\n"))?;
    kill(pid, Signal::SIGHUP)?;
    let cl = cluster.clone();
    wait_for("samples at the new interval", move || {
        Ok((count(cl.primary(), "hup-host")? >= 4).then_some(()))
    })
    .await?;

    kill(pid, Signal::SIGTERM)?;
    let status = tokio::task::spawn_blocking(move || {
        testkit::wait_for("collector to exit", Duration::from_secs(30), || {
            Ok(child.try_wait()?)
        })
    })
    .await??;
    assert_eq!(status.code(), Some(0));
    assert_in_order_once(&rows(cluster.primary(), "hup-host")?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_collectors_started_at_once_migrate_exactly_once() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let mut children = Vec::new();
    for i in 0..4 {
        let log = dir.path().join(format!("c{i}.log"));
        let child = collector()
            .args([
                "--once",
                "0.05",
                "--database-url",
                &cluster.primary().conn_string(),
            ])
            .args(["--set", &format!("host=\"starter-{i}\""), "--set"])
            .arg(format!(
                "spool_file=\"{}\"",
                dir.path().join(format!("s{i}.jsonl")).display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        children.push((child, log));
    }
    let mut applied = 0;
    for (mut child, log) in children {
        let status = tokio::task::spawn_blocking(move || {
            testkit::wait_for("collector --once to exit", Duration::from_secs(60), || {
                Ok(child.try_wait()?)
            })
        })
        .await??;
        let text = std::fs::read_to_string(&log)?;
        assert_eq!(status.code(), Some(0), "{text}");
        if text.contains("applied schema migrations") {
            applied += 1;
        }
    }
    assert_eq!(applied, 1, "exactly one of the four applies the migrations");
    let p = cluster.primary();
    assert_eq!(
        p.psql("select count(*) from schema_migrations")?,
        schema::MIGRATIONS.len().to_string()
    );
    assert_eq!(p.psql("select count(distinct host) from samples")?, "4");
    Ok(())
}
