//! The `dbproxy` binary: parses flags, loads the config (optionally translated from an existing
//! pgpool.conf) and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// PostgreSQL wire proxy with read/write splitting and failover (replaces pgpool-II).
#[derive(Debug, Parser)]
#[command(name = "dbproxy", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,

    /// An existing pgpool-II pgpool.conf (and the pool_passwd it names) to take nodes, users,
    /// health checks and routing from; the TOML file, environment and --set override its keys.
    #[arg(long, value_name = "PATH", env = "DBPROXY_PGPOOL_CONF")]
    pgpool_conf: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let import = match cli
        .pgpool_conf
        .as_deref()
        .map(dbproxy::pgpool_conf::load)
        .transpose()
    {
        Ok(i) => i,
        Err(e) => {
            eprintln!("dbproxy: {e}");
            std::process::exit(2);
        }
    };
    let loaded = cli
        .common
        .source("DBPROXY")
        .map(|s| match &import {
            Some(i) => s.base(i.table.clone()),
            None => s,
        })
        .and_then(|s| s.load::<dbproxy::Config>())
        .map_err(anyhow::Error::from);
    if let Some(i) = &import {
        // Said on stderr so an operator moving from pgpool sees what was not carried over.
        for key in &i.ignored {
            eprintln!("dbproxy: pgpool.conf: ignored: {key}");
        }
        for note in &i.notes {
            eprintln!("dbproxy: pgpool.conf: {note}");
        }
    }
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
