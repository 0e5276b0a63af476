//! Each serving thread's pool upkeep: closing its idle connections that expired
//! (`pool.idle_timeout`, `pool.max_lifetime`), whose node became unusable, or that were opened
//! before a topology change (checked at once when the elected primary or a fence changes), and
//! opening connections ahead of clients up to `pool.min_idle` per key the thread has served.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::backend;

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
        node: key.node,
        params: &key.params,
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
