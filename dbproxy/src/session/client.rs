//! The client side of a session: the relay loop (client, backends, topology changes, shutdown
//! and the idle timeout in one `select!`), and what each client message does: a Query or
//! FunctionCall is routed at once, extended-protocol messages gather into a batch routed at its
//! Sync or Flush, COPY data flows to the backend running the COPY.

use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError};
use crate::classify::{Isolation, Step};
use crate::cluster::Decision;
use crate::config::secs;
use crate::protocol::frontend::{self, FrontendMessage, Target};
use crate::protocol::{simple, status, Frame, ProtocolError};

use super::cycle::{Copy, Mode, Opened, Phase, Split, Which};
use super::route::{self, Request, Role, Route, TxStep};
use super::stmt::{fingerprint, forgets_prepared, Stmt};
use super::{End, Session};

/// Waits for the next change of the elected primary or of fences, handing the receiver back;
/// `None` when the cluster is gone.
fn topology_changed(
    mut rx: tokio::sync::watch::Receiver<u64>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<tokio::sync::watch::Receiver<u64>>> + Send>> {
    Box::pin(async move { rx.changed().await.ok().map(|()| rx) })
}

/// Reads the next frame of an optional backend; pending forever when there is none.
async fn read_opt(b: &mut Option<Backend>) -> Result<Option<Frame>, BackendError> {
    match b {
        Some(b) => b.conn.read_frame().await,
        None => std::future::pending().await,
    }
}

/// What a request is to a transaction whose reads run on a standby, with what the session
/// keeps of it: the text of a plain BEGIN, the step of a savepoint command.
#[derive(Debug, Default)]
struct TxPart {
    role: Role,
    begin: Option<String>,
    control: Option<Step>,
}

impl Session {
    pub(super) async fn relay(&mut self) -> Result<(), End> {
        let idle_limit = secs(self.shared.config.limits.client_idle_timeout);
        let max = self.client.max;
        // The futures that wait for session-wide events live as long as the loop: making and
        // dropping them at every message would register and unregister a waiter (a lock each)
        // or a timer every time.
        let shared = self.shared.clone();
        let mut stop = std::pin::pin!(shared.shutdown.cancelled());
        let mut topology = topology_changed(self.watch.clone());
        // Armed far away while unused; moved to the right deadline when it fires early.
        let mut idle_timer = std::pin::pin!(tokio::time::sleep(Duration::from_secs(86400 * 365)));
        let mut idle_since: Option<Instant> = None;
        loop {
            while !self.cycle.awaiting() || self.copy_accepts_next() {
                match self.client.buffered() {
                    Ok(Some(f)) => self.on_client(f).await?,
                    Ok(None) => break,
                    Err(e @ ProtocolError::OverBudget { len, .. }) => {
                        self.shared.cluster.metrics.error("limit");
                        self.end(e.sqlstate(), &e.to_string()).await;
                        // Read past the message (never held) so the client sees the error.
                        self.client.discard(len, Duration::from_secs(1)).await;
                        return Err(End);
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        return Err(self.protocol_violation(&msg).await);
                    }
                }
            }
            if let Some(replay) = self.cycle.take_due_replay() {
                self.shared.cluster.metrics.decision(Decision::Replay);
                let moves = !replay.open.is_empty();
                // A moved transaction may commit a write (see `route::choose`).
                let capture =
                    moves && replay.mode == Mode::Sync && self.shared.config.routing.read_your_writes_by_lsn;
                self.dispatch(
                    Which::Primary,
                    replay.frames,
                    replay.mode,
                    true,
                    capture,
                    &replay.open,
                )
                .await?;
                if moves {
                    self.moved_to_primary().await;
                }
                continue;
            }
            self.release_between();
            let between = self.cycle.on().is_none() && self.tx.idle();
            let idle = between && !idle_limit.is_zero();
            if idle {
                if idle_since.is_none() {
                    let now = Instant::now();
                    idle_since = Some(now);
                    let deadline = idle_timer.deadline().into_std();
                    if deadline < now || deadline > now + idle_limit {
                        idle_timer.as_mut().reset((now + idle_limit).into());
                    }
                }
            } else {
                idle_since = None;
            }
            // Backpressure: a client that pipelines more than one maximal message is not read
            // further until its earlier requests are answered.
            let can_read = self.client.rbuf.len() <= max;
            let has_standby = self.standby.is_some();
            // In a fixed order, sockets first: a wake-up comes from one source, and the ones
            // after it are not polled. None starves another: a backend's answers end, and a
            // client is not read past one maximal message until they do.
            tokio::select! {
                biased;
                r = read_opt(&mut self.standby), if has_standby => self.on_backend(Which::Standby, r).await?,
                r = read_opt(&mut self.primary) => self.on_backend(Which::Primary, r).await?,
                r = self.client.fill(), if can_read => match r {
                    Ok(0) | Err(_) => return Err(End),
                    Ok(_) => {}
                },
                rx = &mut topology => {
                    topology = match rx {
                        Some(rx) => topology_changed(rx),
                        None => Box::pin(std::future::pending()),
                    };
                    self.on_topology_change().await?;
                }
                _ = &mut stop, if between => {
                    self.end("57P01", "terminating connection due to administrator command").await;
                    return Err(End);
                }
                _ = &mut idle_timer, if idle => {
                    let since = idle_since.unwrap_or_else(Instant::now);
                    if since.elapsed() >= idle_limit {
                        self.end("57P05", "terminating connection due to idle-session timeout").await;
                        return Err(End);
                    }
                    idle_timer.as_mut().reset((since + idle_limit).into());
                }
            }
        }
    }

    /// Whether the next buffered client message belongs to the COPY in progress.
    fn copy_accepts_next(&self) -> bool {
        match self.cycle.copy() {
            Copy::Off => false,
            Copy::In => true,
            Copy::Done => frontend::next_ends_batch(&self.client.rbuf),
        }
    }

    async fn on_client(&mut self, f: Frame) -> Result<(), End> {
        if self.cycle.copy() != Copy::Off {
            return self.on_copy(f).await;
        }
        let msg = match FrontendMessage::parse(&f) {
            Ok(m) => m,
            Err(e) => {
                let msg = e.to_string();
                return Err(self.protocol_violation(&msg).await);
            }
        };
        match msg {
            FrontendMessage::Query { .. } | FrontendMessage::FunctionCall if !self.batch.is_empty() => {
                // Sent on ahead of the held batch, it would run before it.
                let what = if matches!(msg, FrontendMessage::Query { .. }) {
                    "simple Query"
                } else {
                    "FunctionCall"
                };
                let msg = format!("{what} message in the middle of an extended-protocol batch");
                Err(self.protocol_violation(&msg).await)
            }
            FrontendMessage::Query { sql } => {
                if let Some(show) = admin_show(sql).filter(|_| self.cycle.on().is_none()) {
                    let lb = self.standby.as_ref().map(|b| b.node);
                    let (cluster, pools) = (&self.shared.cluster, &self.shared.pools);
                    crate::admin::encode_show(show, cluster, pools, lb, &mut self.client.wbuf);
                    status::encode_ready(self.tx.status.byte(), &mut self.client.wbuf);
                    return self.client.flush().await.map_err(|_| End);
                }
                let r = self.route(sql).await;
                if forgets_prepared(sql) {
                    // DEALLOCATE / DISCARD drop protocol-level statements too; forgetting where
                    // they exist is safe, since a lazy prepare closes any stale copy first.
                    if let Some(b) = self.primary.as_mut() {
                        b.prepared.clear();
                    }
                    if let Some(b) = self.standby.as_mut() {
                        b.prepared.clear();
                    }
                }
                self.note(r);
                let follow = r.follow;
                let tx = self.tx_part(r.role, sql);
                let frames = self.batch.alone(f);
                let req = Request {
                    standby_ok: r.standby_ok,
                    writes: r.writes,
                    mode: Mode::Sync,
                    role: tx.role,
                    copy_in: r.copy_in,
                    ends_tx: r.ends_tx,
                };
                self.dispatch_routed(req, frames, follow, tx).await
            }
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } => {
                // Classified once here; every later execution reuses the verdict (until the
                // unlogged relations are learned again).
                let unlogged = self.unlogged.generation();
                let r = self.route(sql).await;
                if !r.standby_ok {
                    self.batch.not_read_only();
                }
                self.note(r);
                // One statement per Parse (PostgreSQL refuses more).
                let step = match r
                    .follow
                    .then(|| self.shared.classifier.steps_bytes(sql, self.encoding))
                {
                    Some(Some(mut steps)) if steps.len() == 1 => steps.pop().unwrap_or(Step::Other),
                    // A SET whose text cannot be followed (not UTF-8, or in an encoding the
                    // lexer cannot split): the session stays on the primary once it runs.
                    Some(None) => Step::Unknown,
                    _ => Step::Other,
                };
                let param_types = match step {
                    Step::Set(_) => param_types.to_vec(),
                    _ => Vec::new(),
                };
                let stmt = Stmt {
                    fp: fingerprint(&f),
                    // A copy: a view would pin the whole read buffer the Parse was cut from.
                    parse: f.detached(),
                    read_only: r.standby_ok,
                    copy_in: r.copy_in,
                    ends_tx: r.ends_tx,
                    unlogged,
                    step,
                    param_types,
                };
                let max = self.shared.config.limits.max_prepared_statements;
                if !self.stmts.insert(name, stmt, max) {
                    let msg = format!(
                        "too many prepared statements in this session (limits.max_prepared_statements = {max})"
                    );
                    self.end("53400", &msg).await;
                    return Err(End);
                }
                self.push_batch(f).await
            }
            FrontendMessage::Bind(b) => {
                self.batch.count(true);
                self.statement_used(b.stmt);
                self.push_batch(f).await
            }
            FrontendMessage::Describe(t) => {
                if let Target::Statement(name) = t {
                    self.statement_used(name);
                }
                self.push_batch(f).await
            }
            FrontendMessage::Close(t) => {
                if let Target::Statement(name) = t {
                    self.stmts.remove(name);
                }
                self.push_batch(f).await
            }
            FrontendMessage::Execute { .. } => {
                self.batch.count(false);
                self.push_batch(f).await
            }
            FrontendMessage::Sync | FrontendMessage::Flush => {
                let mode = if msg == FrontendMessage::Flush {
                    Mode::Flush
                } else {
                    Mode::Sync
                };
                self.batch.push(f);
                let (frames, req) = self.batch.take(mode);
                self.dispatch_routed(req, frames, true, TxPart::default()).await
            }
            FrontendMessage::FunctionCall => {
                let frames = self.batch.alone(f);
                let req = Request::function_call();
                self.dispatch_routed(req, frames, true, TxPart::default()).await
            }
            // Outside COPY, PostgreSQL ignores these too.
            FrontendMessage::CopyData | FrontendMessage::CopyDone | FrontendMessage::CopyFail => Ok(()),
            FrontendMessage::Terminate => Err(End),
            FrontendMessage::Password { .. } | FrontendMessage::Unknown { .. } => {
                let msg = format!("invalid frontend message type {}", f.tag());
                Err(self.protocol_violation(&msg).await)
            }
        }
    }

    /// A Bind or Describe of statement `name`: the batch stays off the standbys unless the
    /// statement surely only reads.
    fn statement_used(&mut self, name: &str) {
        let generation = self.unlogged.generation();
        if let Some(s) = self
            .stmts
            .get_mut(name)
            .filter(|s| s.read_only && s.unlogged != generation)
        {
            // A read classified before the unlogged relations were last learned: it may name
            // one now known.
            s.unlogged = generation;
            if let Ok(FrontendMessage::Parse { sql, .. }) = FrontendMessage::parse(&s.parse) {
                let (classifier, names) = (&self.shared.classifier, self.unlogged.names());
                s.read_only = Route::of_bytes(classifier, sql, self.encoding, &names).standby_ok;
            }
        }
        match self.stmts.get(name) {
            Some(s) => {
                if !s.read_only {
                    self.batch.not_read_only();
                }
                if s.copy_in {
                    self.batch.copy_in();
                }
                if s.ends_tx {
                    self.batch.ends_tx();
                }
            }
            None => {
                // PostgreSQL will refuse it; nothing is known of it.
                self.batch.not_read_only();
                self.batch.ends_tx();
            }
        }
    }

    /// A client message while a COPY FROM STDIN is in progress.
    async fn on_copy(&mut self, f: Frame) -> Result<(), End> {
        let msg = FrontendMessage::parse(&f);
        let data = msg == Ok(FrontendMessage::CopyData);
        match msg {
            Ok(FrontendMessage::CopyData | FrontendMessage::Sync | FrontendMessage::Flush) => {}
            // COPY FROM STDIN: data flows straight to the backend running the COPY; the Sync
            // that follows CopyDone in the extended protocol belongs to the same request.
            Ok(FrontendMessage::CopyDone | FrontendMessage::CopyFail) => self.cycle.set_copy(Copy::Done),
            _ => {
                let msg = format!("unexpected message type 0x{:02X} during COPY from stdin", f.tag());
                return Err(self.protocol_violation(&msg).await);
            }
        }
        let w = self.cycle.on().unwrap_or(Which::Primary);
        let drained = self.client.rbuf.len() < 5;
        let Some(b) = self.backend(w) else {
            return Err(self.backend_gone().await);
        };
        b.conn.wbuf.extend_from_slice(f.raw());
        // Let CopyData accumulate; write once the client's buffer is drained.
        let write = !data || b.conn.wbuf.len() > 64 * 1024 || drained;
        if write && b.conn.flush().await.is_err() {
            return Err(self.backend_gone().await);
        }
        Ok(())
    }

    /// Adds an extended-protocol message to the batch waiting for its Sync or Flush. A batch
    /// that outgrows `MAX_BATCH_MESSAGES` or `MAX_BATCH_BYTES` is not held any longer: what it
    /// has goes to the primary now (or to the backend already running this cycle), as if the
    /// client had sent a Flush, and the rest of the batch follows it there. So a client cannot
    /// make dbproxy hold an unbounded batch, and a long JDBC-style batch still runs, unbalanced.
    async fn push_batch(&mut self, f: Frame) -> Result<(), End> {
        if !self.batch.push(f) {
            return Ok(());
        }
        // Sent on to the primary whatever its statements are (see above).
        let (frames, mut req) = self.batch.take(Mode::Flush);
        req.standby_ok = false;
        req.writes = true;
        self.dispatch_routed(req, frames, true, TxPart::default()).await
    }

    /// Classifies `sql`, noting whether it may change which relations are unlogged (learned
    /// first when due).
    async fn route(&mut self, sql: &[u8]) -> Route {
        self.learn_unlogged().await;
        if crate::unlogged::may_change(sql) {
            self.ddl_sent = true;
        }
        Route::of_bytes(
            &self.shared.classifier,
            sql,
            self.encoding,
            &self.unlogged.names(),
        )
    }

    /// Session-state effects of a statement the client sent.
    fn note(&mut self, r: Route) {
        if r.pins {
            self.pin();
        }
    }

    /// What a simple Query is to a transaction whose reads run on a standby: a plain BEGIN
    /// whose isolation level is the session's default counts as one only while that default
    /// cannot have been changed by a session setting (SET default_transaction_isolation, SET
    /// SESSION CHARACTERISTICS, a startup option); a savepoint only within the bounds followed.
    fn tx_part(&self, role: Role, sql: &[u8]) -> TxPart {
        match role {
            Role::Begin(Isolation::Default) if self.default_isolation_changed() => TxPart::default(),
            // Its text is replayed on the other connection, as UTF-8 only: a BEGIN carrying
            // other bytes (a comment in LATIN9, say) runs its transaction whole on the primary.
            Role::Begin(_) => match std::str::from_utf8(sql) {
                Ok(text) => TxPart {
                    role,
                    begin: Some(text.to_string()),
                    control: None,
                },
                Err(_) => TxPart::default(),
            },
            Role::Control if matches!(self.split, Split::Reading(_)) => {
                match route::lone_step(&self.shared.classifier, sql, self.encoding) {
                    Some(step) if self.split.follows(&step) => TxPart {
                        role,
                        begin: None,
                        control: Some(step),
                    },
                    _ => TxPart::default(),
                }
            }
            _ => TxPart {
                role,
                ..TxPart::default()
            },
        }
    }

    /// Whether a session setting or a startup option may have changed the default isolation
    /// level (then a plain BEGIN may not be READ COMMITTED, and runs on the primary).
    fn default_isolation_changed(&self) -> bool {
        fn mentions(s: &str) -> bool {
            let has = |w: &[u8]| s.as_bytes().windows(w.len()).any(|x| x.eq_ignore_ascii_case(w));
            has(b"isolation") || has(b"characteristics")
        }
        self.sets.iter().any(|s| mentions(s)) || self.params.iter().any(|(k, v)| mentions(k) || mentions(v))
    }

    /// A transaction whose reads ran on the standby was opened on the primary with a request:
    /// the block is the primary's from now on, and its standby half is ended.
    async fn moved_to_primary(&mut self) {
        if self.cycle.on() == Some(Which::Primary) {
            self.split = Split::Whole;
            self.tx.on = Which::Primary;
            self.end_on_standby().await;
        }
    }

    /// Ends the standby's half of a transaction that moved to the primary (it only read:
    /// nothing is lost); its answer is swallowed. A standby that cannot be written to is
    /// dropped (its server ends the transaction with the connection).
    async fn end_on_standby(&mut self) {
        if let Some(b) = self.standby.as_mut() {
            simple::encode_query("ROLLBACK", &mut b.conn.wbuf);
            b.swallow_rfq += 1;
            if b.conn.flush().await.is_err() {
                self.standby = None;
            }
        }
    }

    /// Chooses a backend for a request ([`route::choose`]) and sends it, opening, following or
    /// moving a transaction whose reads run on a standby.
    async fn dispatch_routed(
        &mut self,
        req: Request,
        frames: Vec<Frame>,
        follow: bool,
        tx: TxPart,
    ) -> Result<(), End> {
        let (standby_ok, writes, mode) = (req.standby_ok, req.writes, req.mode);
        let cur = self.cycle.on();
        // Causal reads: a write whose position is still being learnt counts as replayed
        // nowhere; otherwise a standby must have replayed the session's position.
        let balanced = standby_ok || matches!(tx.role, Role::Begin(_));
        let unreplayed = balanced && cur.is_none() && self.tx.idle() && self.unreplayed().await?;
        let routing = &self.shared.config.routing;
        let now = Instant::now();
        let state = route::State {
            cur,
            tx: self.tx,
            phase: self.split.phase(),
            sticky: &self.sticky,
            unreplayed,
        };
        let choice = route::choose(req, state, routing, now);
        if let Some(d) = choice.decision {
            self.shared.cluster.metrics.decision(d);
        }
        let in_tx = !self.tx.idle();
        self.sticky.sent(writes, choice.target, in_tx, routing, now);
        let (target, capture) = (choice.target, choice.capture_lsn);
        let sent = match choice.step {
            TxStep::Stay => {
                if let Some(step) = tx.control.filter(|_| target == Which::Standby) {
                    self.split.control(&step);
                }
                self.dispatch(target, frames, mode, follow, capture, &[]).await
            }
            TxStep::Open => {
                self.dispatch(target, frames, mode, follow, capture, &[]).await?;
                if self.cycle.on() == Some(Which::Standby) {
                    self.split = Split::Reading(Opened {
                        begin: tx.begin.unwrap_or_else(|| "BEGIN".to_string()),
                        savepoints: Vec::new(),
                        phase: Phase::Begun,
                    });
                }
                Ok(())
            }
            TxStep::Read => {
                self.split.read();
                self.dispatch(target, frames, mode, follow, capture, &[]).await
            }
            TxStep::Move => {
                let opening = self.split.opening();
                self.dispatch(target, frames, mode, follow, capture, &opening)
                    .await?;
                self.moved_to_primary().await;
                Ok(())
            }
        };
        self.note_standby_read();
        sent
    }
}

/// The proxy's own `SHOW POOL_*` command `sql` asks for, if any (only its first word is read
/// before the text is taken as UTF-8, so other queries are not scanned for it).
fn admin_show(sql: &[u8]) -> Option<crate::admin::Show> {
    let head = sql.trim_ascii_start();
    if !head.get(..4).is_some_and(|w| w.eq_ignore_ascii_case(b"show")) {
        return None;
    }
    crate::admin::show(std::str::from_utf8(head).ok()?)
}
