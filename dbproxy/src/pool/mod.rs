//! Server connection pools: in session mode a client's server connections go back to a pool
//! when it leaves, reset with `pool.server_reset_query`, and the next client with the same key
//! (node, user, database and every startup parameter) takes one without a backend login; in
//! transaction mode they go back between the client's transactions.
//!
//! Accounting is shared, connections are per serving thread. A connection's socket is
//! registered with the reactor of the serving thread that opened it (`common::workers`: each
//! thread runs its own single-threaded runtime) and is used only there, so each key keeps one
//! idle list per thread; `pool.size` counts a key's connections on every thread together, under
//! one mutex held for a few list operations and never across an await. A client whose thread
//! has no idle connection opens one if the key is under `pool.size`; at the limit it closes an
//! idle connection of another thread to make room (one backend login, the limit still holds),
//! otherwise it waits (`pool.checkout_timeout`, then 53300).
//!
//! Every pooled connection carries a [`Tag`]; dropping the tag (with its connection, wherever
//! that happens) gives the place back, so no code path can leak one. A connection is handed out
//! only to its own thread, only while its node is healthy and unfenced, and only if the cluster's
//! topology generation (elected primary, fences) has not changed since it was opened: a failover
//! empties the pools of every node and nothing opened before it is reused.
//!
//! Map: `config` (`[pool]`), `key` (the pool key and the connection tag), `checkout` (taking a
//! connection or waiting for one), `checkin` (taking one back at a session's end or between
//! transactions, and freeing a place), `reset` (a returned connection's reset), `close` (the
//! close of one evicted from another thread), `upkeep` (per-thread expiry, emptying after
//! topology changes, `min_idle`), `pinned` (clients pinned to their connection), `show` (SHOW
//! POOLS / CLIENTS / SERVERS), `metrics` (`dbproxy_pool_*`).

mod checkin;
mod checkout;
mod close;
pub mod config;
mod key;
mod metrics;
mod pinned;
mod reset;
pub mod show;
mod upkeep;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use prometheus::Registry;
use tokio::sync::Notify;

use crate::auth::Credentials;
use crate::backend::Backend;
use crate::cluster::Cluster;
use crate::config::secs;
use crate::protocol::{BackendMessage, Frame};

pub use config::{PoolConfig, PoolMode};
pub use key::{Key, Keys, Tag};

/// What SHOW SERVERS says a server connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Logging in.
    Login,
    /// Used by a client.
    Active,
    /// Running the reset query after its client left.
    Tested,
    /// Pooled, free.
    Idle,
}

impl ServerState {
    fn as_str(self) -> &'static str {
        match self {
            ServerState::Login => "login",
            ServerState::Active => "active",
            ServerState::Tested => "tested",
            ServerState::Idle => "idle",
        }
    }
}

/// One server connection as SHOW SERVERS lists it.
#[derive(Debug, Clone)]
struct Server {
    key: Arc<Key>,
    state: ServerState,
    /// The client using it.
    client: Option<u64>,
    addr: Option<SocketAddr>,
    local: Option<SocketAddr>,
    pid: i32,
    connected: SystemTime,
    since: Instant,
}

/// One logged-in client as SHOW CLIENTS lists it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// User name.
    pub user: String,
    /// Database name.
    pub database: String,
    /// Its `application_name`.
    pub application_name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// dbproxy's address it connected to.
    pub local: Option<SocketAddr>,
    /// Whether it speaks TLS.
    pub tls: bool,
    /// When it connected.
    pub connected: SystemTime,
}

struct Client {
    info: ClientInfo,
    /// Since when it waits for a server connection, and of which pool, if it does.
    waiting: Option<(Instant, Arc<Key>)>,
    /// The server connection it last took.
    link: Option<u64>,
    /// The node whose connection it is pinned to (see `pinned`), if it is.
    pinned: Option<usize>,
}

/// An idle pooled connection.
struct Idle {
    backend: Backend,
    since: Instant,
}

/// One key's connections.
struct Pool {
    key: Arc<Key>,
    /// Connections counted against `pool.size`: idle, in use, logging in or being reset, on
    /// every thread.
    open: usize,
    /// Idle connections per serving thread, the most recently returned last.
    idle: Vec<VecDeque<Idle>>,
    /// Clients waiting for a connection.
    waiting: usize,
    /// Of those, the ones on each serving thread.
    waiting_on: Vec<usize>,
    /// One waiter woken whenever a place or an idle connection frees up (see [`Pool::wake`]).
    freed: Arc<Freed>,
    /// What `min_idle` needs to log in without a client: the latest credentials and limits.
    creds: Option<Credentials>,
    max_message: usize,
    /// The ParameterStatus messages of this key's last login or reset: what a client logging in
    /// is told without taking a connection yet.
    greeting: Option<Vec<Frame>>,
    checkouts: u64,
    timeouts: u64,
}

