//! What a session does with each message a backend sends: answers to its own injected messages
//! are swallowed (settings replay, lazy prepares, the WAL-position query), answers inside the
//! replay window are held back, a standby's 25006 starts a replay, and the rest goes to the
//! client while the session follows transaction status, COPY and which SETs hold.

use crate::cluster::parse_lsn;
use crate::protocol::{extended, BackendMessage, Frame, ProtocolError};
use crate::settings::Lost;

use super::cycle::{Copy, Cycle, Mode, Split, Tx, Which};
use super::Session;

/// The SQLSTATE of a standby's `cannot access temporary or unlogged relations during recovery`
/// (feature_not_supported): replayed on the primary like a 25006, under the same rules. Any
/// other 0A000 of a standby's is replayed too, which costs a round trip and answers what the
/// primary answers, as without dbproxy.
const UNLOGGED_REFUSED: &str = "0A000";

/// Caps the number of remembered SET statements; past it the session stays on the primary.
const MAX_SETS: usize = 256;

impl Session {
    /// SET statements that now hold, run by backend `w`: remembered for the other connections
    /// (`w` has them already). When the tracker lost track of which hold, the session keeps to
    /// the primary, whose settings are then the session's.
    fn hold_sets(&mut self, w: Which, held: Result<Vec<String>, Lost>) {
        match held {
            // A pinned session never uses another connection again (and ends with its primary
            // connection): nothing to remember.
            Ok(sets) if sets.is_empty() || self.sticky.pinned => {}
            Ok(sets) => {
                let before = self.sets.len();
                let applied = self.backend(w).is_some_and(|b| b.sets_applied == before);
                self.sets.extend(sets);
                if self.sets.len() > MAX_SETS {
                    self.pin();
                }
                let n = self.sets.len();
                if let Some(b) = self.backend(w).filter(|_| applied) {
                    b.sets_applied = n;
                }
            }
            Err(Lost) => {
                tracing::warn!(
                    "cannot tell which session settings of a request hold; the session stays on the primary"
                );
                self.pin();
            }
        }
    }

    /// Passes the held-back answers on to the client.
    fn release_holdback(&mut self) {
        for h in self.holdback.drain(..) {
            self.client.wbuf.extend_from_slice(h.raw());
        }
    }

