//! Causal reads (`routing.read_your_writes_by_lsn`): which standby may run a session's read so
//! that it never sees older data than the session wrote (read-your-writes) or already read
//! (monotonic reads).
//!
//! The session carries a WAL position at or past everything it wrote or read on the primary
//! (`Sticky::write_lsn`, learnt by a `pg_current_wal_insert_lsn()` pipelined behind those statements),
//! and the standby it read on since that position was learnt (`Sticky::read_on`): what that read
//! saw is bounded by no known position, so until one is learnt the session's reads stay on that
//! standby (its replay never goes back) or go to the primary. A standby qualifies when its
//! replay position, cached per node ([`crate::replay_position`]), is at or past the session's;
//! when none does, the read waits up to `routing.causal_wait_ms` for a fresher position.

use std::time::{Duration, Instant};

use super::cycle::Which;
use super::{End, Session};

impl Session {
    /// Whether causal reads keep the session's next read off every standby, after waiting up to
    /// `routing.causal_wait_ms` for one to catch up. Only for a request that starts a cycle
    /// outside a transaction (a read, or a BEGIN that may open on a standby).
    pub(super) async fn unreplayed(&mut self) -> Result<bool, End> {
        let routing = &self.shared.config.routing;
        if !routing.read_your_writes_by_lsn
            || !routing.load_balance
            || self.primary_only
            || self.sticky.pinned
        {
            // Off, or its reads run on the primary anyway: nothing to wait for.
            return Ok(false);
        }
        let wait = Duration::from_millis(routing.causal_wait_ms);
        let deadline = Instant::now() + wait;
        // The WAL position of a statement is asked for behind it and answers after the
        // client's ReadyForQuery: its answer is read first (it is on its way), and until it is
        // in, the statement's position is unknown and no standby is known to have it.
        while let Some(b) = self.primary.as_mut().filter(|b| b.capture_lsn > 0) {
            match tokio::time::timeout_at(deadline.into(), b.conn.read_frame()).await {
                Ok(first) => self.on_backend(Which::Primary, first).await?,
                Err(_) => return Ok(true),
            }
        }
        if self.sticky.position_owed {
            // Its read runs on the primary, and the position learnt behind it bounds the COPY.
            return Ok(true);
        }
        Ok(self.standby_unreplayed(deadline).await)
    }

    /// Whether no standby fits the session's position by `deadline`.
    async fn standby_unreplayed(&mut self, deadline: Instant) -> bool {
        let (need, read_on) = (self.sticky.write_lsn, self.sticky.read_on);
        let cluster = self.shared.cluster.clone();
        if need.is_none() {
            // Nothing written nor read on the primary: only where it read binds it.
            return read_on.is_some_and(|r| !cluster.eligible(r));
        }
        let wait = |target: usize| {
            let wait = deadline.saturating_duration_since(Instant::now());
            let cluster = cluster.clone();
            async move {
                !cluster.nodes[target]
                    .replay
                    .wait_for(need.unwrap_or(0), wait)
                    .await
            }
        };
        // The session's own standby first (or the one it read on since its position was
        // learnt): reads spread over the standbys as sessions do, rather than all flocking to
        // whichever standby was polled last.
        let own = read_on.or(self.standby.as_ref().map(|b| b.node));
        if let Some(own) = own.filter(|&i| cluster.eligible(i) && read_on.is_none_or(|r| r == i)) {
            return wait(own).await;
        }
        if read_on.is_some() {
            // It is no longer eligible: the primary.
            return true;
        }
        // No standby yet: one picked as without causal reads (weighted round robin among the
        // eligible ones), waited for, and connected to next.
        let Some(target) = cluster.pick_standby(None) else {
            return true;
        };
        if wait(target).await {
            return true;
        }
        self.sticky.next_standby = Some(target);
        false
    }

    /// Whether standby `node` may run the session's next read: eligible, at or past the
    /// session's position, and the standby it last read on if that read is unbounded.
    pub(super) fn standby_fits(&self, node: usize) -> bool {
        let cluster = &self.shared.cluster;
        cluster.eligible(node)
            && self.sticky.read_on.is_none_or(|r| r == node)
            && self.sticky.write_lsn.is_none_or(|l| cluster.replayed(node, l))
    }

    /// A standby for a new connection of the session (weighted round robin among those that
    /// fit); `None` when none does.
    pub(super) fn pick_standby(&self) -> Option<usize> {
        let picked = self.sticky.next_standby.filter(|&n| self.standby_fits(n));
        match self.sticky.read_on.or(picked) {
            Some(r) => self.standby_fits(r).then_some(r),
            None => self.shared.cluster.pick_standby(self.sticky.write_lsn),
        }
    }

    /// A request was just sent: a read running on a standby is remembered (monotonic reads)
    /// until a position learnt on the primary bounds it.
    pub(super) fn note_standby_read(&mut self) {
        if !self.shared.config.routing.read_your_writes_by_lsn || self.cycle.on() != Some(Which::Standby) {
            return;
        }
        if let Some(b) = &self.standby {
            self.sticky.read_on = Some(b.node);
        }
    }
}
