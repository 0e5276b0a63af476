//! The `lb` binary: parses flags and hands over to the library.

use clap::Parser;

/// HTTP load balancer in front of the web replicas (replaces nginx upstream).
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,
}

fn main() {
    let cli = Cli::parse();
    let loaded = cli
        .common
        .source("LB")
        .and_then(|s| s.load::<lb::Config>())
        .map_err(anyhow::Error::from);
    if cli.common.check_config {
        std::process::exit(common::cli::report_check("lb", &loaded));
    }
    common::telemetry::init(cli.common.log_format, "info");
    match loaded {
        Ok(_) => {
            eprintln!("lb: not built yet (see issue 5)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("lb: {e:#}");
            std::process::exit(2);
        }
    }
}
