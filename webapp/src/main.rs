//! The `webapp` binary: parses flags and hands over to the library.

use anyhow::Context;
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
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("webapp: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(config) {
        eprintln!("webapp: {e:#}");
        std::process::exit(1);
    }
}

fn serve(config: webapp::Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let common::shutdown::Signals { shutdown, mut reload } =
            common::shutdown::install().context("installing signal handlers")?;
        tokio::spawn(async move {
            // Nothing of the webapp's configuration can change under a running pool; say so rather
            // than silently ignoring the signal.
            while reload.recv().await.is_some() {
                tracing::warn!(
                    "SIGHUP: the webapp does not reload its configuration; restart it to apply changes"
                );
            }
        });
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        webapp::run(listener, config, shutdown).await.context("serving")
    })
}
