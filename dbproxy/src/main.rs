//! The `dbproxy` binary: parses flags and hands over to the library.

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
    match loaded {
        Ok(_) => {
            eprintln!("dbproxy: not built yet (see issue 3)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("dbproxy: {e:#}");
            std::process::exit(2);
        }
    }
}
