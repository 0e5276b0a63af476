//! Taking a connection: an idle one of the calling thread, else a new login while the key is
//! under `pool.size` (closing another thread's idle connection to make room at the limit), else
//! waiting for one to free up until `pool.checkout_timeout`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::backend::{self, Backend, BackendError, Greeting};
use crate::config::secs;

use super::{
    close, fresh, parameter_frames, Freed, Idle, Key, PoolConfig, Pools, Request, Server, ServerState, Tag,
};

/// Decrements a pool's waiting count when the wait ends, however it ends.
struct Waiting<'a> {
    pools: &'a Pools,
    key: Arc<Key>,
    client: u64,
    thread: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.pools.lock();
        if let Some(p) = st.pools.get_mut(&self.key) {
            p.waiting -= 1;
            p.waiting_on[self.thread] -= 1;
        }
        if let Some(c) = st.clients.get_mut(&self.client) {
            c.waiting = None;
        }
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
    /// A connection of pool `req.key` for `req.client`: an idle one of this thread when there is one
    /// (no backend round trip), else a new login if the pool has room, else the first to free
    /// up within `pool.checkout_timeout` (then [`BackendError::PoolTimeout`]).
    pub async fn checkout(self: &Arc<Self>, req: &Request<'_>) -> Result<(Backend, Greeting), BackendError> {
        let key = req.key.clone();
        let node = key.node;
        let thread = self.thread();
        self.start_upkeep(thread);
        let config = self.config.load_full();
        let deadline = tokio::time::Instant::now() + secs(config.checkout_timeout);
        let mut freed = {
            let mut st = self.lock();
            self.entry(&mut st, &key, req).freed.clone()
        };
        let mut waiting: Option<Waiting<'_>> = None;
        let mut renewed: Option<Arc<Freed>> = None;
        loop {
            if let Some(n) = renewed.take() {
                freed = n;
            }
            let notified = freed.on[thread].notified();
            tokio::pin!(notified);
            let generation = self.generation();
            let usable = self.node_usable(node);
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
                        // At the limit: an idle connection of another thread makes room, unless
                        // a client waits on that thread: it was woken for that connection and
                        // takes it without a login. Closing it would cost a login per hand-over
                        // whenever a woken waiter finds its connection taken by a client of its
                        // own thread that came first.
                        let other = (0..self.threads)
                            .find(|&t| t != thread && !p.idle[t].is_empty() && p.waiting_on[t] == 0);
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
                            p.waiting_on[thread] += 1;
                            if let Some(c) = st.clients.get_mut(&req.client) {
                                c.waiting = Some((Instant::now(), key.clone()));
                            }
                        }
                    }
                }
                step
            };
            // Closed outside the lock (each tag's drop takes it).
            drop(closing);
            match step {
                Step::Reuse(b) => {
                    self.metrics.checkout(&self.cluster, node, true);
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
                        close::close_and_wait(i.backend, secs(config.connect_timeout)).await;
                    }
                    return self.open(key, id, thread, req, &config).await;
                }
                Step::Wait => {
                    if waiting.is_none() {
                        waiting = Some(Waiting {
                            pools: self,
                            key: key.clone(),
                            client: req.client,
                            thread,
                        });
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let mut st = self.lock();
                        if let Some(p) = st.pools.get_mut(&key) {
                            p.timeouts += 1;
                        }
                        drop(st);
                        self.metrics.timeout(&self.cluster, node);
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
        self.metrics.checkout(&self.cluster, key.node, false);
        Ok((b, greeting))
    }

    /// Logs a connection in for place `id` of pool `key` (the place is given back if the login
    /// fails), shows it in SHOW SERVERS as `state`, and tags it as the pool's.
    pub(super) async fn login(
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
            key.node,
            self.cluster.target(key.node),
            &key.params,
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
}
