//! The `lb` binary as a child process: stderr collected, signals sent, killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The binary under test.
pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// Kills the child if a test fails half-way.
pub struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Result<Proc> {
        let mut child = Command::new(LB)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn lb")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().context("stderr")?;
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Ok(Proc { child, stderr })
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if start.elapsed() > limit {
                bail!("lb did not exit within {limit:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
