//! Taking connections back: at the end of a session (`checkin`: reset with
//! `pool.server_reset_query` in a task of the connection's thread, then pooled, or closed), and
//! between two transactions of a client in transaction pooling (`release`: pooled as it is; what
//! it carries of its last client is undone by the next one before use, see `session::upstream`).
//! A connection's place is given back when its tag drops (`released`).

use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::config::secs;

use super::{quiet, reset, within_lifetime, Idle, Key, Pools, ServerState};

impl Pools {
    /// A connection's place is free (its tag was dropped, or its login failed).
    pub(super) fn released(&self, key: &Arc<Key>, id: u64) {
        let thread = self.thread();
        let mut st = self.lock();
        st.servers.remove(&id);
        let wake = st.pools.get_mut(key).and_then(|p| {
            p.open -= 1;
            p.wake(thread)
        });
        drop(st);
        if let Some(w) = wake {
            w.wake();
        }
    }

    /// Takes back a connection whose client left. `reusable`: the session saw it idle, outside
    /// a transaction, with nothing pending. It is then reset (in a task of this thread) and
    /// pooled; anything else is closed.
    pub fn checkin(self: &Arc<Self>, mut b: Backend, reusable: bool) {
        let config = self.config.load_full();
        let Some(tag) = b.pooled.as_ref() else {
            return;
        };
        let keep = reusable
            && quiet(&b)
            && !config.server_reset_query.is_empty()
            && tag.thread == self.thread()
            && tag.generation == self.generation()
            && within_lifetime(tag.born, &config)
            && self.node_usable(tag.key.node);
        if !keep {
            return;
        }
        if !b.conn.written {
            // Its client never sent it anything (a session-mode login takes its primary
            // connection at once, and a read-only session may never use it): nothing to reset.
            self.pool_idle(b);
            return;
        }
        let id = tag.id;
        self.set_state(id, ServerState::Tested);
        let pools = self.clone();
        tokio::spawn(async move {
            let limit = secs(config.connect_timeout);
            let mut tag = b.pooled.take().expect("checked above");
            let query = &config.server_reset_query;
            let ok = tokio::time::timeout(limit, reset::run(&mut b, query, &mut tag.greeting))
                .await
                .is_ok_and(|r| r.is_ok());
            b.pooled = Some(tag);
            if ok {
                pools.pool_idle(b);
            }
        });
    }

    /// Puts a reset (or freshly opened) connection on its thread's idle list; what its reset
    /// or login reported is what the key's next client logging in is told.
    pub(super) fn pool_idle(&self, b: Backend) {
        self.put_idle(b, true);
    }

    /// Puts a connection back on its thread's idle list between two transactions of its
    /// client: the key's greeting stays (nothing was reset).
    pub(super) fn pool_idle_as_is(&self, b: Backend) {
        self.put_idle(b, false);
    }

    pub(super) fn put_idle(&self, b: Backend, greet: bool) {
        let Some(tag) = b.pooled.as_ref() else { return };
        if tag.generation != self.generation() || !self.node_usable(tag.key.node) {
            return;
        }
        let (key, id, thread) = (tag.key.clone(), tag.id, tag.thread);
        let greeting = greet.then(|| tag.greeting.clone());
        let mut st = self.lock();
        let st_ref = &mut *st;
        let Some(p) = st_ref.pools.get_mut(&key) else {
            drop(st);
            return;
        };
        if let Some(g) = greeting {
            p.greeting = Some(g);
        } else if p.greeting.is_none() {
            // The key's first connection back between transactions: its login's parameters are
            // what the key's next clients are told at login, without taking a connection.
            p.greeting = Some(tag.greeting.clone());
        }
        p.idle[thread].push_back(Idle {
            backend: b,
            since: Instant::now(),
        });
        let wake = p.wake(thread);
        if let Some(s) = st_ref.servers.get_mut(&id) {
            s.state = ServerState::Idle;
            s.client = None;
            s.since = Instant::now();
        }
        drop(st);
        if let Some(w) = wake {
            w.wake();
        }
    }

    pub(super) fn set_state(&self, id: u64, state: ServerState) {
        if let Some(s) = self.lock().servers.get_mut(&id) {
            s.state = state;
            s.since = Instant::now();
        }
    }

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
