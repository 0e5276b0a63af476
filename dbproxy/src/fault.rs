//! A test hook, inert unless its environment variable is set: `HA_STACK_TEST_ABORT_AT=<step>`
//! makes the process abort (as a SIGKILL would end it, with no clean-up) when the failover
//! manager reaches the named step of a promotion. The drills use it to kill the leader at an
//! exact point of a failover, which no signal sent from outside can hit reliably.
//!
//! The variable is not `DBPROXY_`-prefixed: that prefix is the configuration's environment layer.
//!
//! Steps: `promoting` (the record says a promotion is under way; it has not started),
//! `promoted` (the standby is a primary; the record does not name it yet), `switched` (the
//! record names it; the other standbys were not re-pointed and the operation is not closed).
//! Production never sets the variable; an unknown step name simply never matches.

use std::sync::OnceLock;

/// The environment variable naming the step to abort at.
pub const ABORT_AT: &str = "HA_STACK_TEST_ABORT_AT";

/// Aborts the process if [`ABORT_AT`] names `step`.
pub fn reached(step: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(ABORT_AT).ok().filter(|s| !s.is_empty()));
    if at.as_deref() == Some(step) {
        tracing::error!(step, "{ABORT_AT} names this step: aborting (test hook)");
        std::process::abort();
    }
}
