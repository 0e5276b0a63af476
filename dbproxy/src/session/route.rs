//! Routing: what a statement means for routing ([`Route`], from the classifier), what the
//! session remembers that keeps reads on the primary ([`Sticky`]), and [`choose`], the pure
//! decision of which backend runs a request and what it does to a transaction whose reads run
//! on a standby. No I/O: unit-tested with fixed inputs.

use std::time::{Duration, Instant};

use crate::classify::{Classifier, Encoding, Isolation, Relations, Step, Target, TxCommand};
use crate::cluster::Decision;
use crate::config::{RoutingConfig, WriteStickiness};
use crate::protocol::TxStatus;

use super::cycle::{Mode, Phase, Tx, Which};

/// What a statement is to a transaction whose reads run on a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Role {
    /// Anything else (a write, a session SET, several statements...).
    #[default]
    Other,
    /// A lone BEGIN / START TRANSACTION, not READ ONLY, naming this isolation level.
    Begin(Isolation),
    /// A lone COMMIT, ROLLBACK, SAVEPOINT, RELEASE or ROLLBACK TO (not PREPARE TRANSACTION):
    /// it runs where the transaction is.
    Control,
    /// A lone SET TRANSACTION that changes the isolation level or imports a snapshot: once the
    /// transaction has run a query, PostgreSQL refuses it (25001) wherever it runs.
    Snapshot,
}

/// What the session needs to know about one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Route {
    /// It may run on a standby (a sure read, or BEGIN READ ONLY).
    pub standby_ok: bool,
    /// It writes or may write (not a read, not transaction control).
    pub writes: bool,
    /// It pins the session to the primary (temporary tables, LISTEN, advisory locks, ...).
    pub pins: bool,
    /// It changes settings or the transaction (SET, BEGIN/COMMIT/ROLLBACK, savepoints): the
    /// session follows it statement by statement.
    pub follow: bool,
    /// What it is to a transaction whose reads run on a standby.
    pub role: Role,
    /// It may be a COPY FROM STDIN (nothing may be pipelined behind it).
    pub copy_in: bool,
    /// It may end a transaction block: not one lone statement other than COMMIT, ROLLBACK,
    /// ABORT, END or PREPARE TRANSACTION.
    pub ends_tx: bool,
}

/// The one statement `sql` (in the client's `encoding`) holds, if it holds exactly one.
pub(super) fn lone_step(classifier: &Classifier, sql: &[u8], encoding: Encoding) -> Option<Step> {
    let mut steps = classifier.steps_bytes(sql, encoding)?;
    if steps.len() == 1 {
        steps.pop()
    } else {
        None
    }
}

impl Route {
    /// Classifies `sql`, UTF-8 text.
    #[cfg(test)]
    pub fn of(classifier: &Classifier, sql: &str) -> Route {
        Route::of_bytes(
            classifier,
            sql.as_bytes(),
            Encoding::AsciiSafe,
            &Relations::default(),
        )
    }

    /// Classifies `sql`, the bytes a client sent in its `client_encoding`; a read naming one
    /// of the `unlogged` relations cannot run on a standby.
    pub fn of_bytes(classifier: &Classifier, sql: &[u8], encoding: Encoding, unlogged: &Relations) -> Route {
        let c = classifier.classify_with(sql, encoding, unlogged);
        let begin_ro = matches!(c.tx, TxCommand::Begin { read_only: true, .. });
        let control = matches!(c.tx, TxCommand::Begin { .. } | TxCommand::End);
        let role = match c.tx {
            TxCommand::Begin {
                read_only: false,
                isolation,
            } if lone_step(classifier, sql, encoding).is_some() => Role::Begin(isolation),
            TxCommand::SetTransaction { isolation, snapshot }
                if (snapshot || !matches!(isolation, Isolation::Default | Isolation::ReadCommitted))
                    && lone_step(classifier, sql, encoding).is_some() =>
            {
                Role::Snapshot
            }
            TxCommand::End | TxCommand::None if c.tx == TxCommand::End || c.savepoint => {
                let prepare = sql
                    .trim_ascii_start()
                    .get(..7)
                    .is_some_and(|w| w.eq_ignore_ascii_case(b"prepare"));
                match lone_step(classifier, sql, encoding) {
                    Some(
                        Step::Commit { .. }
                        | Step::Rollback { .. }
                        | Step::Savepoint(_)
                        | Step::Release(_)
                        | Step::RollbackTo(_),
                    ) if !prepare => Role::Control,
                    _ => Role::Other,
                }
            }
            _ => Role::Other,
        };
        Route {
            standby_ok: c.target == Target::Standby || begin_ro,
            writes: c.target == Target::Primary && !control && !c.session_set && !c.savepoint,
            pins: c.pins_session,
            follow: c.session_set || control || c.savepoint,
            role,
            copy_in: c.copy_in,
            ends_tx: !c.single || c.tx == TxCommand::End,
        }
    }
}

