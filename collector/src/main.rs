//! The `collector` binary: parses flags and hands over to the library.

use clap::Parser;

/// Samples host metrics from /proc and writes them through dbproxy.
#[derive(Debug, Parser)]
#[command(name = "collector", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,
}

fn main() {
    let cli = Cli::parse();
    let loaded = cli
        .common
        .source("COLLECTOR")
        .and_then(|s| s.load::<collector::Config>())
        .map_err(anyhow::Error::from);
    if cli.common.check_config {
        std::process::exit(common::cli::report_check("collector", &loaded));
    }
    common::telemetry::init(cli.common.log_format, "info");
    match loaded {
        Ok(_) => {
            eprintln!("collector: not built yet (see issue 6)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("collector: {e:#}");
            std::process::exit(2);
        }
    }
}
