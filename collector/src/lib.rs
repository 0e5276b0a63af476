//! Samples host metrics from /proc and writes them through dbproxy.

use serde::{Deserialize, Serialize};

/// The `collector` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the main listener binds.
    pub listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9999".to_string(),
        }
    }
}

impl common::Validate for Config {
    fn validate(self) -> Result<Self, common::ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(common::ConfigError::invalid(
                "listen",
                format!("`{}` is not an address:port", self.listen),
            ));
        }
        Ok(self)
    }
}
