//! Server connection pools (session mode): a client's server connections go back to a pool when
//! it leaves, reset with `pool.server_reset_query`, and the next client with the same key (node,
//! user, database and every startup parameter) takes one without a backend login.
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
//! Map: `config` (`[pool]`), `reset` (a returned connection's reset, and the close of one
//! evicted from another thread), `upkeep` (per-thread expiry, emptying after topology changes,
//! `min_idle`), `show` (SHOW POOLS / CLIENTS / SERVERS), `metrics` (`dbproxy_pool_*`).

pub mod config;
mod metrics;
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
use crate::backend::{self, Backend, BackendError, Greeting};
use crate::cluster::Cluster;
use crate::config::secs;
use crate::protocol::{BackendMessage, Frame};

pub use config::{PoolConfig, PoolMode};

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

    fn get(&self, name: &str) -> &str {
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
    pools: Arc<Pools>,
    /// The connection's id (SHOW SERVERS `ptr`).
    pub id: u64,
    key: Arc<Key>,
    born: Instant,
    generation: u64,
    thread: usize,
    /// The ParameterStatus messages a client taking this connection is sent.
    greeting: Vec<Frame>,
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
    /// Woken (all waiters) whenever a place or an idle connection frees up.
    freed: Arc<Notify>,
    /// What `min_idle` needs to log in without a client: the latest credentials and limits.
    creds: Option<Credentials>,
    max_message: usize,
    /// The ParameterStatus messages of this key's last login or reset: what a client logging in
    /// is told without taking a connection yet.
    greeting: Option<Vec<Frame>>,
    checkouts: u64,
    timeouts: u64,
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
    state: Mutex<State>,
    metrics: metrics::PoolMetrics,
    next_id: AtomicU64,
    /// Whether each serving thread's upkeep task runs.
    upkeep: Vec<AtomicBool>,
}

/// A client's request for a connection to `node`.
pub struct Request<'a> {
    /// The node's index.
    pub node: usize,
    /// The client's startup parameters.
    pub params: &'a [(String, String)],
    /// The user.
    pub user: &'a str,
    /// The user's credentials for the backend login.
    pub creds: Option<&'a Credentials>,
    /// The largest message accepted from the backend.
    pub max_message: usize,
    /// The client asking (SHOW CLIENTS).
    pub client: u64,
}

/// Decrements a pool's waiting count when the wait ends, however it ends.
struct Waiting<'a> {
    pools: &'a Pools,
    key: Arc<Key>,
    client: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.pools.lock();
        if let Some(p) = st.pools.get_mut(&self.key) {
            p.waiting -= 1;
        }
        if let Some(c) = st.clients.get_mut(&self.client) {
            c.waiting = None;
        }
        self.pools
            .metrics
            .refresh(&st, self.key.node, &self.pools.cluster);
    }
}

/// A place taken for a connection being opened; given back if the login fails or is dropped.
struct Opening {
    pools: Arc<Pools>,
    key: Arc<Key>,
    id: u64,
    armed: bool,
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.armed {
            self.pools.released(&self.key, self.id);
        }
    }
}

/// What a checkout decided under the lock.
enum Step {
    Reuse(Box<Backend>),
    Open(u64),
    Wait,
}

