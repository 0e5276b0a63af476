//! Pinned clients: a session whose state cannot move to another server connection (a temporary
//! table, LISTEN, a session advisory lock, a WITH HOLD cursor, SQL PREPARE, settings that could
//! not be followed) keeps its connection until it leaves. Counted per pool for SHOW POOLS
//! (`cl_pinned`) and per node for `/metrics` (`dbproxy_pool_pinned`).

use super::{Pools, State};

impl Pools {
    /// Client `client` is pinned to its connection to `node` from now on (counted once).
    pub fn pinned(&self, client: u64, node: usize) {
        let mut st = self.lock();
        let Some(c) = st.clients.get_mut(&client).filter(|c| c.pinned.is_none()) else {
            return;
        };
        c.pinned = Some(node);
        drop(st);
        self.metrics.pinned(&self.cluster, node);
    }
}

/// How many pinned clients the pool of `key` holds: those pinned to its node whose last server
/// connection is one of the pool's.
pub(super) fn pinned_in(st: &State, key: &super::Key) -> usize {
    st.clients
        .values()
        .filter(|c| c.pinned == Some(key.node))
        .filter(|c| {
            c.link
                .and_then(|id| st.servers.get(&id))
                .is_some_and(|s| *s.key == *key)
        })
        .count()
}