/// Whether, and where, a session has written (for `disable_load_balance_on_write`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Wrote {
    #[default]
    Never,
    /// Only outside explicit transactions.
    Outside,
    /// In an explicit transaction.
    InTransaction,
}

/// What a session remembers that keeps its reads on the primary.
#[derive(Debug, Default)]
pub(super) struct Sticky {
    /// Temporary tables, LISTEN, advisory locks or too many SETs keep the session on the primary.
    pub pinned: bool,
    /// Whether the session has written (`always` and `trans_transaction`).
    pub wrote: Wrote,
    /// When it last wrote (for read-your-writes).
    pub last_write: Option<Instant>,
    /// The primary's WAL position after the session's last write or read there (causal reads:
    /// see `causal.rs`): reads go only to standbys that have replayed it.
    pub write_lsn: Option<u64>,
    /// The standby the session read on since `write_lsn` was learnt (causal reads): its reads
    /// stay there or go to the primary until a new position is learnt.
    pub read_on: Option<usize>,
    /// The standby a read waited for (causal reads), to connect to next.
    pub next_standby: Option<usize>,
    /// A COPY FROM STDIN ran on the primary and no WAL position was asked for behind it
    /// (causal reads): until one is learnt, no standby is known to hold the session's writes.
    pub position_owed: bool,
}

impl Sticky {
    /// A request was sent to `target` (`in_tx`: inside an explicit transaction): a write there
    /// is remembered.
    pub fn sent(&mut self, writes: bool, target: Which, in_tx: bool, routing: &RoutingConfig, now: Instant) {
        if writes && target == Which::Primary {
            self.wrote = if in_tx {
                Wrote::InTransaction
            } else {
                self.wrote.max_outside()
            };
            if routing.read_your_writes > 0 {
                self.last_write = Some(now);
            }
        }
    }
}

impl Wrote {
    fn max_outside(self) -> Wrote {
        match self {
            Wrote::InTransaction => Wrote::InTransaction,
            _ => Wrote::Outside,
        }
    }
}

/// One request to route.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    /// Every statement of it may run on a standby.
    pub standby_ok: bool,
    /// It writes or may write.
    pub writes: bool,
    /// How it ends.
    pub mode: Mode,
    /// What it is to a transaction whose reads run on a standby.
    pub role: Role,
    /// It may be a COPY FROM STDIN: no WAL position is asked for behind it (a query sent
    /// while the server waits for COPY data would fail the COPY).
    pub copy_in: bool,
    /// It may end a transaction block (see `Route::ends_tx`).
    pub ends_tx: bool,
}

impl Request {
    /// A FunctionCall: the primary's, and nothing is known of what it does.
    pub fn function_call() -> Request {
        Request {
            standby_ok: false,
            writes: true,
            mode: Mode::Sync,
            role: Role::Other,
            copy_in: false,
            ends_tx: true,
        }
    }
}

/// The session's state as far as routing goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct State<'a> {
    /// The backend holding the current cycle, if one is unfinished.
    pub cur: Option<Which>,
    pub tx: Tx,
    /// Where a transaction block on the standby stands.
    pub phase: Phase,
    pub sticky: &'a Sticky,
    /// The session wrote at a WAL position no eligible standby has replayed yet, or at one
    /// dbproxy has not learnt yet.
    pub unreplayed: bool,
}

