//! A pool's key (node and startup parameters) and the tag every pooled connection carries,
//! whose drop gives the connection's place back.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::protocol::Frame;

use super::Pools;

/// What a pool is for: a node and the startup parameters (user and database among them).
/// Hashed once, when made: a checkout looks its pool up by the hash alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The node's index.
    pub node: usize,
    /// The startup parameters, sorted by name.
    pub params: Vec<(String, String)>,
    hash: u64,
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Key {
    /// The key of a client's connections to `node`.
    pub fn new(node: usize, params: &[(String, String)]) -> Key {
        let mut params = params.to_vec();
        params.sort();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        node.hash(&mut h);
        params.hash(&mut h);
        Key {
            node,
            params,
            hash: h.finish(),
        }
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

/// A session's pool keys, one per node it took connections of: made at its first checkout
/// there, not at every one (a key copies and sorts the startup parameters).
#[derive(Debug, Default)]
pub struct Keys(SmallVec<[Arc<Key>; 2]>);

impl Keys {
    /// The key of `params`' connections to `node` (`params` never change in a session).
    pub fn get(&mut self, node: usize, params: &[(String, String)]) -> Arc<Key> {
        if let Some(k) = self.0.iter().find(|k| k.node == node) {
            return k.clone();
        }
        let k = Arc::new(Key::new(node, params));
        self.0.push(k.clone());
        k
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
