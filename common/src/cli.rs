//! Command-line flags that every binary shares (`#[command(flatten)]` them into its own).

use std::path::PathBuf;

use clap::Args;

use crate::config::{ConfigError, ConfigSource};
use crate::telemetry::LogFormat;

/// Flags common to every ha-stack binary.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML config file; environment variables and flags override its keys.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print it, and exit (status 0 when valid, 2 when not).
    #[arg(long)]
    pub check_config: bool,

    /// Log format; the level comes from RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Override any config key, e.g. `--set health.period=2`. May be repeated.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl CommonArgs {
    /// The config layers these flags describe: file, then `PREFIX_*` variables, then `--set`.
    /// The file may also be named by `PREFIX_CONFIG`.
    pub fn source(&self, env_prefix: &str) -> Result<ConfigSource, ConfigError> {
        let file = self
            .config
            .clone()
            .or_else(|| std::env::var_os(format!("{env_prefix}_CONFIG")).map(PathBuf::from));
        ConfigSource::new()
            .file(file.as_deref())
            .env_prefix(env_prefix)
            .set_all(&self.set)
    }
}

/// Prints the outcome of `--check-config` and returns the exit status to use.
pub fn report_check<T: serde::Serialize>(name: &str, result: &Result<T, anyhow::Error>) -> i32 {
    match result {
        Ok(cfg) => {
            match toml::to_string_pretty(cfg) {
                Ok(text) => println!("{text}"),
                Err(e) => println!("# (cannot print the config: {e})"),
            }
            eprintln!("{name}: configuration is valid");
            0
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            2
        }
    }
}
