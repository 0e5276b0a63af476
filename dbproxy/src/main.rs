//! The `dbproxy` binary: parses flags, loads the config and hands over to the library.

use anyhow::Context;
use clap::Parser;

/// PostgreSQL wire proxy with read/write splitting and failover (replaces pgpool-II).
#[derive(Debug, Parser)]
#[command(name = "dbproxy", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,
}

fn main() {
    let cli = Cli::parse();
    let loaded = cli
        .common
        .source("DBPROXY")
        .and_then(|s| s.load::<dbproxy::Config>())
        .map_err(anyhow::Error::from);
    if cli.common.check_config {
        std::process::exit(common::cli::report_check("dbproxy", &loaded));
    }
    common::telemetry::init(cli.common.log_format, "info");
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dbproxy: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(config) {
        eprintln!("dbproxy: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn serve(config: dbproxy::Config) -> anyhow::Result<()> {
    let signals = common::shutdown::install().context("installing signal handlers")?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    dbproxy::run(listener, config, signals.shutdown).await?;
    Ok(())
}
