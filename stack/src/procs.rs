//! Child processes of the stack: spawned in their own process groups (so a Ctrl-C reaches only the
//! launcher, which then stops them in order), logged to files, and remembered in pid files so that
//! `stack down`, `stack status` and `stack kill` work from another shell.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The state directory's layout.
#[derive(Debug, Clone)]
pub struct State {
    /// The root of it.
    pub root: PathBuf,
}

impl State {
    /// Uses (and creates) `root`.
    pub fn new(root: &Path) -> Result<State> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()?.join(root)
        };
        for d in ["run", "logs", "config"] {
            fs::create_dir_all(root.join(d))
                .with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        Ok(State { root })
    }

    /// Where service `name` logs.
    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    /// Where service `name`'s config goes.
    pub fn config(&self, file: &str) -> PathBuf {
        self.root.join("config").join(file)
    }

    fn pidfile(&self, name: &str) -> PathBuf {
        self.root.join("run").join(format!("{name}.pid"))
    }

    /// Services in the order they were started.
    pub fn started(&self) -> Vec<String> {
        fs::read_to_string(self.root.join("run").join("order"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The pid recorded for `name`, when its process is still alive; for a PostgreSQL node that
    /// dbproxy's automatic rejoin restarted (with `pg_ctl`), the postmaster of its data directory.
    pub fn pid(&self, name: &str) -> Option<i32> {
        let recorded = fs::read_to_string(self.pidfile(name))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&pid| alive(pid));
        recorded.or_else(|| self.postmaster_pid(name))
    }

    /// The live postmaster named by `pg/<name>/postmaster.pid`, if any.
    fn postmaster_pid(&self, name: &str) -> Option<i32> {
        let file = self.root.join("pg").join(name).join("postmaster.pid");
        let pid: i32 = fs::read_to_string(file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    fn record(&self, name: &str, pid: u32) -> Result<()> {
        fs::write(self.pidfile(name), format!("{pid}\n"))?;
        let mut order = self.started();
        order.retain(|n| n != name);
        order.push(name.to_string());
        fs::write(self.root.join("run").join("order"), order.join("\n") + "\n")?;
        Ok(())
    }

    fn forget(&self, name: &str) {
        let _ = fs::remove_file(self.pidfile(name));
        let order: Vec<String> = self.started().into_iter().filter(|n| n != name).collect();
        let _ = fs::write(self.root.join("run").join("order"), order.join("\n") + "\n");
    }

    /// Starts `cmd` as service `name`, output appended to its log, in a process group of its own.
    /// `account` runs it as another user (PostgreSQL as `postgres` when we are root).
    pub fn spawn(&self, name: &str, cmd: &mut Command, account: Option<(u32, u32)>) -> Result<u32> {
        if let Some(pid) = self.pid(name) {
            bail!("{name} is already running (pid {pid}); `stack down` first");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        if let Some((uid, gid)) = account {
            std::os::unix::process::CommandExt::uid(cmd, uid);
            std::os::unix::process::CommandExt::gid(cmd, gid);
        }
        // The child is reaped by `reap` while we supervise, or by init after a detached start.
        let pid = cmd.spawn().with_context(|| format!("starting {name}"))?.id();
        self.record(name, pid)?;
        Ok(pid)
    }

    /// Stops `name` with `signal`, then SIGKILL after `grace`. Returns whether it was running.
    pub fn stop(&self, name: &str, signal: Signal, grace: Duration) -> bool {
        let Some(pid) = self.pid(name) else {
            self.forget(name);
            return false;
        };
        let p = Pid::from_raw(pid);
        let _ = kill(p, Signal::SIGCONT);
        let _ = kill(p, signal);
        let deadline = Instant::now() + grace;
        while alive(pid) && Instant::now() < deadline {
            reap();
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            tracing::warn!(name, pid, "did not stop in time: killing");
            let _ = kill(p, Signal::SIGKILL);
            while alive(pid) && Instant::now() < deadline + Duration::from_secs(5) {
                reap();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.forget(name);
        true
    }

    /// Records this process as the foreground `stack up` supervising the services, so that
    /// `stack down` from another shell can end it.
    pub fn claim_supervisor(&self) -> Result<()> {
        fs::write(self.supervisor_file(), format!("{}\n", std::process::id()))
            .context("writing the supervisor's pid file")
    }

    /// Forgets the supervisor (it is exiting).
    pub fn release_supervisor(&self) {
        let _ = fs::remove_file(self.supervisor_file());
    }

    /// The foreground `stack up`'s pid, while it runs.
    pub fn supervisor(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.supervisor_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    /// Asks the supervisor `pid` to stop everything and exit (SIGTERM); waits up to `grace` for
    /// it to be gone. Returns whether it is.
    pub fn stop_supervisor(&self, pid: i32, grace: Duration) -> bool {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while alive(pid) && Instant::now() < deadline {
            reap();
            std::thread::sleep(Duration::from_millis(50));
        }
        !alive(pid)
    }

    fn supervisor_file(&self) -> PathBuf {
        self.root.join("run").join("supervisor.pid")
    }

    /// Sends `signal` to `name` without waiting (drills: `stack kill`).
    pub fn signal(&self, name: &str, signal: Signal) -> Result<i32> {
        let pid = self.pid(name).with_context(|| format!("{name} is not running"))?;
        kill(Pid::from_raw(pid), signal)?;
        Ok(pid)
    }
}

/// Collects exited children so they do not linger as zombies (and so `alive` sees them gone).
pub fn reap() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if matches!(status, WaitStatus::StillAlive) {
            break;
        }
    }
}

/// Alive and not a zombie (from /proc).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
