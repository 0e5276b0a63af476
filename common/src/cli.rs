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
/// Secrets are masked: values of keys naming a password, secret or token, and passwords inside URLs.
pub fn report_check<T: serde::Serialize>(name: &str, result: &Result<T, anyhow::Error>) -> i32 {
    match result {
        Ok(cfg) => {
            let text = toml::Value::try_from(cfg).and_then(|mut v| {
                redact(&mut v, false);
                toml::to_string_pretty(&v)
            });
            match text {
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

/// Masks secrets in a config tree before it is printed.
pub fn redact(v: &mut toml::Value, secret_key: bool) {
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = (k.contains("password") || k.contains("secret") || k.contains("token"))
                    && !k.ends_with("_env")
                    && !k.ends_with("_file");
                redact(child, secret);
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|x| redact(x, secret_key)),
        toml::Value::String(s) if secret_key && !s.is_empty() => *s = "********".to_string(),
        toml::Value::String(s) => *s = redact_url(s),
        _ => {}
    }
}

/// `postgres://user:pw@host/db` → `postgres://user:********@host/db`; other text unchanged.
fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return s.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:********{}",
            &s[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let mut v: toml::Value = toml::from_str(
            "database_url = 'postgres://app:s3cret@db:9999/app'\nplain = 'http://host/x'\n\
             admin_token = 'tok3n'\n\
             [health]\npassword = 'pw'\n[[users]]\nname = 'a'\npassword_env = 'PW'\nsecret = 'md5abc'\n",
        )
        .unwrap();
        redact(&mut v, false);
        let text = toml::to_string(&v).unwrap();
        assert!(
            !text.contains("s3cret")
                && !text.contains("\"pw\"")
                && !text.contains("md5abc")
                && !text.contains("tok3n"),
            "{text}"
        );
        assert!(text.contains("postgres://app:********@db:9999/app"), "{text}");
        assert!(text.contains("password_env = \"PW\""), "{text}");
        assert!(text.contains("http://host/x"), "{text}");
        assert_eq!(redact_url("no url"), "no url");
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
    }
}
