//! A sample the collector has spooled is not lost when the process is killed (SIGKILL, no chance
//! to flush): the next run finds it in the spool file and writes it to the database.

mod support;

use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_collector");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_spooled_before_a_sigkill_reach_the_database_after_a_restart() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let host = "killed-host";
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().stop()).await??;

    // The real binary, with its database down: every sample goes to the spool file.
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("COLLECTOR_") {
            cmd.env_remove(k);
        }
    }
    cmd.args([
        "--interval",
        "100ms",
        "--database-url",
        &cluster.primary().conn_string(),
    ])
    .args(["--set", &format!("host={host}"), "--set"])
    .arg(format!("spool_file=\"{}\"", spool.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().context("spawning collector")?;
    let path = spool.clone();
    wait_for("five spooled samples", move || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        Ok((text.lines().count() >= 5).then_some(()))
    })
    .await?;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL)?;
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    assert_eq!(status.code(), None, "killed by a signal: {status:?}");

    // Every complete line in the file is a sample the killed process had taken.
    let text = std::fs::read_to_string(&spool)?;
    let spooled: Vec<schema::Sample> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(spooled.len() >= 5, "{text}");
    assert!(spooled.iter().all(|s| s.host == host));

    // The next run, with the database back, writes each of them exactly once, in order.
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().start()).await??;
    let next = spawn(config(cluster.primary(), &spool, "next-host"));
    let (cl, want) = (cluster.clone(), spooled.len() as u64);
    wait_for("the killed run's samples in the database", move || {
        Ok((count(cl.primary(), host)? >= want).then_some(()))
    })
    .await?;
    let next = next.stop().await?;
    assert!(next.recovered() >= want, "recovered {}", next.recovered());
    let rows = rows(cluster.primary(), host)?;
    assert_in_order_once(&rows);
    for s in &spooled {
        let micros = s.sampled_at.duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
        assert!(
            rows.iter().any(|r| r.1 == micros),
            "the sample taken at {micros} µs is missing: {rows:?}"
        );
    }
    Ok(())
}
