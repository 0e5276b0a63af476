//! The backend side of a session: its primary and standby connections (opened lazily,
//! replaced after a failover, lost mid-request), and sending a request to one of them with
//! what that connection lacks first: statements closed elsewhere, session settings not yet
//! applied, and (lazily) the Parse of each prepared statement it uses.

use std::time::Duration;

use bytes::BufMut;

use crate::backend::{self, Backend, BackendError};
use crate::cluster::{Decision, Role};
use crate::config::secs;
use crate::pool::PoolMode;
use crate::protocol::frontend::Kind;
use crate::protocol::{error as perror, extended, simple, status, Frame, FrontendMessage, TxStatus};

use super::cycle::{Copy, Cycle, Mode, Phase, Which};
use super::login::connect_primary;
use super::stmt::{fingerprint, Statements};
use super::window::Window;
use super::{batch, End, Session};

/// Before `f` goes to backend `b`: a statement it uses that `b` lacks (or holds as another
/// Parse made it: another client's of the same name, in transaction pooling) is prepared there
/// (any stale copy closed first), both answers to be swallowed.
fn prepare_lazily(b: &mut Backend, stmts: &Statements, name: &str) {
    let Some(st) = stmts.get(name) else {
        return;
    };
    if b.prepared.get(name) == Some(&st.fp) {
        return;
    }
    let wbuf = &mut b.conn.wbuf;
    if !name.is_empty() {
        extended::encode_close_statement(name, wbuf);
        b.swallow_close += 1;
    }
    wbuf.put_slice(st.parse.raw());
    b.swallow_parse += 1;
    b.prepared.insert(name.to_string(), st.fp);
}

/// Whether statement `name` was parsed earlier in the batch being sent.
fn parsed(name: &str, unnamed: bool, named: &[&str]) -> bool {
    if name.is_empty() {
        unnamed
    } else {
        named.contains(&name)
    }
}

/// Transaction pooling: before a Bind or Describe of statement `name`, which this client has not
/// prepared, a statement of that name another client left on `b` is closed (answer swallowed),
/// so the server answers 26000 as it would to this client alone, instead of running it.
fn forget_foreign(b: &mut Backend, stmts: &Statements, name: &str) {
    if stmts.get(name).is_none() && b.prepared.remove(name).is_some() {
        extended::encode_close_statement(name, &mut b.conn.wbuf);
        b.swallow_close += 1;
    }
}

/// What a connection that carries another client's session settings runs before this client's
/// request (transaction pooling): back to the defaults of its login, role included (`RESET ALL`
/// leaves the role and the session authorization alone).
const RESET_SETTINGS: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL";

/// Before backend `b` runs a request of client `owner`: when the session settings applied there
/// are another client's, they are reset first (answer swallowed), and the client's own are
/// applied from the start.
fn adopt(b: &mut Backend, owner: u64) {
    if b.sets_owner == owner {
        return;
    }
    if b.sets_applied > 0 {
        simple::encode_query(RESET_SETTINGS, &mut b.conn.wbuf);
        b.swallow_rfq += 1;
    }
    b.sets_applied = 0;
    b.sets_owner = owner;
}

impl Session {
    /// Whether the primary connection goes to a node that is no longer the elected primary.
    fn primary_stale(&self) -> bool {
        let cluster = &self.shared.cluster;
        self.primary
            .as_ref()
            .is_some_and(|b| cluster.is_fenced(b.node) || cluster.elected().is_some_and(|e| e != b.node))
    }

    /// The elected primary changed or a node was fenced: a session whose primary connection is
    /// now stale drops it when idle (and reconnects when next needed); one whose request or
    /// transaction runs there loses it.
    pub(super) async fn on_topology_change(&mut self) -> Result<(), End> {
        if !self.primary_stale() {
            return Ok(());
        }
        if self.primary_busy() || self.sticky.pinned {
            return self.lost_primary().await;
        }
        tracing::info!("primary changed; the session reconnects on its next request");
        self.primary = None;
        Ok(())
    }