/// A key's wake-ups, one per serving thread: a connection coming back to a thread's idle list
/// wakes one client waiting on that thread, who takes it without a login. Waking every waiter
/// (as this did) sent the other threads' waiters after it too, and those found it on another
/// thread's list and closed it to log in anew: with 500 clients over 20 connections, a login
/// for most transactions.
pub(super) struct Freed {
    on: Vec<Notify>,
}

impl Pool {
    /// The waiter to wake for a connection coming back to `thread`'s idle list, or for a place
    /// freed (`thread` then is where it was freed): one on `thread` if any waits there, else one
    /// on another thread. Returned to be woken once the state lock is released.
    fn wake(&self, thread: usize) -> Option<Wake> {
        let t = if self.waiting_on.get(thread).is_some_and(|&n| n > 0) {
            thread
        } else {
            self.waiting_on.iter().position(|&n| n > 0)?
        };
        Some(Wake {
            freed: self.freed.clone(),
            thread: t,
        })
    }
}

/// One waiter to wake (see [`Pool::wake`]).
pub(super) struct Wake {
    freed: Arc<Freed>,
    thread: usize,
}

impl Wake {
    pub(super) fn wake(self) {
        self.freed.on[self.thread].notify_one();
    }
}

struct State {
    pools: HashMap<Arc<Key>, Pool>,
    servers: HashMap<u64, Server>,
    clients: HashMap<u64, Client>,
}

/// Every pool of the process (one per key), shared by the serving threads.
pub struct Pools {
    threads: usize,
    config: ArcSwap<PoolConfig>,
    cluster: Arc<Cluster>,
    /// Shared with the `dbproxy_pool_*` gauges' collector, which counts them when read.
    state: Arc<Mutex<State>>,
    metrics: metrics::PoolMetrics,
    next_id: AtomicU64,
    /// Whether each serving thread's upkeep task runs.
    upkeep: Vec<AtomicBool>,
}

/// A client's request for a connection to `node`.
pub struct Request<'a> {
    /// The pool: the node and the client's startup parameters (a session keeps its keys, see
    /// [`Keys`]).
    pub key: Arc<Key>,
    /// The user.
    pub user: &'a str,
    /// The user's credentials for the backend login.
    pub creds: Option<&'a Credentials>,
    /// The largest message accepted from the backend.
    pub max_message: usize,
    /// The client asking (SHOW CLIENTS).
    pub client: u64,
}

