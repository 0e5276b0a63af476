//! Layered configuration: a TOML file, then environment variables, then command-line overrides.
//!
//! Every layer is merged into one TOML tree before it is deserialized, so a key means the same thing
//! wherever it is set, and an error always names the dotted key that was wrong
//! (e.g. `invalid value for `health.period`: ...`).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// What went wrong while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file that failed to parse.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong type, or is unknown.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The dotted path of the key.
        key: String,
        /// What was wrong with it.
        message: String,
    },
    /// An override could not be applied (e.g. `--set` without `=`).
    #[error("bad override `{0}`: expected KEY=VALUE")]
    Override(String),
}

impl ConfigError {
    /// A validation error for `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Checks the semantic rules that serde cannot express (ranges, cross-field rules).
pub trait Validate: Sized {
    /// Returns the config unchanged when it is valid; the error names the offending key.
    fn validate(self) -> Result<Self, ConfigError>;
}

/// Where a configuration comes from; [`ConfigSource::load`] merges the layers in order.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    file: Option<PathBuf>,
    base: Option<Table>,
    env_prefix: Option<String>,
    env: Vec<(String, String)>,
    overrides: Vec<(String, String)>,
}

/// Environment variables with the prefix that are not config keys (they steer the loader itself).
const RESERVED_ENV: &[&str] = &["CONFIG", "LOG_FORMAT", "CHECK_CONFIG"];

impl ConfigSource {
    /// An empty source: every key takes its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the TOML file at `path` as the first layer.
    pub fn file(mut self, path: Option<&Path>) -> Self {
        self.file = path.map(Path::to_path_buf);
        self
    }

    /// A table that stands below the file (e.g. one translated from a foreign config format).
    pub fn base(mut self, table: Table) -> Self {
        self.base = Some(table);
        self
    }

    /// Takes `PREFIX_KEY__SUBKEY=value` variables from the process environment as the second layer.
    /// A double underscore separates nesting levels; keys are lower-cased.
    pub fn env_prefix(mut self, prefix: &str) -> Self {
        self.env_prefix = Some(prefix.to_string());
        self.env = std::env::vars().collect();
        self
    }

    /// Uses `vars` instead of the process environment (for tests).
    pub fn env_vars(mut self, prefix: &str, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env_prefix = Some(prefix.to_string());
        self.env = vars.into_iter().collect();
        self
    }

    /// Adds a `key.path=value` override as the last layer (a command-line flag).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.overrides.push((key.to_string(), value.into()));
        self
    }

    /// Adds `KEY=VALUE` strings (from a repeated `--set` flag).
    pub fn set_all<'a>(mut self, items: impl IntoIterator<Item = &'a String>) -> Result<Self, ConfigError> {
        for item in items {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::Override(item.clone()))?;
            self.overrides.push((k.trim().to_string(), v.to_string()));
        }
        Ok(self)
    }

    /// Merges the layers into one TOML table.
    pub fn table(&self) -> Result<Table, ConfigError> {
        let mut root = self.base.clone().unwrap_or_default();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file: Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.clone(),
                message: e.to_string(),
            })?;
            merge(&mut root, file);
        }
        if let Some(prefix) = &self.env_prefix {
            let want = format!("{prefix}_");
            let mut vars: Vec<_> = self.env.iter().filter(|(k, _)| k.starts_with(&want)).collect();
            vars.sort();
            for (name, value) in vars {
                let rest = &name[want.len()..];
                if rest.is_empty() || RESERVED_ENV.contains(&rest) {
                    continue;
                }
                let key = rest.to_ascii_lowercase().replace("__", ".");
                set_path(&mut root, &key, parse_scalar(value))?;
            }
        }
        for (key, value) in &self.overrides {
            set_path(&mut root, key, parse_scalar(value))?;
        }
        Ok(root)
    }

    /// Loads the layers, deserializes them into `T` and validates the result.
    pub fn load<T: DeserializeOwned + Validate>(&self) -> Result<T, ConfigError> {
        let table = self.table()?;
        from_table::<T>(table)?.validate()
    }
}

/// Deserializes a merged table, naming the failing key on error.
pub fn from_table<T: DeserializeOwned>(table: Table) -> Result<T, ConfigError> {
    let value = Value::Table(table);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            "(top level)".to_string()
        } else {
            path
        };
        ConfigError::Invalid {
            key,
            message: e.into_inner().to_string(),
        }
    })
}