    /// The primary connection failed or was fenced while it held the session's request, its
    /// transaction, or state that cannot be rebuilt elsewhere (temporary tables, LISTEN,
    /// advisory locks). An autocommit request gets an ERROR 08006 saying its outcome is unknown and
    /// the session goes on; otherwise the session ends with a FATAL 08006, never a hang.
    async fn lost_primary(&mut self) -> Result<(), End> {
        let metrics = &self.shared.cluster.metrics;
        metrics.error("backend");
        if let Some(b) = self.primary.take() {
            self.shared.cluster.suspect(b.node);
        }
        let autocommit = self.tx.idle()
            && matches!(
                self.cycle,
                Cycle::Running {
                    on: Which::Primary,
                    awaiting: true,
                    copy: Copy::Off
                }
            )
            && !self.sticky.pinned;
        if autocommit {
            perror::encode_error(
                "ERROR",
                "08006",
                "server closed the connection unexpectedly while the request ran; whether it \
                 took effect is unknown (the session goes on, on the primary in place then)",
                &mut self.client.wbuf,
            );
            status::encode_ready(self.tx.status.byte(), &mut self.client.wbuf);
            self.cycle = Cycle::Idle;
            self.close_window();
            self.holdback.clear();
            self.settings.abandon();
            *self.cancel.lock().expect("slot poisoned") = None;
            self.cancel_key = None;
            return self.client.flush().await.map_err(|_| End);
        }
        let message = if self.tx.on_primary() {
            "terminating connection because the primary server was lost during the transaction"
        } else {
            "terminating connection because the primary server was lost and this session's \
             state (temporary tables, LISTEN, advisory locks) cannot be moved"
        };
        self.cycle = Cycle::Idle;
        self.end("08006", message).await;
        Err(End)
    }

    /// The session's state can no longer move to another connection: it keeps to the primary
    /// (and, in transaction pooling, to its primary connection) until it leaves.
    pub(super) fn pin(&mut self) {
        if self.sticky.pinned {
            return;
        }
        self.sticky.pinned = true;
        let node = self
            .primary
            .as_ref()
            .map(|b| b.node)
            .or_else(|| self.shared.cluster.elected());
        if let Some(node) = node {
            self.shared.pools.pinned(self.member.id, node);
        }
    }

    /// Transaction pooling: a server connection that holds neither the request in flight nor
    /// the client's open transaction goes back to the pool once nothing is pending on it: both
    /// between two transactions (after ReadyForQuery `I`), and the other connection of a
    /// transaction (the standby after a transaction moved to the primary at its first write,
    /// the primary while a transaction reads on a standby). A pinned session keeps its primary
    /// connection (and so does one whose login was relayed: nothing else to log in with). The
    /// cancel slot is emptied with the connection it names, so a late CancelRequest cannot reach
    /// the next client's query.
    pub(super) fn release_between(&mut self) {
        if self.cycle.on().is_some() || self.shared.config.pool.mode != PoolMode::Transaction {
            return;
        }
        let pools = &self.shared.pools;
        let keep_primary = self.sticky.pinned || self.primary_only || self.tx.on_primary();
        let keep_standby = self.tx.on_standby();
        let mut released = [None, None];
        if let Some(b) = self.primary.take_if(|b| !keep_primary && crate::pool::quiet(b)) {
            released[0] = Some(b.key);
            pools.release(b);
        }
        if let Some(b) = self.standby.take_if(|b| !keep_standby && crate::pool::quiet(b)) {
            released[1] = Some(b.key);
            pools.release(b);
        }
        if self.cancel_key.is_some() && released.contains(&self.cancel_key) {
            self.cancel_key = None;
            *self.cancel.lock().expect("slot poisoned") = None;
        }
    }

    /// Makes sure a usable standby connection exists; false when none can be had.
    async fn ensure_standby(&mut self) -> bool {
        if let Some(b) = &self.standby {
            if self.tx.on_standby() || self.standby_fits(b.node) {
                return true;
            }
            self.standby = None;
        }
        let cluster = self.shared.cluster.clone();
        let Some(i) = self.pick_standby() else {
            return false;
        };
        let request = crate::pool::Request {
            key: self.pool_keys.get(i, &self.params),
            user: &self.user,
            creds: self.creds.as_ref(),
            max_message: self.shared.config.limits.max_message_size,
            client: self.member.id,
        };
        match self.shared.pools.checkout(&request).await {
            Ok((b, _greeting)) => {
                self.standby = Some(b);
                true
            }
            Err(e) => {
                cluster.metrics.error("backend");
                let name = &cluster.nodes[i].config.name;
                tracing::warn!(node = %name, error = %e, "cannot open a standby connection");
                false
            }
        }
    }