impl Pools {
    /// Pools for `threads` serving threads.
    pub fn new(threads: usize, config: PoolConfig, cluster: Arc<Cluster>, registry: &Registry) -> Pools {
        let threads = threads.max(1);
        Pools {
            threads,
            config: ArcSwap::from_pointee(config),
            cluster,
            state: Mutex::new(State {
                pools: HashMap::new(),
                servers: HashMap::new(),
                clients: HashMap::new(),
            }),
            metrics: metrics::PoolMetrics::new(registry),
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
        let p = st.pools.entry(key.clone()).or_insert_with(|| Pool {
            key: key.clone(),
            open: 0,
            idle: (0..threads).map(|_| VecDeque::new()).collect(),
            waiting: 0,
            freed: Arc::new(Notify::new()),
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
            },
        );
        id
    }

    /// What a client logging in with `params` is told of node `node`'s parameters when a
    /// connection of that key logged in before (and the node is usable): the client then gets
    /// its server connection when its first request needs one, not at login.
    pub fn greeting(&self, node: usize, params: &[(String, String)]) -> Option<Vec<Frame>> {
        if !self.node_usable(node) {
            return None;
        }
        let key = Key::new(node, params);
        self.lock().pools.get(&key).and_then(|p| p.greeting.clone())
    }

    /// Whether a checkout of key (`node`, `params`) by the calling thread would be served now,
    /// without waiting and without closing another thread's idle connection: the key has an
    /// idle connection on this thread or room under `pool.size`, or has never been used. Racy
    /// by nature (a hint). Another thread's idle connection does not count: closing it to open
    /// one here costs a Terminate round trip and a login, which a client's login should not
    /// wait for.
    pub fn available(&self, node: usize, params: &[(String, String)]) -> bool {
        let key = Key::new(node, params);
        let size = self.config.load().size;
        let thread = self.thread();
        match self.lock().pools.get(&key) {
            None => true,
            Some(p) => p.open < size || p.idle.get(thread).is_some_and(|q| !q.is_empty()),
        }
    }

    /// Forgets a client that left.
    pub fn client_left(&self, id: u64) {
        self.lock().clients.remove(&id);
    }

    /// A connection to `req.node` for `req.client`: an idle one of this thread when there is one
    /// (no backend round trip), else a new login if the pool has room, else the first to free
    /// up within `pool.checkout_timeout` (then [`BackendError::PoolTimeout`]).
    pub async fn checkout(self: &Arc<Self>, req: &Request<'_>) -> Result<(Backend, Greeting), BackendError> {
        let key = Arc::new(Key::new(req.node, req.params));
        let thread = self.thread();
        self.start_upkeep(thread);
        let config = self.config.load_full();
        let deadline = tokio::time::Instant::now() + secs(config.checkout_timeout);
        let mut freed = {
            let mut st = self.lock();
            self.entry(&mut st, &key, req).freed.clone()
        };
        let mut waiting: Option<Waiting<'_>> = None;
        let mut renewed: Option<Arc<Notify>> = None;
        loop {
            if let Some(n) = renewed.take() {
                freed = n;
            }
            let notified = freed.notified();
            tokio::pin!(notified);
            let generation = self.generation();
            let usable = self.node_usable(req.node);
            let mut closing: Vec<Idle> = Vec::new();
            let mut evicted: Option<Idle> = None;
            let step = {
                let mut st = self.lock();
                let st = &mut *st;
                let p = self.entry(st, &key, req);
                if !Arc::ptr_eq(&p.freed, &freed) {
                    // The pool was emptied and dropped meanwhile: wait on its successor.
                    renewed = Some(p.freed.clone());
                    continue;
                }
                let mut step = None;
                while let Some(i) = p.idle[thread].pop_back() {
                    if usable && fresh(&i, generation, &config) {
                        step = Some(Step::Reuse(Box::new(i.backend)));
                        break;
                    }
                    closing.push(i);
                }
                let step = match step {
                    Some(s) => s,
                    None if p.open - closing.len() < config.size => {
                        p.open += 1;
                        Step::Open(self.next_id.fetch_add(1, Ordering::Relaxed))
                    }
                    None => {
                        // At the limit: an idle connection of another thread makes room.
                        let other = (0..self.threads).find(|&t| t != thread && !p.idle[t].is_empty());
                        match other.and_then(|t| p.idle[t].pop_front()) {
                            Some(i) => {
                                evicted = Some(i);
                                p.open += 1;
                                Step::Open(self.next_id.fetch_add(1, Ordering::Relaxed))
                            }
                            None => {
                                notified.as_mut().enable();
                                Step::Wait
                            }
                        }
                    }
                };
                match &step {
                    Step::Reuse(b) => {
                        p.checkouts += 1;
                        let id = b.pooled.as_ref().map_or(0, |t| t.id);
                        if let Some(s) = st.servers.get_mut(&id) {
                            s.state = ServerState::Active;
                            s.client = Some(req.client);
                            s.since = Instant::now();
                        }
                        if let Some(c) = st.clients.get_mut(&req.client) {
                            c.link = Some(id);
                        }
                    }
                    Step::Open(id) => {
                        st.servers.insert(
                            *id,
                            Server {
                                key: key.clone(),
                                state: ServerState::Login,
                                client: Some(req.client),
                                addr: None,
                                local: None,
                                pid: 0,
                                connected: SystemTime::now(),
                                since: Instant::now(),
                            },
                        );
                    }
                    Step::Wait => {
                        if waiting.is_none() {
                            p.waiting += 1;
                            if let Some(c) = st.clients.get_mut(&req.client) {
                                c.waiting = Some((Instant::now(), key.clone()));
                            }
                        }
                    }
                }
                self.metrics.refresh(st, req.node, &self.cluster);
                step
            };
            // Closed outside the lock (each tag's drop takes it).
            drop(closing);
            match step {
                Step::Reuse(b) => {
                    self.metrics.checkout(&self.cluster, req.node, true);
                    let greeting = Greeting {
                        frames: b.pooled.as_ref().map(|t| t.greeting.clone()).unwrap_or_default(),
                    };
                    let mut b = *b;
                    b.conn.written = false;
                    return Ok((b, greeting));
                }
                Step::Open(id) => {
                    drop(waiting.take());
                    if let Some(i) = evicted {
                        // Its backend is gone from the server before the new login, so the
                        // server never counts more than `pool.size` of this key's connections.
                        reset::close_and_wait(i.backend, secs(config.connect_timeout)).await;
                    }
                    return self.open(key, id, thread, req, &config).await;
                }
                Step::Wait => {
                    if waiting.is_none() {
                        waiting = Some(Waiting {
                            pools: self,
                            key: key.clone(),
                            client: req.client,
                        });
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let mut st = self.lock();
                        if let Some(p) = st.pools.get_mut(&key) {
                            p.timeouts += 1;
                        }
                        drop(st);
                        self.metrics.timeout(&self.cluster, req.node);
                        return Err(BackendError::PoolTimeout(config.size));
                    }
                }
            }
        }
    }

    /// Logs a new connection in for place `id` of pool `key`, for the client of `req`.
    async fn open(
        self: &Arc<Self>,
        key: Arc<Key>,
        id: u64,
        thread: usize,
        req: &Request<'_>,
        config: &PoolConfig,
    ) -> Result<(Backend, Greeting), BackendError> {
        let (mut b, greeting) = self
            .login(key.clone(), id, thread, req, config, ServerState::Active)
            .await?;
        b.conn.written = false;
        {
            let mut st = self.lock();
            if let Some(c) = st.clients.get_mut(&req.client) {
                c.link = Some(id);
            }
            if let Some(p) = st.pools.get_mut(&key) {
                p.checkouts += 1;
                p.greeting = b.pooled.as_ref().map(|t| t.greeting.clone());
            }
        }
        self.metrics.checkout(&self.cluster, req.node, false);
        Ok((b, greeting))
    }

    /// Logs a connection in for place `id` of pool `key` (the place is given back if the login
    /// fails), shows it in SHOW SERVERS as `state`, and tags it as the pool's.
    async fn login(
        self: &Arc<Self>,
        key: Arc<Key>,
        id: u64,
        thread: usize,
        req: &Request<'_>,
        config: &PoolConfig,
        state: ServerState,
    ) -> Result<(Backend, Greeting), BackendError> {
        let mut opening = Opening {
            pools: self.clone(),
            key: key.clone(),
            id,
            armed: true,
        };
        let generation = self.generation();
        let (mut b, greeting) = backend::connect(
            req.node,
            self.cluster.target(req.node),
            req.params,
            req.user,
            req.creds,
            req.max_message,
            secs(config.connect_timeout),
        )
        .await?;
        opening.armed = false;
        let params = parameter_frames(&greeting.frames);
        {
            let mut st = self.lock();
            if let Some(s) = st.servers.get_mut(&id) {
                s.state = state;
                if state == ServerState::Idle {
                    s.client = None;
                }
                s.addr = Some(b.addr);
                s.local = b.local;
                s.pid = b.key.0;
                s.since = Instant::now();
            }
        }
        b.pooled = Some(Tag {
            pools: self.clone(),
            id,
            key,
            born: Instant::now(),
            generation,
            thread,
            greeting: params,
        });
        Ok((b, greeting))
    }

    /// A connection's place is free (its tag was dropped, or its login failed).
    fn released(&self, key: &Arc<Key>, id: u64) {
        let mut st = self.lock();
        st.servers.remove(&id);
        let freed = st.pools.get_mut(key).map(|p| {
            p.open -= 1;
            p.freed.clone()
        });
        self.metrics.refresh(&st, key.node, &self.cluster);
        drop(st);
        if let Some(n) = freed {
            n.notify_waiters();
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

    /// Puts a reset (or freshly opened) connection on its thread's idle list.
    fn pool_idle(&self, b: Backend) {
        let Some(tag) = b.pooled.as_ref() else { return };
        if tag.generation != self.generation() || !self.node_usable(tag.key.node) {
            return;
        }
        let (key, id, thread) = (tag.key.clone(), tag.id, tag.thread);
        let mut st = self.lock();
        let st_ref = &mut *st;
        let Some(p) = st_ref.pools.get_mut(&key) else {
            drop(st);
            return;
        };
        p.greeting = Some(tag.greeting.clone());
        p.idle[thread].push_back(Idle {
            backend: b,
            since: Instant::now(),
        });
        let freed = p.freed.clone();
        if let Some(s) = st_ref.servers.get_mut(&id) {
            s.state = ServerState::Idle;
            s.client = None;
            s.since = Instant::now();
        }
        self.metrics.refresh(st_ref, key.node, &self.cluster);
        drop(st);
        freed.notify_waiters();
    }

    fn set_state(&self, id: u64, state: ServerState) {
        if let Some(s) = self.lock().servers.get_mut(&id) {
            s.state = state;
            s.since = Instant::now();
        }
    }

    /// Starts this thread's upkeep task once.
    fn start_upkeep(self: &Arc<Self>, thread: usize) {
        if !self.upkeep[thread].swap(true, Ordering::AcqRel) {
            tokio::spawn(upkeep::run(Arc::downgrade(self), thread));
        }
    }

    /// Places taken for connections `thread` opens ahead of clients, so that each key it has
    /// served keeps `pool.min_idle` idle ones there (within `pool.size`).
    fn warm_up(&self, thread: usize) -> Vec<(Arc<Key>, u64)> {
        let config = self.config.load_full();
        if config.min_idle == 0 {
            return Vec::new();
        }
        let usable: Vec<bool> = (0..self.cluster.nodes.len())
            .map(|n| self.node_usable(n))
            .collect();
        let mut out = Vec::new();
        let mut st = self.lock();
        let st = &mut *st;
        for p in st.pools.values_mut() {
            if !usable.get(p.key.node).copied().unwrap_or(false) {
                continue;
            }
            let mut have = p.idle[thread].len();
            while have < config.min_idle && p.open < config.size {
                p.open += 1;
                have += 1;
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                st.servers.insert(
                    id,
                    Server {
                        key: p.key.clone(),
                        state: ServerState::Login,
                        client: None,
                        addr: None,
                        local: None,
                        pid: 0,
                        connected: SystemTime::now(),
                        since: Instant::now(),
                    },
                );
                out.push((p.key.clone(), id));
            }
        }
        out
    }

    /// Idle connections of `thread` that must go (expired, their node unusable, opened before
    /// the last topology change), taken out of the pools.
    fn expired(&self, thread: usize) -> Vec<Idle> {
        let config = self.config.load_full();
        let generation = self.generation();
        let nodes: Vec<usize> = {
            let st = self.lock();
            let mut n: Vec<usize> = st.pools.keys().map(|k| k.node).collect();
            n.sort_unstable();
            n.dedup();
            n
        };
        let usable: HashMap<usize, bool> = nodes.iter().map(|&n| (n, self.node_usable(n))).collect();
        let mut out = Vec::new();
        let mut st = self.lock();
        for p in st.pools.values_mut() {
            let ok = usable.get(&p.key.node).copied().unwrap_or(false);
            let list = &mut p.idle[thread];
            let mut kept = VecDeque::with_capacity(list.len());
            for i in list.drain(..) {
                if ok && fresh(&i, generation, &config) {
                    kept.push_back(i);
                } else {
                    out.push(i);
                }
            }
            *list = kept;
        }
        // Pools nobody uses any more are forgotten.
        if config.min_idle == 0 {
            st.pools.retain(|_, p| p.open > 0 || p.waiting > 0);
        }
        out
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
fn quiet(b: &Backend) -> bool {
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
