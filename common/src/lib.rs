//! Pieces every ha-stack binary shares: layered config loading, the shutdown/reload signals,
//! tracing setup, the admin HTTP listener and the rise/fall health state used by lb and dbproxy.

pub mod admin;
pub mod cli;
pub mod config;
pub mod health;
pub mod postgres;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod workers;

pub use cli::CommonArgs;
pub use config::{ConfigError, ConfigSource, Validate};
pub use health::{HealthState, Thresholds, Transition};
pub use shutdown::{Shutdown, Signals};
