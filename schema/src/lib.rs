//! The ha-stack database schema: versioned SQL migrations, the runner that applies them under an
//! advisory lock, and the typed queries the collector and the webapp share for the `samples` table.
//!
//! Any number of instances may call [`migrate()`] at once: they queue on one advisory lock, the first
//! applies what is missing and the others find nothing left to do.

pub mod migrate;
pub mod samples;

pub use migrate::{describe, migrate, Applied, Migration, SchemaError, LOCK_KEY, MIGRATIONS};
pub use samples::{Disk, NetIface, Sample};
