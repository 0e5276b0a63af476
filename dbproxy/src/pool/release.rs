//! Transaction pooling's check-in: a connection whose client's transaction (or autocommit
//! request) just ended goes back to its pool as it is, without a reset query, for the next
//! request of any client with the same key. What it carries of its last client is undone by
//! the next one before use (see `session::upstream`): settings are reset when they are another
//! client's, and statements are prepared again when their Parse differs.

use std::sync::Arc;

use crate::backend::Backend;

use super::{quiet, within_lifetime, Pools};

impl Pools {
    /// Takes back a connection between two transactions of its client (`pool.mode =
    /// "transaction"`). Pooled at once when it has nothing pending and may still be used;
    /// closed otherwise.
    pub fn release(self: &Arc<Self>, b: Backend) {
        let Some(tag) = b.pooled.as_ref() else {
            return;
        };
        let config = self.config.load();
        let keep = quiet(&b)
            && tag.thread == self.thread()
            && tag.generation == self.generation()
            && within_lifetime(tag.born, &config)
            && self.node_usable(tag.key.node);
        if keep {
            self.pool_idle_as_is(b);
        }
    }
}
