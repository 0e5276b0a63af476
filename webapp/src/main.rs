//! The `webapp` binary: parses flags and hands over to the library.

use clap::Parser;

/// The web page: latest host metrics, serving instance and database node, live dashboard.
#[derive(Debug, Parser)]
#[command(name = "webapp", version, about)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,
}

fn main() {
    let cli = Cli::parse();
    let loaded = cli
        .common
        .source("WEBAPP")
        .and_then(|s| s.load::<webapp::Config>())
        .map_err(anyhow::Error::from);
    if cli.common.check_config {
        std::process::exit(common::cli::report_check("webapp", &loaded));
    }
    common::telemetry::init(cli.common.log_format, "info");
    match loaded {
        Ok(_) => {
            eprintln!("webapp: not built yet (see issue 6)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("webapp: {e:#}");
            std::process::exit(2);
        }
    }
}
