//! The client's protocol state: where the current request cycle stands ([`Cycle`]) and which
//! transaction the session is in ([`Tx`]), as explicit states instead of flags.
//!
//! A cycle starts when a request (a Query, FunctionCall, or extended batch up to Sync or Flush)
//! is sent to a backend and ends with that backend's ReadyForQuery. While a Query or Sync waits
//! for its ReadyForQuery, the client's next messages stay buffered (only COPY data and the Sync
//! or Flush that ends a COPY are taken), so answers can never be reordered across backends.

use crate::protocol::{Frame, TxStatus};

/// One of the session's two backend connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    Primary,
    Standby,
}

/// How a batch ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Mode {
    /// A Query, Sync or FunctionCall: the cycle ends with ReadyForQuery.
    #[default]
    Sync,
    /// A Flush: the backend answers what it has, the batch goes on.
    Flush,
}

/// Where a request stands with COPY FROM STDIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Copy {
    /// No COPY FROM STDIN.
    Off,
    /// The backend sent CopyInResponse: CopyData flows from the client.
    In,
    /// The client sent CopyDone or CopyFail; only a Sync or Flush of the same request may follow.
    Done,
}

/// What the standby was sent in this cycle, to run on the primary after a 25006, and how its
/// last batch ended.
#[derive(Debug)]
pub(super) struct Replay {
    pub frames: Vec<Frame>,
    pub mode: Mode,
    /// For a transaction whose reads ran on the standby: the statements that open it on the
    /// primary first (its BEGIN and savepoints, see [`Split::opening`]); the transaction then
    /// moves there, as at its first write. Empty outside such a transaction.
    pub open: Vec<String>,
}

/// The request cycle.
#[derive(Debug, Default)]
pub(super) enum Cycle {
    /// No request in flight: the next one may be routed anywhere.
    #[default]
    Idle,
    /// A request runs on `on`.
    Running {
        on: Which,
        /// A Query or Sync was sent and its ReadyForQuery has not arrived yet (after a Flush
        /// the client may send more of the cycle).
        awaiting: bool,
        copy: Copy,
    },
    /// The standby refused with 25006 inside the replay window: its answers are swallowed up to
    /// its ReadyForQuery, then `replay` runs on the primary.
    Swallowing { replay: Replay },
    /// `replay` is to be sent to the primary now (the standby finished its answer or is gone).
    Replaying { replay: Replay },
}

impl Cycle {
    /// The backend holding the cycle (the standby while a replay is pending).
    pub fn on(&self) -> Option<Which> {
        match self {
            Cycle::Idle => None,
            Cycle::Running { on, .. } => Some(*on),
            Cycle::Swallowing { .. } | Cycle::Replaying { .. } => Some(Which::Standby),
        }
    }

    /// Whether the client's next request must wait for a ReadyForQuery.
    pub fn awaiting(&self) -> bool {
        match self {
            Cycle::Idle => false,
            Cycle::Running { awaiting, .. } => *awaiting,
            Cycle::Swallowing { .. } | Cycle::Replaying { .. } => true,
        }
    }

    /// The COPY FROM STDIN state of the request.
    pub fn copy(&self) -> Copy {
        match self {
            Cycle::Running { copy, .. } => *copy,
            _ => Copy::Off,
        }
    }

    /// A request was sent to `on`; a Sync-ended one waits for its ReadyForQuery.
    pub fn sent(&mut self, on: Which, mode: Mode) {
        *self = Cycle::Running {
            on,
            awaiting: mode == Mode::Sync,
            copy: Copy::Off,
        };
    }

    /// The backend sent CopyInResponse, or the client ended the COPY data.
    pub fn set_copy(&mut self, to: Copy) {
        if let Cycle::Running { copy, .. } = self {
            *copy = to;
        }
    }

    /// The replay to run now, leaving the cycle idle; `None` unless one is due.
    pub fn take_due_replay(&mut self) -> Option<Replay> {
        match std::mem::take(self) {
            Cycle::Replaying { replay } => Some(replay),
            other => {
                *self = other;
                None
            }
        }
    }

    /// The standby finished the answer being swallowed: the replay is due.
    pub fn swallowed(&mut self) {
        if let Cycle::Swallowing { replay } = std::mem::take(self) {
            *self = Cycle::Replaying { replay };
        }
    }