/// What a request does to a transaction whose reads run on a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxStep {
    /// Nothing changes.
    Stay,
    /// A plain BEGIN opens the transaction on the standby; its reads run there.
    Open,
    /// A statement runs in the standby's transaction (which has then taken a snapshot).
    Read,
    /// A statement that may write: the transaction is opened on the primary (its BEGIN and
    /// savepoints replayed), ended on the standby, and runs on the primary from now on.
    Move,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Choice {
    pub target: Which,
    /// The decision to count (`None`: the cycle continues, or a standby that may still fall
    /// back, which `dispatch` counts).
    pub decision: Option<Decision>,
    /// Learn the primary's WAL position behind this request (read-your-writes by LSN).
    pub capture_lsn: bool,
    /// What it does to a transaction whose reads run on a standby.
    pub step: TxStep,
}

/// Whether a plain BEGIN may open its transaction on a standby: its isolation level takes a
/// snapshot per statement (READ COMMITTED; PostgreSQL runs READ UNCOMMITTED as READ
/// COMMITTED), and the write mode lets it (`trans_transaction`: not once a transaction wrote).
fn balances_transaction(isolation: Isolation, routing: &RoutingConfig, sticky: &Sticky) -> bool {
    let per_statement = matches!(
        isolation,
        Isolation::Default | Isolation::ReadCommitted | Isolation::ReadUncommitted
    );
    let mode = match routing.disable_load_balance_on_write {
        WriteStickiness::Transaction | WriteStickiness::Off | WriteStickiness::Always => true,
        WriteStickiness::TransTransaction => sticky.wrote != Wrote::InTransaction,
        WriteStickiness::DmlAdaptive => false,
    };
    per_statement && mode
}

