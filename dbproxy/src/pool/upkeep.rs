//! Each serving thread's pool upkeep: closing its idle connections that expired
//! (`pool.idle_timeout`, `pool.max_lifetime`), whose node became unusable, or that were opened
//! before a topology change (checked at once when the elected primary or a fence changes), and
//! opening connections ahead of clients up to `pool.min_idle` per key the thread has served.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::backend;

use super::{fresh, Idle, Key, Pools, Server, ServerState};

/// How often expiry and `min_idle` are looked at when nothing changes.
const PERIOD: Duration = Duration::from_secs(1);

/// Runs until the pools are gone (the proxy stopped) or the thread's runtime ends.
pub(super) async fn run(pools: Weak<Pools>, thread: usize) {
    let Some(mut watch) = pools.upgrade().map(|p| p.cluster.subscribe()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            r = watch.changed() => if r.is_err() { return },
        }
        let Some(pools) = pools.upgrade() else { return };
        let gone: Vec<Idle> = pools.expired(thread);
        if !gone.is_empty() {
            tracing::debug!(
                thread,
                closed = gone.len(),
                "closing expired or stale pooled connections"
            );
        }
        // Closed outside the lock: each tag's drop takes it.
        drop(gone);
        for (key, id) in pools.warm_up(thread) {
            if let Err(e) = open_idle(&pools, key, id, thread).await {
                tracing::debug!(error = %e, "cannot open a pooled connection ahead of clients");
            }
        }
    }
}

/// Logs one connection in for `key` without a client and pools it.
async fn open_idle(
    pools: &Arc<Pools>,
    key: Arc<Key>,
    id: u64,
    thread: usize,
) -> Result<(), backend::BackendError> {
    let (creds, max_message) = {
        let st = pools.lock();
        match st.pools.get(&key) {
            Some(p) => (p.creds.clone(), p.max_message),
            None => {
                // The pool went away before the login: give its place back.
                drop(st);
                pools.released(&key, id);
                return Ok(());
            }
        }
    };
    let config = pools.config.load_full();
    let req = super::Request {
        key: key.clone(),
        user: key.user(),
        creds: creds.as_ref(),
        max_message,
        client: 0,
    };
    let (b, _) = pools
        .login(key.clone(), id, thread, &req, &config, ServerState::Idle)
        .await?;
    pools.pool_idle(b);
    Ok(())
}

impl Pools {
    /// Starts this thread's upkeep task once.
    pub(super) fn start_upkeep(self: &Arc<Self>, thread: usize) {
        if !self.upkeep[thread].swap(true, Ordering::AcqRel) {
            tokio::spawn(run(Arc::downgrade(self), thread));
        }
    }

    /// Places taken for connections `thread` opens ahead of clients, so that each key it has
    /// served keeps `pool.min_idle` idle ones there (within `pool.size`).
    pub(super) fn warm_up(&self, thread: usize) -> Vec<(Arc<Key>, u64)> {
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
    pub(super) fn expired(&self, thread: usize) -> Vec<Idle> {
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