    /// The replay already decided on (a 25006 arrived), if any, taken out of the cycle.
    pub fn take_pending_replay(&mut self) -> Option<Replay> {
        match std::mem::take(self) {
            Cycle::Swallowing { replay } | Cycle::Replaying { replay } => Some(replay),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// The session's transaction, from the status of the last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tx {
    pub status: TxStatus,
    /// The backend that reported it (meaningful in a transaction block: a BEGIN READ ONLY
    /// block may run on the standby).
    pub on: Which,
}

impl Default for Tx {
    fn default() -> Tx {
        Tx {
            status: TxStatus::Idle,
            on: Which::Primary,
        }
    }
}

impl Tx {
    /// Not in a transaction block.
    pub fn idle(self) -> bool {
        self.status == TxStatus::Idle
    }

    /// A transaction block runs on the standby.
    pub fn on_standby(self) -> bool {
        !self.idle() && self.on == Which::Standby
    }

    /// A transaction block runs on the primary.
    pub fn on_primary(self) -> bool {
        !self.idle() && self.on == Which::Primary
    }
}

/// Where a transaction block on the standby stands, as routing sees it ([`Split::phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// No block whose reads are balanced: none, one on the primary, or a BEGIN READ ONLY block
    /// that runs wholly on the standby.
    Whole,
    /// A plain BEGIN opened the block on the standby; nothing else ran there yet.
    Begun,
    /// Statements ran in the standby's block (it has taken a snapshot).
    Read,
}

/// A transaction block opened by a plain BEGIN on the standby: its reads run there until the
/// first statement that may write, which opens the block on the primary too (the client's
/// BEGIN and the savepoints in force replayed there), ends it on the standby, and leaves the
/// rest of the block to the primary.
#[derive(Debug)]
pub(super) struct Opened {
    /// The client's BEGIN, as sent.
    pub begin: String,
    /// The savepoints in force, oldest first (names as PostgreSQL folds them).
    pub savepoints: Vec<String>,
    /// `Phase::Begun` or `Phase::Read`.
    pub phase: Phase,
}

/// Whether the session's transaction block is split between a standby (its first reads) and
/// the primary.
#[derive(Debug, Default)]
pub(super) enum Split {
    /// No (no block, or one that runs wholly on one backend: `Tx::on`).
    #[default]
    Whole,
    /// The block runs on the standby until its first statement that may write.
    Reading(Opened),
}

/// The most savepoints followed in a block whose reads run on a standby: one more moves the
/// block to the primary (with those replayed), which bounds the memory this takes.
const MAX_SAVEPOINTS: usize = 1024;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1); a longer savepoint name also moves the block
/// to the primary rather than be remembered.
const MAX_NAME: usize = 63;

impl Split {
    /// The phase routing sees.
    pub fn phase(&self) -> Phase {
        match self {
            Split::Whole => Phase::Whole,
            Split::Reading(o) => o.phase,
        }
    }

    /// A statement ran in the standby's block.
    pub fn read(&mut self) {
        if let Split::Reading(o) = self {
            o.phase = Phase::Read;
        }
    }

    /// Whether [`Split::control`] can follow `step` within its bounds.
    pub fn follows(&self, step: &crate::classify::Step) -> bool {
        use crate::classify::Step;
        match (self, step) {
            (Split::Reading(o), Step::Savepoint(name)) => {
                o.savepoints.len() < MAX_SAVEPOINTS && name.len() <= MAX_NAME
            }
            _ => true,
        }
    }

    /// A lone transaction-control statement was sent to the standby's block: savepoints are
    /// followed (a COMMIT/ROLLBACK AND CHAIN starts the next block there, as fresh as BEGIN).
    pub fn control(&mut self, step: &crate::classify::Step) {
        use crate::classify::Step;
        let Split::Reading(o) = self else { return };
        match step {
            Step::Savepoint(name) => o.savepoints.push(name.clone()),
            Step::Release(name) => {
                if let Some(at) = o.savepoints.iter().rposition(|s| s == name) {
                    o.savepoints.truncate(at);
                }
            }
            Step::RollbackTo(name) => {
                if let Some(at) = o.savepoints.iter().rposition(|s| s == name) {
                    o.savepoints.truncate(at + 1);
                }
            }
            Step::Commit { chain: true } | Step::Rollback { chain: true } => {
                o.savepoints.clear();
                o.phase = Phase::Begun;
            }
            _ => {}
        }
    }