    /// One message from backend `w`; an error when it is malformed.
    pub(super) fn on_backend_frame(&mut self, w: Which, f: Frame) -> Result<(), ProtocolError> {
        let msg = BackendMessage::parse(&f)?;
        if msg == BackendMessage::ParameterStatus {
            // SET client_encoding (or RESET, or a replayed SET) changes how the client's next
            // SQL text is to be read.
            if let Some(e) = super::login::client_encoding(&f) {
                self.encoding = e;
            }
        }
        let in_cycle = self.cycle.on() == Some(w);
        if let Some(b) = self.backend(w).filter(|b| b.capturing) {
            // The answer to the `pg_current_wal_insert_lsn()` sent behind the client's last write.
            match msg {
                BackendMessage::DataRow(row) => {
                    if let Some(lsn) = row.first_text().and_then(parse_lsn) {
                        let lsn = crate::replay_position::content_end(lsn);
                        let s = &mut self.sticky;
                        s.write_lsn = Some(s.write_lsn.map_or(lsn, |l| l.max(lsn)));
                        // Asked for behind anything that ran before it, a COPY included.
                        s.position_owed = false;
                        // Taken after any read the session ran on a standby: it bounds them.
                        s.read_on = None;
                    }
                }
                BackendMessage::ReadyForQuery { .. } => {
                    b.capturing = false;
                    b.capture_lsn = b.capture_lsn.saturating_sub(1);
                }
                _ => {}
            }
            return Ok(());
        }
        if let Some(b) = self.backend(w) {
            if b.swallow_rfq > 0 {
                // The answers to settings and Closes replayed on this connection.
                match msg {
                    BackendMessage::ReadyForQuery { .. } => b.swallow_rfq -= 1,
                    BackendMessage::ErrorResponse(e) => tracing::warn!(
                        sqlstate = e.code().unwrap_or(""),
                        "a session setting could not be applied to a backend"
                    ),
                    _ => {}
                }
                return Ok(());
            }
            if in_cycle {
                match msg {
                    BackendMessage::ParseComplete if b.swallow_parse > 0 => {
                        b.swallow_parse -= 1;
                        return Ok(());
                    }
                    BackendMessage::CloseComplete if b.swallow_close > 0 => {
                        b.swallow_close -= 1;
                        return Ok(());
                    }
                    BackendMessage::ErrorResponse(_) | BackendMessage::ReadyForQuery { .. } => {
                        // After an error the rest of the batch is skipped, injected messages included.
                        b.swallow_parse = 0;
                        b.swallow_close = 0;
                    }
                    _ => {}
                }
            }
        }
        if in_cycle {
            match msg {
                BackendMessage::ParameterDescription(d) => self.stmts.described(|| d.types().ok()),
                BackendMessage::ErrorResponse(_) | BackendMessage::ReadyForQuery { .. } => {
                    self.stmts.describes_dropped()
                }
                _ => {}
            }
        }
        if let BackendMessage::ErrorResponse(e) = msg {
            let shutting_down = e.code().is_some_and(|c| c.starts_with("57"));
            if w == Which::Primary
                && e.is_fatal()
                && !self.sticky.pinned
                && (!self.primary_busy() || (self.tx.idle() && shutting_down))
            {
                // The primary is going away (a crash, a shutdown, a terminated backend) while
                // the session does not depend on it: the client never hears of it, the session
                // moves to whichever node is primary at its next request. An autocommit request
                // in flight is answered when the connection ends (see `lost_primary`).
                tracing::info!(
                    sqlstate = e.code().unwrap_or(""),
                    "primary connection ended while idle: {}",
                    e.message().unwrap_or("")
                );
                self.primary_fatal = Some(f);
                return Ok(());
            }
        }
        if !in_cycle {
            // Asynchronous messages outside a request: notifications and notices from the
            // primary reach the client; a standby's are dropped (its state mirrors the primary).
            let asynchronous = matches!(
                msg,
                BackendMessage::NotificationResponse
                    | BackendMessage::NoticeResponse(_)
                    | BackendMessage::ParameterStatus
                    | BackendMessage::ErrorResponse(_)
            );
            if w == Which::Primary && asynchronous {
                self.client.wbuf.extend_from_slice(f.raw());
            }
            return Ok(());
        }
        match self.cycle {
            Cycle::Swallowing { .. } => {
                if let BackendMessage::ReadyForQuery { .. } = msg {
                    self.cycle.swallowed();
                }
                return Ok(());
            }
            Cycle::Running { .. } | Cycle::Idle | Cycle::Replaying { .. } => {}
        }
        if let Some(window) = self.replay.as_mut() {
            let code = match msg {
                BackendMessage::ErrorResponse(e) => e.code(),
                _ => None,
            };
            if msg.acknowledges() {
                let released = window.answered(&msg);
                self.holdback.push(f);
                if released {
                    // A Flush batch the client waits on is answered in full.
                    self.release_holdback();
                }
                return Ok(());
            } else if code == Some("25006") || (w == Which::Standby && code == Some(UNLOGGED_REFUSED)) {
                if code == Some(UNLOGGED_REFUSED) {
                    // An unlogged relation dbproxy has not learned: learn them again once the
                    // session is between transactions.
                    self.unlogged_due = true;
                }
                let window = self.replay.take().unwrap_or_default();
                if let Some(mut replay) = window.replayable() {
                    // In a transaction whose reads run on the standby, the transaction moves to
                    // the primary with the request (the standby's half is rolled back).
                    replay.open = self.split.opening();
                    // Swallow the standby's answers up to its ReadyForQuery, then replay; a
                    // batch ended by Flush gets a Sync to end it (written once this read is
                    // done). The client's next messages wait for the replay.
                    if replay.mode == Mode::Flush {
                        if let Some(b) = self.standby.as_mut() {
                            extended::encode_sync(&mut b.conn.wbuf);
                        }
                    }
                    self.cycle = Cycle::Swallowing { replay };
                    self.holdback.clear();
                    return Ok(());
                }
                self.release_holdback();
            } else if w == Which::Standby && matches!(code, Some("57P01" | "57P02" | "57P03")) {
                // The standby is shutting down or restarting; its connection ends next, and
                // the request is replayed on the primary then.
                return Ok(());
            } else {
                self.release_holdback();
                self.close_window();
            }
        }
        match msg {
            BackendMessage::CommandComplete { tag } => {
                let held = self.settings.complete(tag);
                self.hold_sets(w, held);
            }
            BackendMessage::ErrorResponse(_) => self.settings.error(),
            BackendMessage::EmptyQueryResponse | BackendMessage::PortalSuspended => self.settings.ended(),
            BackendMessage::ReadyForQuery { status } => {
                let held = self.settings.ready(status.byte());
                self.hold_sets(w, held);
                self.tx = Tx { status, on: w };
                if self.tx.idle() {
                    self.split = Split::Whole;
                    if std::mem::take(&mut self.ddl_sent) {
                        // A CREATE, ALTER or DROP has committed (or rolled back): learn the
                        // unlogged relations again before the next statement is routed.
                        self.unlogged_due = true;
                    }
                }
                // A replay already due runs all the same.
                if !matches!(self.cycle, Cycle::Replaying { .. }) {
                    self.cycle = Cycle::Idle;
                }
                if let Some(b) = self.backend(w) {
                    // A WAL-position query sent behind this request answers next.
                    b.capturing = b.capture_lsn > 0;
                }
            }
            BackendMessage::CopyInResponse => {
                self.cycle.set_copy(Copy::In);
                if w == Which::Primary && self.shared.config.routing.read_your_writes_by_lsn {
                    // No position was asked for behind a COPY (see `Route::copy_in`).
                    self.sticky.position_owed = true;
                }
            }
            _ => {}
        }
        self.client.wbuf.extend_from_slice(f.raw());
        Ok(())
    }
}
