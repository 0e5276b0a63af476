//! The failover manager's side of the cluster record: every change of the elected primary or of
//! a fence is stored first ([`Manager::commit`]) and routed by after; start-up decides by the
//! record ([`Manager::discover`]); while nothing is elected, the node that may be primary is
//! elected ([`Manager::adopt`]).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::Manager;
use crate::cluster::Role;
use crate::failover;
use crate::record::{ClusterRecord, RecordError, Step};

/// What a start-up probe saw of a node: whether it is a primary, and its newest timeline;
/// `None` when it did not answer.
type Seen = Option<(bool, Option<u32>)>;

impl Manager {
    /// The cluster record as last stored.
    pub fn cluster_record(&self) -> ClusterRecord {
        self.record.lock().expect("record poisoned").clone()
    }

    /// The record and where it is kept, for `/status`.
    pub fn record_json(&self) -> Value {
        let r = self.cluster_record();
        json!({
            "location": self.store.location(),
            "term": r.term,
            "primary": r.primary,
            "timeline": r.timeline,
            "fenced": r.fenced,
            "operation": r.operation,
            "coordination": self.coord.get().map(|c| c.status_json()),
        })
    }

    /// Changes the record with `f` (given the new term) and stores it durably, unless `f` changed
    /// nothing. Callers change routing only after this succeeded.
    pub(super) async fn commit(&self, f: impl FnOnce(&mut ClusterRecord, u64)) -> Result<(), RecordError> {
        // With several instances only the leader writes (etcd's guard checks it again).
        if !self.may_act() {
            return Err(RecordError::NotLeader);
        }
        let current = self.cluster_record();
        let mut next = current.clone();
        let term = current.term + 1;
        f(&mut next, term);
        if next == current {
            return Ok(());
        }
        next.term = term;
        self.store.store(current.term, &next).await?;
        tracing::info!(
            term, primary = ?next.primary, timeline = ?next.timeline, fenced = ?next.fenced,
            "cluster record written"
        );
        *self.record.lock().expect("record poisoned") = next;
        Ok(())
    }

    /// The index of the node named `name`.
    pub(super) fn index_of(&self, name: &str) -> Option<usize> {
        self.cluster.nodes.iter().position(|n| n.config.name == name)
    }

    pub(super) fn name_of(&self, i: usize) -> String {
        self.cluster.nodes[i].config.name.clone()
    }

    /// The primary the record names, as a node index.
    pub(super) fn recorded_primary(&self) -> Option<usize> {
        self.cluster_record()
            .primary
            .as_deref()
            .and_then(|n| self.index_of(n))
    }

    /// The primary to fail over from: the elected one once it is down; while nothing is elected
    /// and no operation runs, the recorded one while it is not a usable primary (lost at
    /// start-up, or a failover from it failed and is retried).
    pub(super) fn lost_primary(&self) -> Option<usize> {
        let c = &self.cluster;
        if let Some(p) = c.elected() {
            return (!c.status(p).healthy).then_some(p);
        }
        if c.busy.load(Ordering::Acquire) {
            return None;
        }
        self.recorded_primary().filter(|&p| {
            let s = c.status(p);
            !s.healthy || s.role != Role::Primary || c.is_fenced(p)
        })
    }

    /// Records `new` as the primary with `old` fenced, then switches routing to it in one step.
    pub(super) async fn switch(&self, new: usize, old: usize) -> Result<(), RecordError> {
        // A node fenced by `sql` earlier (read-only by ALTER SYSTEM), since rejoined and now
        // promoted, must take writes.
        if let Err(e) = failover::unquiesce(&self.node_ref(new), &self.cred()).await {
            tracing::warn!(node = %self.name_of(new), error = %e, "cannot reset default_transaction_read_only");
        }
        let timeline = failover::primary_timeline(&self.node_ref(new), &self.cred())
            .await
            .ok()
            .flatten();
        let (new_name, old_name) = (self.name_of(new), self.name_of(old));
        crate::fault::reached("promoted");
        self.commit(|r, term| {
            r.primary = Some(new_name.clone());
            r.timeline = timeline;
            r.fenced.remove(&new_name);
            r.fenced.insert(old_name, term);
            if let Some(op) = r.operation.as_mut() {
                op.step = Step::Switched;
            }
        })
        .await?;
        self.cluster.switch_primary(new, old);
        crate::fault::reached("switched");
        Ok(())
    }

