//! Each serving thread's pool upkeep: closing its idle connections that expired
//! (`pool.idle_timeout`, `pool.max_lifetime`), whose node became unusable, or that were opened
//! before a topology change (checked at once when the elected primary or a fence changes), and
//! opening connections ahead of clients up to `pool.min_idle` per key the thread has served.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::backend;
use crate::config::secs;

use super::{Idle, Key, Pools, ServerState};

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
    let mut opening = super::Opening {
        pools: pools.clone(),
        key: key.clone(),
        id,
        armed: true,
    };
    let (creds, max) = {
        let st = pools.lock();
        match st.pools.get(&key) {
            Some(p) => (p.creds.clone(), p.max_message),
            None => return Ok(()),
        }
    };
    let config = pools.config.load_full();
    let generation = pools.generation();
    let node = &pools.cluster.nodes[key.node].config;
    let (mut b, greeting) = backend::connect(
        key.node,
        &node.host,
        node.port,
        &key.params,
        key.user(),
        creds.as_ref(),
        max,
        secs(config.connect_timeout),
    )
    .await?;
    opening.armed = false;
    let params = super::parameter_frames(&greeting.frames);
    {
        let mut st = pools.lock();
        if let Some(s) = st.servers.get_mut(&id) {
            s.state = ServerState::Idle;
            s.client = None;
            s.addr = Some(b.addr);
            s.local = b.local;
            s.pid = b.key.0;
            s.since = Instant::now();
        }
    }
    b.pooled = Some(super::Tag {
        pools: pools.clone(),
        id,
        key,
        born: Instant::now(),
        generation,
        thread,
        greeting: params,
    });
    pools.pool_idle(b);
    Ok(())
}
