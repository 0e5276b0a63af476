//! The `collector` binary: parses flags and hands over to the library.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// Samples host metrics from /proc and writes them through dbproxy.
#[derive(Debug, Parser)]
#[command(name = "collector", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,

    /// Time between samples, as in the old `coletor.sh [interval]` (seconds, or e.g. `200ms`).
    #[arg(value_name = "INTERVAL", conflicts_with = "interval")]
    interval_arg: Option<String>,

    /// Time between samples (seconds, or e.g. `200ms`); also COLLECTOR_INTERVAL. Default 60.
    #[arg(long, value_name = "DURATION")]
    interval: Option<String>,

    /// Take one sample, write it, and exit.
    #[arg(long)]
    once: bool,

    /// Print samples as JSON lines on stdout instead of writing them to the database.
    #[arg(long)]
    print: bool,

    /// Database connection string (libpq `key=value` or `postgres://` URL); dbproxy in production.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let loaded = load(&cli);
    if cli.common.check_config {
        std::process::exit(common::cli::report_check("collector", &loaded));
    }
    common::telemetry::init(cli.common.log_format, "info");
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("collector: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(cli, config) {
        eprintln!("collector: {e:#}");
        std::process::exit(1);
    }
}

/// The config layers (file, `COLLECTOR_*`, `--set`) with the interval and URL flags on top.
fn load(cli: &Cli) -> anyhow::Result<collector::Config> {
    let mut s = cli.common.source("COLLECTOR")?;
    if let Some(v) = cli.interval.as_ref().or(cli.interval_arg.as_ref()) {
        s = s.set("interval", v.as_str());
    }
    if let Some(url) = &cli.database_url {
        // Quoted, so that a URL or `key=value` text is always taken as a string.
        s = s.set(
            "database_url",
            format!("\"{}\"", url.replace('\\', "\\\\").replace('"', "\\\"")),
        );
    }
    Ok(s.load::<collector::Config>()?)
}

#[tokio::main]
async fn serve(cli: Cli, config: collector::Config) -> anyhow::Result<()> {
    let signals = common::shutdown::install().context("installing signal handlers")?;
    let admin = match &config.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin_listen {addr}"))?,
        ),
        None => None,
    };
    let mode = collector::Mode {
        once: cli.once,
        print: cli.print,
    };
    let (tx, updates) = tokio::sync::watch::channel(config);
    let mut reload = signals.reload;
    tokio::spawn(async move {
        while reload.recv().await.is_some() {
            match load(&cli) {
                Ok(c) => {
                    tracing::info!("configuration reloaded");
                    let _ = tx.send(c);
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the running configuration")
                }
            }
        }
    });
    collector::run_with_reload(
        admin,
        updates,
        mode,
        Arc::new(collector::Stats::default()),
        signals.shutdown,
    )
    .await
    .context("collector stopped")
}
