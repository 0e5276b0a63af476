//! A pool's key (node and startup parameters) and the tag every pooled connection carries,
//! whose drop gives the connection's place back.

use std::sync::Arc;
use std::time::Instant;

use crate::protocol::Frame;

use super::Pools;

/// What a pool is for: a node and the startup parameters (user and database among them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The node's index.
    pub node: usize,
    /// The startup parameters, sorted by name.
    pub params: Vec<(String, String)>,
}

impl Key {
    /// The key of a client's connections to `node`.
    pub fn new(node: usize, params: &[(String, String)]) -> Key {
        let mut params = params.to_vec();
        params.sort();
        Key { node, params }
    }

    pub(super) fn get(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The user the connections log in as.
    pub fn user(&self) -> &str {
        self.get("user")
    }

    /// The database (the user's name when the client named none).
    pub fn database(&self) -> &str {
        match self.get("database") {
            "" => self.user(),
            d => d,
        }
    }
}

/// The pool's mark on a server connection it counts. Dropping it (with the connection) gives
/// the connection's place in its pool back.
pub struct Tag {
    pub(super) pools: Arc<Pools>,
    /// The connection's id (SHOW SERVERS `ptr`).
    pub id: u64,
    pub(super) key: Arc<Key>,
    pub(super) born: Instant,
    pub(super) generation: u64,
    pub(super) thread: usize,
    /// The ParameterStatus messages a client taking this connection is sent.
    pub(super) greeting: Vec<Frame>,
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tag")
            .field("id", &self.id)
            .field("node", &self.key.node)
            .finish()
    }
}

impl Drop for Tag {
    fn drop(&mut self) {
        self.pools.released(&self.key, self.id);
    }
}
