//! Headless Chromium from Debian's `chromium` package, run as a child process with a deadline:
//! `--dump-dom` after the page's scripts ran, and screenshots kept under `target/artifacts/`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

pub fn artifacts_dir() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs chromium headless with `args`, killing it if it has not finished within 90 s.
pub fn chromium(args: &[String]) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .stdin(Stdio::null());
    let out_path = profile.path().join("stdout");
    let err_path = profile.path().join("stderr");
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let mut child = cmd
        .spawn()
        .context("cannot run `chromium`: install Debian's package (apt-get install -y chromium)")?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "chromium did not finish within 90 s; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    ensure!(
        status.success(),
        "chromium failed ({status}); stderr:\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    Ok(stdout)
}

pub async fn browse(args: Vec<String>) -> Result<String> {
    tokio::task::spawn_blocking(move || chromium(&args)).await?
}

pub async fn screenshot(url: String, path: PathBuf) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    browse(vec![
        format!("--screenshot={}", path.display()),
        "--window-size=1280,900".into(),
        url,
    ])
    .await?;
    let len = std::fs::metadata(&path)
        .with_context(|| format!("no screenshot at {}", path.display()))?
        .len();
    ensure!(
        len > 10_000,
        "screenshot {} is suspiciously small ({len} bytes)",
        path.display()
    );
    Ok(())
}