    /// Records node `i` as the primary (on `timeline`, if known) with `fence` fenced, then fences
    /// and elects in the routing.
    pub(super) async fn elect_recorded(
        &self,
        i: usize,
        timeline: Option<u32>,
        fence: &[usize],
    ) -> Result<(), RecordError> {
        let name = self.name_of(i);
        let fenced: Vec<String> = fence.iter().map(|&f| self.name_of(f)).collect();
        self.commit(|r, term| {
            r.primary = Some(name.clone());
            if timeline.is_some() {
                r.timeline = timeline;
            }
            r.fenced.remove(&name);
            for f in fenced {
                r.fenced.entry(f).or_insert(term);
            }
        })
        .await?;
        for &f in fence {
            self.cluster.fence(f);
        }
        self.cluster.elect(i);
        Ok(())
    }

    /// Adds nodes the routing fenced on its own (a false primary the health checks found) to the
    /// record, so a restart keeps them fenced.
    pub(super) async fn persist_fences(&self) -> Result<(), RecordError> {
        let record = self.cluster_record();
        let missing: Vec<String> = (0..self.cluster.nodes.len())
            .filter(|&i| self.cluster.is_fenced(i))
            .map(|i| self.name_of(i))
            .filter(|n| !record.fenced.contains_key(n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.commit(|r, term| {
            for n in missing {
                r.fenced.insert(n, term);
            }
        })
        .await
    }

    /// While nothing is elected and no operation runs: elects the node that reports primary and
    /// may be elected: the recorded primary once it answers again, or, with no primary recorded
    /// (first start, none found), the first unfenced healthy node that reports primary.
    pub(super) async fn adopt(&self) -> Result<(), RecordError> {
        let _op = self.op.lock().await;
        let c = &self.cluster;
        if c.elected().is_some() || c.busy.load(Ordering::Acquire) {
            return Ok(());
        }
        let usable = |i: usize| {
            let s = c.status(i);
            !c.is_fenced(i) && s.healthy && s.reachable && s.role == Role::Primary
        };
        let pick = match (self.cluster_record().primary.is_some(), self.recorded_primary()) {
            (true, p) => {
                // Only the recorded primary may come back as the primary; a node that claims the
                // role meanwhile was never elected.
                for i in (0..c.nodes.len()).filter(|&i| Some(i) != p && usable(i)) {
                    tracing::error!(node = %self.name_of(i), "node claims to be primary without being elected: fenced");
                    c.fence(i);
                }
                self.persist_fences().await?;
                p.filter(|&p| usable(p))
            }
            (false, _) => (0..c.nodes.len()).find(|&i| usable(i)),
        };
        let Some(i) = pick else { return Ok(()) };
        let timeline = failover::primary_timeline(&self.node_ref(i), &self.cred())
            .await
            .ok()
            .flatten();
        let recorded = self.cluster_record().timeline.unwrap_or(0);
        if timeline.is_some_and(|t| t < recorded) {
            tracing::error!(node = %self.name_of(i), ?timeline, recorded, "a primary on an older timeline than the record's is not elected: fenced");
            c.fence(i);
            return self.persist_fences().await;
        }
        tracing::info!(node = %self.name_of(i), "elected primary");
        self.elect_recorded(i, timeline, &[]).await
    }

    /// Decides who is primary at start-up, before the first client is served. The record's
    /// fences hold whatever the nodes say. With a recorded primary: it is elected if it answers as
    /// a primary on at least the recorded timeline; otherwise it is lost and its index is returned,
    /// for [`Manager::run`] to fail over from at once (no node of an older timeline is elected).
    /// With no record (first start): among the nodes not in recovery, the one on the newest
    /// timeline wins (ties go to config order) and every other node claiming to be primary is
    /// fenced; a standby that has seen a newer timeline than every primary means the real primary
    /// is missing, and nothing is elected until a node reports primary. The outcome is recorded
    /// before it is routed by; an error here means the record cannot be written.
    pub async fn discover(&self) -> Result<Option<usize>, RecordError> {
        // A promotion left half-done (by this instance before a crash, or by another leader)
        // is finished or rolled back before anything is decided from the record.
        self.resolve_pending().await?;
        let record = self.cluster_record();
        for name in record.fenced.keys() {
            match self.index_of(name) {
                Some(i) => self.cluster.fence(i),
                None => {
                    tracing::warn!(node = %name, "the cluster record fences a node that is not configured")
                }
            }
        }
        let probes = (0..self.cluster.nodes.len()).map(|i| {
            let node = self.node_ref(i);
            let cred = self.cred();
            async move {
                let limit = cred.connect_timeout * 2;
                let r = tokio::time::timeout(limit, failover::node_timeline(&node, &cred)).await;
                (i, r.ok().and_then(Result::ok))
            }
        });
        let found = futures_util::future::join_all(probes).await;
        let mut primaries: Vec<(usize, u32)> = Vec::new();
        let mut newest_standby = 0;
        for (i, r) in &found {
            // What a node answered is its role from now on: before its first health check the
            // table only assumes one (the first node primary), and a failover decided at once
            // (the recorded primary lost) picks its candidates and the standbys to re-point by
            // role. A standby taken for the primary would be left following the lost one.
            if let Some((primary, _)) = r {
                let role = if *primary { Role::Primary } else { Role::Standby };
                self.cluster.update(*i, |s| s.role = role);
            }
            match r {
                Some((true, tl)) => primaries.push((*i, tl.unwrap_or(0))),
                Some((false, tl)) => newest_standby = newest_standby.max(tl.unwrap_or(0)),
                None => tracing::warn!(node = %self.name_of(*i), "unreachable at start-up"),
            }
        }
        if record.primary.is_some() {
            return self.discover_recorded(&record, &found, &primaries).await;
        }
        let best = primaries
            .iter()
            .copied()
            .filter(|&(i, _)| !self.cluster.is_fenced(i))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((p, tl)) = best else {
            tracing::warn!("no node reports itself primary at start-up; writes wait until one does");
            return Ok(None);
        };
        if newest_standby > tl {
            tracing::error!(
                node = %self.name_of(p), timeline = tl, standby_timeline = newest_standby,
                "the only primary found is on an older timeline than a standby: it is a stale primary; fenced"
            );
            self.cluster.fence(p);
            self.persist_fences().await?;
            return Ok(None);
        }
        let others: Vec<usize> = primaries.iter().map(|x| x.0).filter(|&i| i != p).collect();
        for &i in &others {
            tracing::error!(
                node = %self.name_of(i), primary = %self.name_of(p),
                "a second node claims to be primary: fenced"
            );
        }
        tracing::info!(node = %self.name_of(p), timeline = tl, "primary found");
        self.elect_recorded(p, Some(tl), &others).await?;
        Ok(None)
    }

    /// [`Manager::discover`] when the record names a primary.
    pub(super) async fn discover_recorded(
        &self,
        record: &ClusterRecord,
        found: &[(usize, Seen)],
        primaries: &[(usize, u32)],
    ) -> Result<Option<usize>, RecordError> {
        let name = record.primary.clone().unwrap_or_default();
        let Some(p) = self.index_of(&name) else {
            tracing::error!(node = %name, "the cluster record's primary is not configured; nothing is elected");
            return Ok(None);
        };
        let recorded_tl = record.timeline.unwrap_or(0);
        let others: Vec<usize> = primaries.iter().map(|x| x.0).filter(|&i| i != p).collect();
        for &i in &others {
            if !self.cluster.is_fenced(i) {
                tracing::error!(node = %self.name_of(i), primary = %name, "a node the record does not elect claims to be primary: fenced");
            }
        }
        match found[p].1 {
            Some((true, tl)) if tl.unwrap_or(u32::MAX) >= recorded_tl => {
                tracing::info!(node = %name, timeline = ?tl, term = record.term, "the recorded primary answers as primary");
                self.elect_recorded(p, tl, &others).await?;
                return Ok(None);
            }
            Some((true, tl)) => tracing::error!(
                node = %name, timeline = ?tl, recorded_timeline = recorded_tl,
                "the recorded primary is on an older timeline than recorded: failing over"
            ),
            Some((false, _)) => {
                tracing::error!(node = %name, "the recorded primary is in recovery now: failing over")
            }
            None => {
                tracing::error!(node = %name, "the recorded primary is unreachable: failing over among the standbys");
                // Down from the start, so the health checks begin from there.
                self.cluster.update(p, |s| {
                    s.healthy = false;
                    s.reachable = false;
                });
            }
        }
        for &i in &others {
            self.cluster.fence(i);
        }
        self.persist_fences().await?;
        Ok(Some(p))
    }
}
