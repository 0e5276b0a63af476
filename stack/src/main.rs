//! The `stack` binary: `up`, `down`, `status` and `kill` for the local topology.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use stack::procs::State;

/// The whole ha-stack topology (PostgreSQL primary + standbys, dbproxy, two webapps, lb, collector)
/// as local processes on loopback.
#[derive(Debug, Parser)]
#[command(name = "stack", version, about)]
struct Cli {
    /// Where data, configs, logs and pid files live.
    #[arg(long, global = true, default_value = "state", env = "STACK_STATE_DIR")]
    state_dir: PathBuf,
    /// Added to every default port (lb 8080, dbproxy 9999, ...), to run beside another topology.
    #[arg(long, global = true, default_value_t = 0, env = "STACK_PORT_OFFSET")]
    port_offset: u16,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create (once) and start everything; Ctrl-C stops it all.
    Up {
        /// Standbys besides the primary.
        #[arg(long, default_value_t = 1)]
        standbys: usize,
        /// Return once everything is up, leaving it running (`stack down` stops it).
        #[arg(long)]
        detach: bool,
        /// The collector's sampling interval (the collector's own default is 60s).
        #[arg(long, default_value = "10s")]
        interval: String,
        /// Directory holding the lb, dbproxy, webapp and collector binaries (default: next to stack).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// dbproxy instances: 2 adds a second one (next ports) and an etcd coordinating them.
        #[arg(long, default_value_t = 1)]
        proxies: usize,
    },
    /// Stop everything that `up` started.
    Down,
    /// Show what is running.
    Status,
    /// Kill one process with SIGKILL, for failover drills (e.g. `pg0`, `web1`, `dbproxy`, `dbproxy2`).
    Kill {
        /// The service: pg0, pg1, ..., dbproxy (dbproxy2, etcd with --proxies 2), web1, web2, lb, collector.
        name: String,
        /// Freeze it with SIGSTOP instead (a hang, not a crash); `--cont` thaws it.
        #[arg(long, conflicts_with = "cont")]
        stop: bool,
        /// Thaw a process frozen with `--stop`.
        #[arg(long)]
        cont: bool,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    common::telemetry::init(common::telemetry::LogFormat::Text, "warn");
    if let Err(e) = run(cli).await {
        eprintln!("stack: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up {
            standbys,
            detach,
            interval,
            bin_dir,
            proxies,
        } => {
            let signals = common::shutdown::install()?;
            let opts = stack::UpOptions {
                state_dir: cli.state_dir,
                standbys,
                ports: stack::Ports::offset(cli.port_offset)?,
                collector_interval: interval,
                bin_dir,
                proxies,
            };
            let state = match stack::up(&opts).await {
                Ok(s) => s,
                Err(e) => {
                    // Leave nothing half-started behind.
                    if let Ok(state) = State::new(&opts.state_dir) {
                        stack::down(&state);
                    }
                    return Err(e);
                }
            };
            let p = &opts.ports;
            println!(
                "\nha-stack is up.\n  page       http://127.0.0.1:{lb}/\n  dashboard  http://127.0.0.1:{lb}/dashboard   \
                 (operator password for the switchover: {pw})\n  \
                 database   psql postgres://app:app-secret@127.0.0.1:{db}/app   (SHOW POOL_NODES)\n  \
                 status     http://127.0.0.1:{dba}/status  http://127.0.0.1:{lba}/status\n\n\
                 Try next: `stack kill pg0` (the primary) and watch the dashboard fail over;\n          \
                 `stack kill web1` and reload the page: lb keeps serving.\n",
                lb = p.lb,
                db = p.dbproxy,
                dba = p.dbproxy_admin,
                lba = p.lb_admin,
                pw = state.root.join(stack::OPERATOR_PASSWORD_FILE).display()
            );
            if opts.proxies > 1 {
                println!(
                    "  dbproxy2   :{} (status http://127.0.0.1:{}/status), coordinated through etcd http://127.0.0.1:{}\n",
                    p.dbproxy + 1,
                    p.dbproxy_admin + 1,
                    p.etcd
                );
            }
            if detach {
                println!(
                    "running in the background; `stack down --state-dir {}` stops it",
                    state.root.display()
                );
                return Ok(());
            }
            // Claimed before saying so: a `stack down` from another shell as soon as the line
            // shows must find this process to stop.
            state.claim_supervisor()?;
            println!("Ctrl-C (or `stack down` from another shell) stops everything.");
            supervise(&state, signals.shutdown).await;
            stack::down(&state);
            state.release_supervisor();
            Ok(())
        }
        Cmd::Down => {
            let state = State::new(&cli.state_dir)?;
            let n = stack::down(&state);
            println!("{n} process(es) stopped");
            Ok(())
        }
        Cmd::Status => {
            let state = State::new(&cli.state_dir)?;
            for (name, pid) in stack::status(&state) {
                match pid {
                    Some(pid) => println!("{name:<10} running  pid {pid}"),
                    None => println!("{name:<10} stopped"),
                }
            }
            Ok(())
        }
        Cmd::Kill { name, stop, cont } => {
            let state = State::new(&cli.state_dir)?;
            let sig = if stop {
                Signal::SIGSTOP
            } else if cont {
                Signal::SIGCONT
            } else {
                Signal::SIGKILL
            };
            let pid = state.signal(&name, sig)?;
            println!("{name} (pid {pid}): sent {sig}");
            Ok(())
        }
    }
}

/// Reaps children and reports the ones that exit, until shutdown is asked for.
async fn supervise(state: &State, shutdown: common::Shutdown) {
    let mut running: Vec<String> = state.started();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        stack::procs::reap();
        running.retain(|name| {
            let alive = state.pid(name).is_some();
            if !alive {
                println!("{name} exited (see {})", state.log(name).display());
            }
            alive
        });
    }
}