/// Chooses the backend for a request: the one holding an unfinished cycle; the one holding the
/// transaction (a statement that may write moves a transaction whose reads ran on a standby to
/// the primary); the primary for anything not sure to only read, or while the session must see
/// its own writes or is pinned; a standby otherwise, a plain BEGIN included.
pub(super) fn choose(req: Request, s: State<'_>, routing: &RoutingConfig, now: Instant) -> Choice {
    let recent_write = routing.read_your_writes > 0
        && s.sticky.last_write.is_some_and(|t| {
            now.saturating_duration_since(t) < Duration::from_millis(routing.read_your_writes)
        });
    let keep_on_primary = !routing.load_balance
        || s.sticky.pinned
        || s.unreplayed
        || (routing.disable_load_balance_on_write == WriteStickiness::Always
            && s.sticky.wrote != Wrote::Never)
        || recent_write;
    let standby = Some(Decision::Standby);
    let (target, decision, step) = if let Some(c) = s.cur {
        (c, None, TxStep::Stay)
    } else if s.tx.on_standby() {
        match (s.phase, req.role) {
            // BEGIN READ ONLY: the whole block runs there.
            (Phase::Whole, _) => (Which::Standby, Some(Decision::PrimaryTransaction), TxStep::Stay),
            // A failed transaction answers 25P02 until it is rolled back, where it failed.
            _ if s.tx.status == TxStatus::Failed => (Which::Standby, standby, TxStep::Stay),
            _ if req.standby_ok => (Which::Standby, standby, TxStep::Read),
            (_, Role::Control) => (Which::Standby, standby, TxStep::Stay),
            // After a query, PostgreSQL's own 25001 from where the query ran.
            (Phase::Read, Role::Snapshot) => (Which::Standby, standby, TxStep::Stay),
            _ => (Which::Primary, Some(Decision::PrimaryWrite), TxStep::Move),
        }
    } else if !s.tx.idle() {
        (Which::Primary, Some(Decision::PrimaryTransaction), TxStep::Stay)
    } else if let Role::Begin(isolation) = req.role {
        if !keep_on_primary && balances_transaction(isolation, routing, s.sticky) {
            (Which::Standby, None, TxStep::Open)
        } else {
            (Which::Primary, Some(Decision::PrimaryTransaction), TxStep::Stay)
        }
    } else if !req.standby_ok {
        (Which::Primary, Some(Decision::PrimaryWrite), TxStep::Stay)
    } else if keep_on_primary {
        (Which::Primary, Some(Decision::PrimaryPinned), TxStep::Stay)
    } else {
        (Which::Standby, None, TxStep::Stay)
    };
    // Outside a transaction block, a write or a read that could have run on a standby
    // (monotonic reads: a later read on a standby must not see older data); inside one, what
    // may end it (its reads and writes stay on the primary until then, and the position learnt
    // at its end covers them all): learn the WAL position.
    // Not when the session's reads cannot run on a standby anyway.
    let may_balance = routing.load_balance && !s.sticky.pinned;
    let due = if s.tx.idle() {
        req.writes || req.standby_ok
    } else {
        req.ends_tx
    };
    let capture_lsn = routing.read_your_writes_by_lsn
        && may_balance
        && target == Which::Primary
        && req.mode == Mode::Sync
        && !req.copy_in
        && due;
    Choice {
        target,
        decision,
        capture_lsn,
        step,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TxStatus;

    fn read() -> Request {
        Request {
            standby_ok: true,
            writes: false,
            mode: Mode::Sync,
            role: Role::Other,
            copy_in: false,
            ends_tx: false,
        }
    }

    fn write() -> Request {
        Request {
            ends_tx: false,
            ..Request::function_call()
        }
    }

    fn state(sticky: &Sticky) -> State<'_> {
        State {
            cur: None,
            tx: Tx::default(),
            phase: Phase::Whole,
            sticky,
            unreplayed: false,
        }
    }

    fn target(c: Choice) -> (Which, Option<Decision>) {
        (c.target, c.decision)
    }

    #[test]
    fn reads_to_the_standby_writes_to_the_primary() {
        let r = RoutingConfig::default();
        let now = Instant::now();
        let st = Sticky::default();
        assert_eq!(
            target(choose(read(), state(&st), &r, now)),
            (Which::Standby, None)
        );
        assert_eq!(
            target(choose(write(), state(&st), &r, now)),
            (Which::Primary, Some(Decision::PrimaryWrite))
        );
        let off = RoutingConfig {
            load_balance: false,
            ..RoutingConfig::default()
        };
        assert_eq!(
            target(choose(read(), state(&st), &off, now)),
            (Which::Primary, Some(Decision::PrimaryPinned))
        );
    }

    #[test]
    fn an_unfinished_cycle_or_a_transaction_keeps_its_backend() {
        let r = RoutingConfig::default();
        let now = Instant::now();
        let st = Sticky::default();
        let s = State {
            cur: Some(Which::Standby),
            ..state(&st)
        };
        assert_eq!(target(choose(write(), s, &r, now)), (Which::Standby, None));
        let mut s = state(&st);
        s.tx = Tx {
            status: TxStatus::InTransaction,
            on: Which::Primary,
        };
        assert_eq!(
            target(choose(read(), s, &r, now)),
            (Which::Primary, Some(Decision::PrimaryTransaction))
        );
        s.tx.on = Which::Standby;
        assert_eq!(
            target(choose(write(), s, &r, now)),
            (Which::Standby, Some(Decision::PrimaryTransaction)),
            "a READ ONLY transaction on the standby keeps it"
        );
    }

    #[test]
    fn sticky_reads_stay_on_the_primary() {
        let now = Instant::now();
        let pinned = Sticky {
            pinned: true,
            ..Sticky::default()
        };
        let r = RoutingConfig::default();
        assert_eq!(choose(read(), state(&pinned), &r, now).target, Which::Primary);
        let st = Sticky::default();
        let s = State {
            unreplayed: true,
            ..state(&st)
        };
        assert_eq!(choose(read(), s, &r, now).target, Which::Primary);
        let always = RoutingConfig {
            disable_load_balance_on_write: WriteStickiness::Always,
            ..RoutingConfig::default()
        };
        let mut wrote = Sticky::default();
        wrote.sent(true, Which::Primary, false, &always, now);
        assert_eq!(wrote.wrote, Wrote::Outside);
        assert_eq!(choose(read(), state(&wrote), &always, now).target, Which::Primary);
        assert_eq!(choose(read(), state(&wrote), &r, now).target, Which::Standby);
        let ryw = RoutingConfig {
            read_your_writes: 500,
            ..RoutingConfig::default()
        };
        let mut recent = Sticky::default();
        recent.sent(true, Which::Primary, false, &ryw, now);
        assert_eq!(choose(read(), state(&recent), &ryw, now).target, Which::Primary);
        let later = now + Duration::from_millis(600);
        assert_eq!(choose(read(), state(&recent), &ryw, later).target, Which::Standby);
        let mut standby_write = Sticky::default();
        standby_write.sent(true, Which::Standby, false, &ryw, now);
        assert_eq!(
            standby_write.wrote,
            Wrote::Never,
            "only a write the primary ran counts"
        );
    }

    fn begin() -> Request {
        Request {
            standby_ok: false,
            writes: false,
            mode: Mode::Sync,
            role: Role::Begin(Isolation::Default),
            copy_in: false,
            ends_tx: false,
        }
    }

    fn step(c: Choice) -> (Which, TxStep) {
        (c.target, c.step)
    }

    fn on_standby(sticky: &Sticky, phase: Phase, status: TxStatus) -> State<'_> {
        State {
            tx: Tx {
                status,
                on: Which::Standby,
            },
            phase,
            ..state(sticky)
        }
    }

    #[test]
    fn a_plain_begin_opens_on_the_standby_until_a_write() {
        let r = RoutingConfig::default();
        let now = Instant::now();
        let st = Sticky::default();
        assert_eq!(
            step(choose(begin(), state(&st), &r, now)),
            (Which::Standby, TxStep::Open)
        );
        for iso in [Isolation::RepeatableRead, Isolation::Serializable] {
            let b = Request {
                role: Role::Begin(iso),
                ..begin()
            };
            assert_eq!(
                step(choose(b, state(&st), &r, now)),
                (Which::Primary, TxStep::Stay),
                "{iso:?}: one snapshot, one node"
            );
        }
        let rc = Request {
            role: Role::Begin(Isolation::ReadCommitted),
            ..begin()
        };
        assert_eq!(step(choose(rc, state(&st), &r, now)).1, TxStep::Open);
        let pinned = Sticky {
            pinned: true,
            ..Sticky::default()
        };
        assert_eq!(
            step(choose(begin(), state(&pinned), &r, now)),
            (Which::Primary, TxStep::Stay)
        );
        let s = State {
            unreplayed: true,
            ..state(&st)
        };
        assert_eq!(
            step(choose(begin(), s, &r, now)).0,
            Which::Primary,
            "read your writes"
        );

        let ok = TxStatus::InTransaction;
        let begun = on_standby(&st, Phase::Begun, ok);
        let read_ = on_standby(&st, Phase::Read, ok);
        assert_eq!(
            step(choose(read(), begun, &r, now)),
            (Which::Standby, TxStep::Read)
        );
        assert_eq!(
            step(choose(write(), read_, &r, now)),
            (Which::Primary, TxStep::Move)
        );
        let control = Request {
            role: Role::Control,
            ..write()
        };
        assert_eq!(
            step(choose(control, read_, &r, now)),
            (Which::Standby, TxStep::Stay)
        );
        let snapshot = Request {
            role: Role::Snapshot,
            ..write()
        };
        assert_eq!(
            step(choose(snapshot, begun, &r, now)),
            (Which::Primary, TxStep::Move),
            "before any query: the transaction moves to the primary"
        );
        assert_eq!(
            step(choose(snapshot, read_, &r, now)),
            (Which::Standby, TxStep::Stay),
            "after a query: PostgreSQL's 25001 where it ran"
        );
        let failed = on_standby(&st, Phase::Read, TxStatus::Failed);
        assert_eq!(
            step(choose(write(), failed, &r, now)),
            (Which::Standby, TxStep::Stay),
            "a failed transaction stays where it failed"
        );
        let read_only = on_standby(&st, Phase::Whole, ok);
        assert_eq!(
            step(choose(write(), read_only, &r, now)),
            (Which::Standby, TxStep::Stay),
            "BEGIN READ ONLY keeps its block"
        );
        let mut s = state(&st);
        s.tx.status = ok;
        assert_eq!(step(choose(read(), s, &r, now)), (Which::Primary, TxStep::Stay));
    }

    #[test]
    fn write_modes_decide_which_transactions_balance() {
        let now = Instant::now();
        let mode = |m| RoutingConfig {
            disable_load_balance_on_write: m,
            ..RoutingConfig::default()
        };
        let mut outside = Sticky::default();
        outside.sent(true, Which::Primary, false, &RoutingConfig::default(), now);
        let mut inside = Sticky::default();
        inside.sent(true, Which::Primary, true, &RoutingConfig::default(), now);
        assert_eq!(inside.wrote, Wrote::InTransaction);
        inside.sent(true, Which::Primary, false, &RoutingConfig::default(), now);
        assert_eq!(inside.wrote, Wrote::InTransaction, "kept");
        let target = |m, st: &Sticky| choose(begin(), state(st), &mode(m), now).target;
        for m in [WriteStickiness::Transaction, WriteStickiness::Off] {
            assert_eq!(target(m, &inside), Which::Standby, "{m:?}");
        }
        assert_eq!(
            target(WriteStickiness::TransTransaction, &outside),
            Which::Standby
        );
        assert_eq!(target(WriteStickiness::TransTransaction, &inside), Which::Primary);
        assert_eq!(
            choose(
                read(),
                state(&inside),
                &mode(WriteStickiness::TransTransaction),
                now
            )
            .target,
            Which::Standby,
            "trans_transaction: reads outside transactions stay balanced"
        );
        assert_eq!(
            target(WriteStickiness::Always, &Sticky::default()),
            Which::Standby
        );
        assert_eq!(target(WriteStickiness::Always, &outside), Which::Primary);
    }

    #[test]
    fn roles_of_statements() {
        let c = Classifier::default();
        let role = |sql| Route::of(&c, sql).role;
        assert_eq!(role("begin"), Role::Begin(Isolation::Default));
        assert_eq!(
            role("start transaction isolation level repeatable read"),
            Role::Begin(Isolation::RepeatableRead)
        );
        assert_eq!(
            role("begin read only"),
            Role::Other,
            "READ ONLY runs whole on a standby"
        );
        assert_eq!(role("begin; select 1"), Role::Other);
        for ctl in [
            "commit",
            "ROLLBACK",
            "savepoint a",
            "release a",
            "rollback to a",
            "end",
            "commit and chain",
        ] {
            assert_eq!(role(ctl), Role::Control, "{ctl}");
            assert!(!Route::of(&c, ctl).writes, "{ctl}");
        }
        assert_eq!(role("prepare transaction 'x'"), Role::Other);
        assert_eq!(role("insert into t values (1); commit"), Role::Other);
        assert_eq!(
            role("set transaction isolation level serializable"),
            Role::Snapshot
        );
        assert_eq!(
            role("set transaction isolation level read uncommitted"),
            Role::Snapshot
        );
        assert_eq!(role("set transaction snapshot '1'"), Role::Snapshot);
        assert_eq!(
            role("set transaction isolation level read committed"),
            Role::Other
        );
        assert_eq!(role("set transaction read write"), Role::Other);
        assert_eq!(role("select 1"), Role::Other);
    }

    #[test]
    fn the_wal_position_is_learned_behind_writes() {
        let lsn = RoutingConfig::default();
        assert!(lsn.read_your_writes_by_lsn, "on by default");
        let off = RoutingConfig {
            read_your_writes_by_lsn: false,
            ..RoutingConfig::default()
        };
        let now = Instant::now();
        let st = Sticky::default();
        assert!(choose(write(), state(&st), &lsn, now).capture_lsn);
        assert!(!choose(read(), state(&st), &lsn, now).capture_lsn);
        let flush = Request {
            mode: Mode::Flush,
            ..write()
        };
        assert!(
            !choose(flush, state(&st), &lsn, now).capture_lsn,
            "only at a Sync"
        );
        let copy = Request {
            copy_in: true,
            ..write()
        };
        assert!(
            !choose(copy, state(&st), &lsn, now).capture_lsn,
            "nothing behind a COPY FROM STDIN"
        );
        assert!(!choose(write(), state(&st), &off, now).capture_lsn);
        let mut s = state(&st);
        s.tx.status = TxStatus::InTransaction;
        assert!(
            !choose(write(), s, &lsn, now).capture_lsn,
            "inside a transaction, a lone statement that cannot end it"
        );
        let commit = Request {
            ends_tx: true,
            role: Role::Control,
            writes: false,
            ..write()
        };
        assert!(
            choose(commit, s, &lsn, now).capture_lsn,
            "what may end a transaction that may have written"
        );
        s.tx.status = TxStatus::Failed;
        assert!(choose(commit, s, &lsn, now).capture_lsn, "a failed one too");
        let mut s = state(&st);
        s.unreplayed = true;
        assert!(
            choose(read(), s, &lsn, now).capture_lsn,
            "a read the primary runs in a standby's stead bounds later reads"
        );
        let pinned = Sticky {
            pinned: true,
            ..Sticky::default()
        };
        assert!(
            !choose(read(), state(&pinned), &lsn, now).capture_lsn,
            "a pinned session never reads on a standby again"
        );
        assert!(!choose(write(), state(&pinned), &lsn, now).capture_lsn);
    }
}
