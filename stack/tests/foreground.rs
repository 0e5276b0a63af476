//! The `stack` binary as an operator runs it: `stack up` in the foreground in one shell, `stack
//! down` in another; the foreground `up` stops everything itself and exits, so its terminal
//! returns.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stack");

/// A port offset at which every port of the topology is free now.
fn free_offset() -> u16 {
    let mut offset = 20_000 + (std::process::id() % 2_000) as u16 * 10;
    loop {
        let p = stack::Ports::offset(offset).expect("offset in range");
        let ports = [
            p.lb,
            p.lb_admin,
            p.dbproxy,
            p.dbproxy_admin,
            p.webapp,
            p.webapp + 1,
            p.postgres,
            p.postgres + 1,
            p.collector_admin,
        ];
        if ports
            .iter()
            .all(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        {
            return offset;
        }
        offset = offset.wrapping_add(7) % 40_000 + 10_000;
    }
}

fn stack(state: &Path, offset: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--state-dir")
        .arg(state)
        .arg("--port-offset")
        .arg(offset.to_string())
        .args(args);
    cmd
}

/// Stops whatever is left when the test fails half-way.
struct Cleanup(std::path::PathBuf, Option<std::process::Child>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(state) = stack::procs::State::new(&self.0) {
            stack::down(&state);
        }
        if let Some(mut c) = self.1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn stack_down_from_another_shell_ends_a_foreground_stack_up() {
    let state = std::env::temp_dir().join(format!("stack-foreground-{}", std::process::id()));
    let offset = free_offset();
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    let mut up = stack(&state, offset, &["up", "--interval", "1s", "--bin-dir", &bin_dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let mut cleanup = Cleanup(state.clone(), Some(up));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Up and supervising (building the service binaries may take a while on first use).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("stops everything");
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(_) => panic!("stack up never came up: {seen:#?}"),
        }
    }

    let out = stack(&state, offset, &["down"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("stack up (pid"), "{said}");
    assert!(said.contains("7 process(es) stopped"), "{said}");

    // The foreground `stack up` has exited on its own, successfully.
    let up = cleanup.1.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "stack up still runs after stack down");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let out = stack(&state, offset, &["status"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!said.contains("running"), "{said}");
    // A second `down` finds nothing to stop.
    let out = stack(&state, offset, &["down"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 process(es) stopped"));
}