    /// The statements that open the block on the primary: the client's BEGIN, then a
    /// SAVEPOINT for each in force.
    pub fn opening(&self) -> Vec<String> {
        let Split::Reading(o) = self else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(1 + o.savepoints.len());
        out.push(o.begin.clone());
        for name in &o.savepoints {
            out.push(format!("SAVEPOINT \"{}\"", name.replace('"', "\"\"")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay() -> Replay {
        Replay {
            frames: Vec::new(),
            mode: Mode::Sync,
            open: Vec::new(),
        }
    }

    #[test]
    fn a_split_block_follows_its_savepoints() {
        use crate::classify::Step;
        let mut s = Split::default();
        assert_eq!(s.phase(), Phase::Whole);
        assert!(s.opening().is_empty());
        s.read();
        assert_eq!(s.phase(), Phase::Whole, "nothing to follow");
        s = Split::Reading(Opened {
            begin: "begin".into(),
            savepoints: Vec::new(),
            phase: Phase::Begun,
        });
        for step in [
            Step::Savepoint("a".into()),
            Step::Savepoint("b\"c".into()),
            Step::Savepoint("d".into()),
            Step::Release("d".into()),
            Step::Savepoint("e".into()),
            Step::Savepoint("f".into()),
            Step::RollbackTo("e".into()),
            Step::Release("missing".into()),
        ] {
            assert!(s.follows(&step));
            s.control(&step);
        }
        s.read();
        assert_eq!(s.phase(), Phase::Read);
        assert_eq!(
            s.opening(),
            [
                "begin",
                "SAVEPOINT \"a\"",
                "SAVEPOINT \"b\"\"c\"",
                "SAVEPOINT \"e\""
            ]
        );
        assert!(
            !s.follows(&Step::Savepoint("x".repeat(64))),
            "longer than an identifier"
        );
        s.control(&Step::Commit { chain: true });
        assert_eq!(
            (s.phase(), s.opening().len()),
            (Phase::Begun, 1),
            "AND CHAIN: a fresh block"
        );
        for i in 0..MAX_SAVEPOINTS {
            s.control(&Step::Savepoint(i.to_string()));
        }
        assert!(!s.follows(&Step::Savepoint("one more".into())), "bounded");
    }

    #[test]
    fn a_request_cycle() {
        let mut c = Cycle::default();
        assert_eq!((c.on(), c.awaiting(), c.copy()), (None, false, Copy::Off));
        c.sent(Which::Standby, Mode::Flush);
        assert_eq!((c.on(), c.awaiting()), (Some(Which::Standby), false));
        c.sent(Which::Standby, Mode::Sync);
        assert!(c.awaiting());
        c.set_copy(Copy::In);
        assert_eq!(c.copy(), Copy::In);
        assert!(c.take_due_replay().is_none());
        assert!(c.take_pending_replay().is_none());
        assert_eq!(c.on(), Some(Which::Standby), "nothing pending: the cycle stays");
    }

    #[test]
    fn a_replay_is_swallowed_then_due() {
        let mut c = Cycle::Swallowing { replay: replay() };
        assert_eq!((c.on(), c.awaiting()), (Some(Which::Standby), true));
        assert!(
            c.take_due_replay().is_none(),
            "not before the standby's ReadyForQuery"
        );
        c.set_copy(Copy::In);
        assert_eq!(c.copy(), Copy::Off);
        c.swallowed();
        assert!(matches!(c, Cycle::Replaying { .. }));
        assert!(c.take_due_replay().is_some());
        assert!(matches!(c, Cycle::Idle));
        let mut c = Cycle::Swallowing { replay: replay() };
        assert!(c.take_pending_replay().is_some());
        assert!(matches!(c, Cycle::Idle));
    }

    #[test]
    fn transaction_holder() {
        let mut t = Tx::default();
        assert!(t.idle() && !t.on_standby() && !t.on_primary());
        t.on = Which::Standby;
        assert!(!t.on_standby(), "idle: no block anywhere");
        t.status = TxStatus::InTransaction;
        assert!(t.on_standby() && !t.on_primary());
        t.on = Which::Primary;
        t.status = TxStatus::Failed;
        assert!(t.on_primary());
    }
}
