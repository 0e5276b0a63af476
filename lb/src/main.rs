//! The `lb` binary: parses flags, loads the config (optionally from an nginx config), and hands
//! over to the library; SIGHUP reloads, SIGINT/SIGTERM drain and exit.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// HTTP load balancer in front of the web replicas (replaces nginx upstream).
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,

    /// Read an nginx config (its `upstream`, `server` and `location` blocks) as the base layer;
    /// the TOML file, `LB_*` variables and `--set` still override it.
    #[arg(long, value_name = "PATH")]
    nginx_conf: Option<PathBuf>,
}

fn load(cli: &Cli) -> anyhow::Result<lb::Config> {
    let mut source = cli.common.source("LB")?;
    if let Some(path) = &cli.nginx_conf {
        let t = lb::nginx_conf::load(path)?;
        for w in &t.warnings {
            eprintln!("lb: {}: {w}", path.display());
        }
        source = source.base(t.table);
    }
    Ok(source.load::<lb::Config>()?)
}

fn main() {
    let cli = Cli::parse();
    let loaded = load(&cli);
    if cli.common.check_config {
        std::process::exit(common::cli::report_check("lb", &loaded));
    }
    common::telemetry::init(cli.common.log_format, "info");
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lb: {e:#}");
            std::process::exit(2);
        }
    };
    // The control runtime: signals, the accept loop, health checks, reloads and the admin
    // listener. Client connections run on the serving threads (`workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(cli, config)) {
        eprintln!("lb: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(cli: Cli, config: lb::Config) -> anyhow::Result<()> {
    let mut signals = common::shutdown::install().context("installing signal handlers")?;
    let mut listeners = Vec::new();
    for addr in config.listen_addrs() {
        listeners.push(
            tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        );
    }
    let admin = tokio::net::TcpListener::bind(&config.admin_listen)
        .await
        .with_context(|| format!("binding admin listener {}", config.admin_listen))?;
    let balancer = lb::Lb::new(config)?;
    let shutdown = signals.shutdown.clone();
    tokio::spawn(balancer.clone().serve_admin(admin, shutdown.clone()));
    let reloader = balancer.clone();
    tokio::spawn(async move {
        let cli = std::sync::Arc::new(cli);
        while signals.reload.recv().await.is_some() {
            let (cli, lb) = (cli.clone(), reloader.clone());
            // Loading resolves host names, which blocks.
            let r = tokio::task::spawn_blocking(move || load(&cli).and_then(|c| Ok(lb.reload(c)?))).await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the old config")
                }
                Err(e) => tracing::error!(error = %e, "reload task failed"),
            }
        }
    });
    balancer.serve_all(listeners, shutdown).await?;
    Ok(())
}