/// Reads a value written on the command line or in the environment: TOML syntax when it parses
/// (`4`, `true`, `["a", "b"]`, `"x"`), otherwise the raw text as a string.
fn parse_scalar(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Recursively merges `over` into `base`; tables merge, everything else replaces.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Sets `a.b.c` (numeric segments index arrays) to `value`, creating tables on the way.
fn set_path(root: &mut Table, key: &str, value: Value) -> Result<(), ConfigError> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::invalid(key, "empty key segment"));
    }
    let (first, rest) = parts.split_first().expect("split yields at least one part");
    if rest.is_empty() {
        root.insert(first.to_string(), value);
        return Ok(());
    }
    let child = root
        .entry(first.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    set_in(child, rest, key, value)
}

fn set_in(cur: &mut Value, parts: &[&str], key: &str, value: Value) -> Result<(), ConfigError> {
    let Some((part, rest)) = parts.split_first() else {
        *cur = value;
        return Ok(());
    };
    let next = match cur {
        Value::Table(t) => t
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new())),
        Value::Array(a) => {
            let idx: usize = part
                .parse()
                .map_err(|_| ConfigError::invalid(key, format!("`{part}` is not an index into an array")))?;
            let len = a.len();
            a.get_mut(idx).ok_or_else(|| {
                ConfigError::invalid(key, format!("index {idx} is out of range (length {len})"))
            })?
        }
        _ => {
            return Err(ConfigError::invalid(
                key,
                "cannot set a key inside a non-table value",
            ))
        }
    };
    set_in(next, rest, key, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Health {
        period: u64,
        user: String,
    }
    impl Default for Health {
        fn default() -> Self {
            Health {
                period: 5,
                user: "postgres".into(),
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        listen: String,
        health: Health,
        ports: Vec<u16>,
    }
    impl Validate for Cfg {
        fn validate(self) -> Result<Self, ConfigError> {
            if self.health.period == 0 {
                return Err(ConfigError::invalid("health.period", "must be at least 1"));
            }
            Ok(self)
        }
    }

    fn file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::write(text)
    }

    /// A tiny temporary-file helper so this crate needs no extra dev-dependency.
    mod tempfile_path {
        use std::path::PathBuf;
        pub struct TempPath(pub PathBuf);
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> TempPath {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "common-config-test-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, text).unwrap();
            TempPath(p)
        }
    }

    #[test]
    fn layers_apply_in_order() {
        let f = file("listen = \"a\"\n[health]\nperiod = 3\n");
        let cfg: Cfg = ConfigSource::new()
            .file(Some(&f.0))
            .env_vars(
                "APP",
                vec![
                    ("APP_LISTEN".to_string(), "b".to_string()),
                    ("APP_HEALTH__USER".to_string(), "monitor".to_string()),
                    ("APP_CONFIG".to_string(), "ignored".to_string()),
                    ("OTHER_LISTEN".to_string(), "z".to_string()),
                ],
            )
            .set("listen", "c")
            .set("ports", "[1, 2]")
            .load()
            .unwrap();
        assert_eq!(cfg.listen, "c");
        assert_eq!(
            cfg.health,
            Health {
                period: 3,
                user: "monitor".into()
            }
        );
        assert_eq!(cfg.ports, vec![1, 2]);
    }

    #[test]
    fn errors_name_the_key() {
        let err = ConfigSource::new()
            .set("health.period", "\"soon\"")
            .load::<Cfg>()
            .unwrap_err();
        assert!(err.to_string().contains("`health.period`"), "{err}");

        let err = ConfigSource::new()
            .set("health.perod", "1")
            .load::<Cfg>()
            .unwrap_err();
        assert!(err.to_string().contains("perod"), "{err}");

        let err = ConfigSource::new()
            .set("health.period", "0")
            .load::<Cfg>()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for `health.period`: must be at least 1"
        );
    }

    #[test]
    fn syntax_and_missing_file_errors() {
        let f = file("listen = \n");
        let err = ConfigSource::new().file(Some(&f.0)).load::<Cfg>().unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let err = ConfigSource::new()
            .file(Some(Path::new("/nonexistent/x.toml")))
            .load::<Cfg>()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read config file /nonexistent/x.toml"),
            "{err}"
        );
    }

    #[test]
    fn array_index_overrides() {
        let mut t: Table = toml::from_str("nodes = [{host = \"a\"}, {host = \"b\"}]").unwrap();
        set_path(&mut t, "nodes.1.host", Value::String("c".into())).unwrap();
        assert_eq!(t["nodes"][1]["host"].as_str(), Some("c"));
        assert!(set_path(&mut t, "nodes.5.host", Value::Integer(1)).is_err());
        assert!(set_path(&mut t, "nodes.x", Value::Integer(1)).is_err());
    }

    #[test]
    fn set_all_rejects_missing_equals() {
        let items = vec!["listen".to_string()];
        assert!(matches!(
            ConfigSource::new().set_all(&items),
            Err(ConfigError::Override(_))
        ));
    }
}
