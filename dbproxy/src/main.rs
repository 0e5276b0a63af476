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
    #[arg(long, value_name = "PATH")]
    pgpool_conf: Option<PathBuf>,
}

/// Loads the configuration from every layer: pgpool.conf (when given), TOML file, environment, flags.
fn load(cli: &Cli) -> anyhow::Result<(dbproxy::Config, Option<dbproxy::pgpool_conf::PgpoolImport>)> {
    let import = cli
        .pgpool_conf
        .as_deref()
        .map(dbproxy::pgpool_conf::load)
        .transpose()?;
    let mut source = cli.common.source("DBPROXY")?;
    if let Some(i) = &import {
        source = source.base(i.table.clone());
    }
    Ok((source.load::<dbproxy::Config>()?, import))
}

fn main() {
    let cli = Cli::parse();
    let loaded = load(&cli);
    if let Ok((_, Some(i))) = &loaded {
        // Said on stderr so an operator moving from pgpool sees what was not carried over
        // (`--check-config` prints every key's verdict).
        for note in &i.notes {
            eprintln!("dbproxy: pgpool.conf: {note}");
        }
        for r in i
            .review
            .iter()
            .filter(|r| r.verdict == dbproxy::pgpool_check::Verdict::Different)
        {
            eprintln!(
                "dbproxy: pgpool.conf line {}: {}: differs from pgpool-II: {}",
                r.line, r.key, r.why
            );
        }
    }
    let review = match &loaded {
        Ok((_, Some(i))) if cli.common.check_config => Some(dbproxy::pgpool_check::report(&i.review)),
        _ => None,
    };
    let loaded = loaded.map(|(c, _)| c);
    if cli.common.check_config {
        let mut code = common::cli::report_check("dbproxy", &loaded);
        // The migration check: a valid configuration that behaves differently from pgpool-II
        // without notice exits 1.
        if let Some((text, ok)) = review {
            print!("{text}");
            if code == 0 && !ok {
                eprintln!(
                    "dbproxy: pgpool.conf: some keys make dbproxy behave differently (DIFFERENT above)"
                );
                code = 1;
            }
        }
        std::process::exit(code);
    }
    common::telemetry::init(cli.common.log_format, "info");
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dbproxy: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(cli, config) {
        eprintln!("dbproxy: {e:#}");
        std::process::exit(1);
    }
}

// The control runtime: signals, the accept loop, health checks, failover and the admin listener.
// Sessions run on the serving threads (`workers`).
#[tokio::main(flavor = "current_thread")]
async fn serve(cli: Cli, config: dbproxy::Config) -> anyhow::Result<()> {
    let mut signals = common::shutdown::install().context("installing signal handlers")?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(&config.admin_listen)
        .await
        .with_context(|| format!("binding {}", config.admin_listen))?;
    // SIGHUP: load every layer again; a bad configuration is reported and the running one kept.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while signals.reload.recv().await.is_some() {
            match load(&cli) {
                Ok((c, _)) => {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "reload: configuration rejected"),
            }
        }
    });
    dbproxy::run_with(listener, Some(admin), config, signals.shutdown, Some(rx)).await?;
    Ok(())
}