impl Pools {
    /// Pools for `threads` serving threads.
    pub fn new(threads: usize, config: PoolConfig, cluster: Arc<Cluster>, registry: &Registry) -> Pools {
        let threads = threads.max(1);
        let state = Arc::new(Mutex::new(State {
            pools: HashMap::new(),
            servers: HashMap::new(),
            clients: HashMap::new(),
        }));
        Pools {
            threads,
            config: ArcSwap::from_pointee(config),
            metrics: metrics::PoolMetrics::new(registry, &cluster, Arc::downgrade(&state)),
            cluster,
            state,
            next_id: AtomicU64::new(1),
            upkeep: (0..threads).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Applies a reloaded `[pool]` section (to checkouts and upkeep from now on).
    pub fn set_config(&self, config: PoolConfig) {
        self.config.store(Arc::new(config));
    }

    /// Key `key`'s pool, made if missing; it remembers what `min_idle` logins need.
    fn entry<'s>(&self, st: &'s mut State, key: &Arc<Key>, req: &Request<'_>) -> &'s mut Pool {
        let threads = self.threads;
        if st.pools.contains_key(key) {
            let p = st.pools.get_mut(key).expect("just seen");
            // Only `min_idle` logs in without a client: the credentials are kept fresh for it
            // (a reload may change a password); nothing else reads them.
            if self.config.load().min_idle > 0 {
                p.creds = req.creds.cloned();
            }
            p.max_message = req.max_message;
            return p;
        }
        let p = st.pools.entry(key.clone()).or_insert_with(|| Pool {
            key: key.clone(),
            open: 0,
            idle: (0..threads).map(|_| VecDeque::new()).collect(),
            waiting: 0,
            waiting_on: vec![0; threads],
            freed: Arc::new(Freed {
                on: (0..threads).map(|_| Notify::new()).collect(),
            }),
            creds: None,
            max_message: req.max_message,
            greeting: None,
            checkouts: 0,
            timeouts: 0,
        });
        p.creds = req.creds.cloned();
        p.max_message = req.max_message;
        p
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pool state poisoned")
    }

    fn thread(&self) -> usize {
        common::workers::current_index() % self.threads
    }

    fn generation(&self) -> u64 {
        *self.cluster.subscribe().borrow()
    }

    /// Whether connections to `node` may be handed out now.
    fn node_usable(&self, node: usize) -> bool {
        !self.cluster.is_fenced(node) && self.cluster.status(node).healthy
    }

    /// Closes every idle connection (at shutdown; idle connections hold the pools alive through
    /// their tags otherwise).
    pub fn close(&self) {
        let idle: Vec<Idle> = {
            let mut st = self.lock();
            st.pools
                .values_mut()
                .flat_map(|p| p.idle.iter_mut().flat_map(|l| l.drain(..)).collect::<Vec<_>>())
                .collect()
        };
        drop(idle);
    }

    /// Registers a logged-in client (SHOW CLIENTS); its id names it in checkouts.
    pub fn client_joined(&self, info: ClientInfo) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().clients.insert(
            id,
            Client {
                info,
                waiting: None,
                link: None,
                pinned: None,
            },
        );
        id
    }

    /// What a client logging in with `params` is told of node `node`'s parameters when a
    /// connection of that key logged in before (and the node is usable): the client then gets
    /// its server connection when its first request needs one, not at login.
    pub fn greeting(&self, key: &Key) -> Option<Vec<Frame>> {
        if !self.node_usable(key.node) {
            return None;
        }
        self.lock().pools.get(key).and_then(|p| p.greeting.clone())
    }

    /// Whether a checkout of key (`node`, `params`) by the calling thread would be served now,
    /// without waiting and without closing another thread's idle connection: the key has an
    /// idle connection on this thread or room under `pool.size`, or has never been used. Racy
    /// by nature (a hint). Another thread's idle connection does not count: closing it to open
    /// one here costs a Terminate round trip and a login, which a client's login should not
    /// wait for.
    pub fn available(&self, key: &Key) -> bool {
        let size = self.config.load().size;
        let thread = self.thread();
        match self.lock().pools.get(key) {
            None => true,
            Some(p) => p.open < size || p.idle.get(thread).is_some_and(|q| !q.is_empty()),
        }
    }

    /// Forgets a client that left.
    pub fn client_left(&self, id: u64) {
        let gone = self.lock().clients.remove(&id);
        if let Some(node) = gone.and_then(|c| c.pinned) {
            self.metrics.unpinned(&self.cluster, node);
        }
    }
}

/// The ParameterStatus frames of a login's greeting.
fn parameter_frames(frames: &[Frame]) -> Vec<Frame> {
    frames
        .iter()
        .filter(|f| matches!(BackendMessage::parse(f), Ok(BackendMessage::ParameterStatus)))
        .cloned()
        .collect()
}

/// Whether an idle connection may still be handed out.
fn fresh(i: &Idle, generation: u64, config: &PoolConfig) -> bool {
    let Some(tag) = i.backend.pooled.as_ref() else {
        return false;
    };
    tag.generation == generation
        && within_lifetime(tag.born, config)
        && (config.idle_timeout == 0.0 || i.since.elapsed() < secs(config.idle_timeout))
}

fn within_lifetime(born: Instant, config: &PoolConfig) -> bool {
    config.max_lifetime == 0.0 || born.elapsed() < secs(config.max_lifetime)
}

/// Whether nothing is pending on a connection: no injected answers to swallow, no WAL-position
/// answer to read, nothing buffered either way.
pub fn quiet(b: &Backend) -> bool {
    b.swallow_rfq == 0
        && b.swallow_parse == 0
        && b.swallow_close == 0
        && b.capture_lsn == 0
        && !b.capturing
        && b.conn.wbuf.is_empty()
        && b.conn.rbuf.is_empty()
}

/// A duration as PgBouncer's `wait`/`wait_us` pair.
fn split_secs(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_micros())
}