    /// Answers a request that cannot be sent with an ERROR (and ReadyForQuery when it ended
    /// with Sync); the session goes on.
    async fn refuse(&mut self, code: &str, message: &str, mode: Mode) -> Result<(), End> {
        perror::encode_error("ERROR", code, message, &mut self.client.wbuf);
        if mode == Mode::Sync {
            status::encode_ready(self.tx.status.byte(), &mut self.client.wbuf);
        }
        self.client.flush().await.map_err(|_| End)
    }

    /// Sends `frames` to backend `target` (the standby when possible), preparing what it lacks.
    /// `follow`: the request may change settings or the transaction (extended-protocol
    /// batches always are followed; a simple Query when it holds such statements).
    /// `capture_lsn`: the primary's WAL position is asked for behind it (read-your-writes).
    /// `open`: statements that open the session's transaction there first (a BEGIN and the
    /// savepoints in force, for a transaction that read on a standby), answers swallowed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn dispatch(
        &mut self,
        mut target: Which,
        frames: Vec<Frame>,
        mode: Mode,
        follow: bool,
        capture_lsn: bool,
        open: &[String],
    ) -> Result<(), End> {
        let fresh = self.cycle.on().is_none();
        if target == Which::Standby && fresh && self.primary_only {
            // Nothing to log in to a standby with (a relayed md5 or SCRAM login): the primary
            // answers every request.
            target = Which::Primary;
        } else if target == Which::Standby && fresh && !self.ensure_standby().await {
            if self.tx.on_standby() {
                // The standby holding a transaction is gone.
                return Err(self.backend_gone().await);
            }
            if !self.shared.config.routing.fallback_to_primary {
                return self
                    .refuse("08006", "no standby is available for this read", mode)
                    .await;
            }
            self.shared.cluster.metrics.decision(Decision::PrimaryFallback);
            target = Which::Primary;
        } else if target == Which::Standby && fresh && self.tx.idle() {
            self.shared.cluster.metrics.decision(Decision::Standby);
        }
        let idle = self.tx.idle() && fresh;
        if target == Which::Primary && fresh {
            if self.primary_stale() {
                if self.primary_busy() || self.sticky.pinned {
                    return self.lost_primary().await;
                }
                self.primary = None;
            }
            if self.primary.is_none() {
                let client = self.member.id;
                let (params, creds) = (&self.params, self.creds.as_ref());
                let ids = (client, &mut self.pool_keys);
                match connect_primary(&self.shared, params, &self.user, creds, ids, &mut self.watch).await {
                    Ok((b, _greeting)) => self.primary = Some(b),
                    Err(BackendError::Refused(f)) => {
                        self.client.wbuf.put_slice(f.raw());
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
                        return Err(End);
                    }
                    Err(e @ BackendError::PoolTimeout(_)) => {
                        self.shared.cluster.metrics.error("backend");
                        let msg = format!("sorry, too many clients already: {e}");
                        return self.refuse("53300", &msg, mode).await;
                    }
                    Err(e) => {
                        self.shared.cluster.metrics.error("backend");
                        let msg = format!("could not connect to the primary server: {e}");
                        return self.refuse("08006", &msg, mode).await;
                    }
                }
            }
        }
        let stale_primary = self.primary_stale();
        let (b, other) = match target {
            Which::Primary => match self.primary.as_mut() {
                Some(b) => (b, self.standby.as_mut()),
                None => return Err(self.backend_gone().await),
            },
            Which::Standby => (
                self.standby.as_mut().expect("ensured above"),
                self.primary.as_mut(),
            ),
        };
        let mut other = other;
        // A named statement prepared on a standby is prepared on the primary too, at once and in
        // the client's order (answers swallowed), unless the primary connection is stale: the
        // primary's pg_prepared_statements, where the client reads it, then lists the client's
        // statements in their prepare_time order, as without dbproxy.
        let mut mirrored = false;
        // The statements this batch itself parses: what later messages of the batch name is
        // that Parse (the session's copy already holds the batch's last Parse of each name).
        // Without an allocation for the unnamed statement, which drivers re-parse every time.
        let mut parsed_unnamed = false;
        let mut parsed_named: Vec<&str> = Vec::new();
        let mirror = target == Which::Standby && !stale_primary;
        // Statements the client closed elsewhere, and settings not applied here yet.
        if !b.to_close.is_empty() {
            for name in b.to_close.drain(..) {
                extended::encode_close_statement(&name, &mut b.conn.wbuf);
            }
            extended::encode_sync(&mut b.conn.wbuf);
            b.swallow_rfq += 1;
        }
        let owner = self.member.id;
        adopt(b, owner);
        for s in &self.sets[b.sets_applied..] {
            simple::encode_query(s, &mut b.conn.wbuf);
            b.swallow_rfq += 1;
        }
        b.sets_applied = self.sets.len();
        let transaction_mode = self.shared.config.pool.mode == PoolMode::Transaction;
        for s in open {
            simple::encode_query(s, &mut b.conn.wbuf);
            b.swallow_rfq += 1;
        }
        let settings = &mut self.settings;
        if fresh {
            settings.start(self.tx.status.byte(), follow || settings.needed());
        }
        for f in &frames {
            // Only the messages whose fields matter here are parsed (again: each was checked as
            // it arrived from the client), so a Query's text is not scanned when nothing
            // follows it.
            let read = match Kind::of(f) {
                Kind::Query => settings.active(),
                Kind::Parse | Kind::Bind | Kind::Execute | Kind::Describe | Kind::Close => true,
                _ => false,
            };
            if !read {
                b.conn.wbuf.put_slice(f.raw());
                continue;
            }
            match FrontendMessage::parse(f) {
                Ok(FrontendMessage::Query { sql }) if settings.active() => {
                    settings.query(self.shared.classifier.steps_bytes(sql, self.encoding));
                }
                Ok(FrontendMessage::Execute { portal }) => settings.execute(portal),
                Ok(FrontendMessage::Parse { name, .. }) => {
                    let fp = fingerprint(f);
                    if name.is_empty() {
                        parsed_unnamed = true;
                    } else {
                        parsed_named.push(name);
                    }
                    if transaction_mode && !name.is_empty() && b.prepared.contains_key(name) {
                        // In transaction pooling a statement of that name here may be another
                        // client's (or one this client closed on another connection): closed
                        // first, so the client's Parse is not refused (42P05) for it.
                        extended::encode_close_statement(name, &mut b.conn.wbuf);
                        b.swallow_close += 1;
                    }
                    if name.is_empty() {
                        if let Some(o) = other.as_mut() {
                            o.prepared.remove("");
                        }
                    } else if let Some(p) = other
                        .as_mut()
                        .filter(|p| mirror && p.prepared.get(name) != Some(&fp))
                    {
                        adopt(p, owner);
                        let wbuf = &mut p.conn.wbuf;
                        for s in &self.sets[p.sets_applied..] {
                            simple::encode_query(s, wbuf);
                            p.swallow_rfq += 1;
                        }
                        p.sets_applied = self.sets.len();
                        p.to_close.retain(|c| c != name);
                        // Any stale copy is closed first, as a lazy prepare does.
                        extended::encode_close_statement(name, wbuf);
                        wbuf.put_slice(f.raw());
                        extended::encode_sync(wbuf);
                        p.swallow_rfq += 1;
                        p.prepared.insert(name.to_string(), fp);
                        mirrored = true;
                    }
                    b.prepared.insert(name.to_string(), fp);
                }
                Ok(FrontendMessage::Bind(bind)) => {
                    let parsed_here = parsed(bind.stmt, parsed_unnamed, &parsed_named);
                    if transaction_mode && !parsed_here {
                        forget_foreign(b, &self.stmts, bind.stmt);
                    }
                    if !parsed_here {
                        prepare_lazily(b, &self.stmts, bind.stmt);
                    }
                    let step = self
                        .stmts
                        .get(bind.stmt)
                        .map_or(crate::classify::Step::Other, |s| s.bound(&bind));
                    settings.bind(bind.portal, step);
                }
                Ok(FrontendMessage::Describe(t)) => {
                    if let Some(name) = t.statement() {
                        let parsed_here = parsed(name, parsed_unnamed, &parsed_named);
                        if transaction_mode && !parsed_here {
                            forget_foreign(b, &self.stmts, name);
                        }
                        if !parsed_here {
                            prepare_lazily(b, &self.stmts, name);
                        }
                        // A Describe of a statement: its ParameterDescription comes back in turn.
                        self.stmts.describe_sent(name);
                    }
                }
                Ok(FrontendMessage::Close(t)) => {
                    if let Some(name) = t.statement() {
                        b.prepared.remove(name);
                        if let Some(o) = other.as_mut() {
                            if o.prepared.remove(name).is_some() {
                                o.to_close.push(name.to_string());
                            }
                        }
                    }
                }
                _ => {}
            }
            b.conn.wbuf.put_slice(f.raw());
        }
        if capture_lsn && target == Which::Primary && mode == Mode::Sync {
            // Where WAL is inserted, not where it is written: an asynchronous commit
            // (`synchronous_commit = off`) is visible before its WAL is written.
            simple::encode_query("select pg_current_wal_insert_lsn()::text", &mut b.conn.wbuf);
            b.capture_lsn += 1;
        }
        let node = b.node;
        if self.cancel_key != Some(b.key) {
            // Left in place after the request ends: a late CancelRequest then reaches a backend
            // with nothing to cancel (PostgreSQL ignores it), as it would without dbproxy.
            *self.cancel.lock().expect("slot poisoned") = Some((b.addr, b.key.0, b.key.1));
            self.cancel_key = Some(b.key);
        }
        if mirrored {
            if let Some(p) = other {
                // Before the standby's request, so the primary prepares in the client's order;
                // a failed write shows when the primary connection is next read.
                let _ = p.conn.flush().await;
            }
        }
        let written = b.conn.flush().await;
        let role = match target {
            Which::Standby => Role::Standby,
            Which::Primary => Role::Primary,
        };
        self.shared.cluster.count(node, role);
        if fresh {
            self.close_window();
            self.holdback.clear();
        }
        // Outside a transaction, a standby's 25006 is replayed on the primary while nothing
        // executed of the cycle reached the client; in a transaction whose reads run on the
        // standby (not failed), the transaction then moves to the primary with the request.
        let movable =
            fresh && self.tx.status == TxStatus::InTransaction && self.split.phase() != Phase::Whole;
        if target == Which::Standby && (idle || movable || self.replay.is_some()) {
            self.replay
                .get_or_insert_with(|| std::mem::take(&mut self.spare_window))
                .push(frames);
        } else {
            self.close_window();
            self.batch.recycle(frames);
        }
        self.cycle.sent(target, mode);
        if written.is_err() {
            return Err(self.backend_gone().await);
        }
        Ok(())
    }

    /// Ends the replay window; its emptied buffers are kept for the next cycle.
    pub(super) fn close_window(&mut self) {
        if let Some(mut w) = self.replay.take() {
            while let Some(h) = w.batches.pop_front() {
                self.batch.recycle(h.frames);
            }
            if w.batches.capacity() <= batch::MAX_SPARE {
                self.spare_window = w;
            }
        }
    }

    /// Frames arrived from backend `w` (the first one read, then those already buffered), or
    /// its connection ended.
    pub(super) async fn on_backend(
        &mut self,
        w: Which,
        first: Result<Option<Frame>, BackendError>,
    ) -> Result<(), End> {
        let mut next = first;
        loop {
            match next {
                Ok(Some(f)) => match self.on_backend_frame(w, f) {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "backend broke the protocol");
                        return self.backend_lost(w).await;
                    }
                },
                Ok(None) | Err(_) => return self.backend_lost(w).await,
            }
            let Some(b) = self.backend(w) else { break };
            next = match b.conn.buffered() {
                Ok(Some(f)) => Ok(Some(f)),
                Ok(None) => break,
                Err(e) => Err(BackendError::Protocol(e)),
            };
        }
        if let Some(b) = self.standby.as_mut().filter(|b| !b.conn.wbuf.is_empty()) {
            // The Sync that ends a batch a 25006 interrupted (see `answer`). A failed write
            // shows as a failed read next, which replays the request then.
            let _ = b.conn.flush().await;
        }
        self.client.flush().await.map_err(|_| End)
    }

    /// Whether the FATAL `f` that ended the idle primary connection to `node` terminated that
    /// backend alone: an administrator's termination (57P01) while `node` is still the elected
    /// primary and accepts a new login. A server shutting down sends the same 57P01 to every
    /// backend but refuses new logins from then on (57P03), and a session then moves on to
    /// whichever node is primary next, as before.
    async fn terminated_alone(&self, f: &Frame, node: usize) -> bool {
        if backend::sqlstate(f) != Some("57P01") {
            return false;
        }
        let cluster = &self.shared.cluster;
        if cluster.elected() != Some(node) || cluster.is_fenced(node) {
            return false;
        }
        let limits = &self.shared.config.limits;
        let probe = backend::connect(
            node,
            cluster.target(node),
            &self.params,
            &self.user,
            self.creds.as_ref(),
            limits.max_message_size,
            secs(limits.connect_timeout),
        )
        .await;
        probe.is_ok()
    }

    /// Backend `w`'s connection ended or broke the protocol.
    async fn backend_lost(&mut self, w: Which) -> Result<(), End> {
        if w == Which::Primary {
            if let Some(b) = &self.primary {
                self.shared.cluster.suspect(b.node);
            }
            let own = self
                .primary
                .as_ref()
                .filter(|b| b.key.0 == self.key.0)
                .map(|b| b.node);
            if let (Some(f), Some(node)) = (self.primary_fatal.take(), own) {
                if self.terminated_alone(&f, node).await {
                    // The backend whose process id the client holds was terminated
                    // (`pg_terminate_backend`) while its node serves on: the session ends
                    // with that backend's FATAL, as it would without dbproxy.
                    tracing::info!("the session's own backend was terminated; ending the session");
                    self.primary = None;
                    self.cycle = Cycle::Idle;
                    self.slot = None;
                    self.client.wbuf.put_slice(f.raw());
                    let _ = self.client.flush().await;
                    return Err(End);
                }
            }
            if self.primary_busy() || self.sticky.pinned {
                return self.lost_primary().await;
            }
            // An idle primary connection went away (the node died or restarted): open one to
            // whichever node is primary when next needed.
            tracing::info!("idle primary connection lost; reconnecting when next needed");
            self.primary = None;
            return self.client.flush().await.map_err(|_| End);
        }
        if let Some(b) = &self.standby {
            self.shared.cluster.suspect(b.node);
        }
        if self.cycle.on() == Some(Which::Standby) {
            let replay = match self.cycle.take_pending_replay() {
                Some(r) => Some(r),
                None => {
                    let window = self.replay.take();
                    if window.as_ref().is_some_and(|w| w.batches.is_empty()) && !self.tx.on_standby() {
                        // Everything the standby answered in this cycle was passed on and
                        // nothing was executed: the cycle simply goes on elsewhere (statements
                        // are prepared lazily where the next batch runs).
                        self.standby = None;
                        self.cycle = Cycle::Idle;
                        return self.client.flush().await.map_err(|_| End);
                    }
                    window.and_then(Window::replayable).map(|mut r| {
                        // A transaction whose reads ran there moves to the primary.
                        r.open = self.split.opening();
                        r
                    })
                }
            };
            if let Some(replay) = replay {
                // The standby went away before any executed answer reached the client: run the
                // request on the primary instead.
                tracing::info!("standby connection lost mid-read; replaying on the primary");
                self.standby = None;
                self.cycle = Cycle::Replaying { replay };
                self.holdback.clear();
                return Ok(());
            }
        }
        if !self.tx.on_standby() && self.cycle.on() != Some(Which::Standby) {
            // An idle standby connection went away: open another when next needed.
            self.standby = None;
            return Ok(());
        }
        Err(self.backend_gone().await)
    }
}
