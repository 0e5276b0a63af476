//! Routing: what a statement means for routing ([`Route`], from the classifier), what the
//! session remembers that keeps reads on the primary ([`Sticky`]), and [`choose`], the pure
//! decision of which backend runs a request. No I/O: unit-tested with fixed inputs.

use std::time::{Duration, Instant};

use crate::classify::{Classifier, Target, TxCommand};
use crate::cluster::Decision;
use crate::config::{RoutingConfig, WriteStickiness};

use super::cycle::{Mode, Tx, Which};

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
}

impl Route {
    /// Classifies `sql`.
    pub fn of(classifier: &Classifier, sql: &str) -> Route {
        let c = classifier.classify(sql);
        let begin_ro = matches!(c.tx, TxCommand::Begin { read_only: true });
        let control = !matches!(c.tx, TxCommand::None);
        Route {
            standby_ok: c.target == Target::Standby || begin_ro,
            writes: c.target == Target::Primary && !control && !c.session_set,
            pins: c.pins_session,
            follow: c.session_set || control || c.savepoint,
        }
    }
}

/// What a session remembers that keeps its reads on the primary.
#[derive(Debug, Default)]
pub(super) struct Sticky {
    /// Temporary tables, LISTEN, advisory locks or too many SETs keep the session on the primary.
    pub pinned: bool,
    /// The session has written (for `disable_load_balance_on_write = always`).
    pub wrote: bool,
    /// When it last wrote (for read-your-writes).
    pub last_write: Option<Instant>,
    /// The primary's WAL position after the session's last write (read-your-writes by LSN):
    /// reads go only to standbys that have replayed it.
    pub write_lsn: Option<u64>,
}

impl Sticky {
    /// A request was sent to `target`: a write there is remembered.
    pub fn sent(&mut self, writes: bool, target: Which, routing: &RoutingConfig, now: Instant) {
        if writes && target == Which::Primary {
            self.wrote = true;
            if routing.read_your_writes > 0 {
                self.last_write = Some(now);
            }
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
}

/// The session's state as far as routing goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct State<'a> {
    /// The backend holding the current cycle, if one is unfinished.
    pub cur: Option<Which>,
    pub tx: Tx,
    pub sticky: &'a Sticky,
    /// The session wrote at a WAL position no eligible standby has replayed yet, or at one
    /// dbproxy has not learnt yet.
    pub unreplayed: bool,
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
}

/// Chooses the backend for a request: the one holding an unfinished cycle; the one holding the
/// transaction; the primary for anything not sure to only read, or while the session must see
/// its own writes or is pinned; a standby otherwise.
pub(super) fn choose(req: Request, s: State<'_>, routing: &RoutingConfig, now: Instant) -> Choice {
    let recent_write = routing.read_your_writes > 0
        && s.sticky.last_write.is_some_and(|t| {
            now.saturating_duration_since(t) < Duration::from_millis(routing.read_your_writes)
        });
    let (target, decision) = if let Some(c) = s.cur {
        (c, None)
    } else if !s.tx.idle() {
        let on = if s.tx.on_standby() {
            Which::Standby
        } else {
            Which::Primary
        };
        (on, Some(Decision::PrimaryTransaction))
    } else if !req.standby_ok {
        (Which::Primary, Some(Decision::PrimaryWrite))
    } else if !routing.load_balance
        || s.sticky.pinned
        || s.unreplayed
        || (routing.disable_load_balance_on_write == WriteStickiness::Always && s.sticky.wrote)
        || recent_write
    {
        (Which::Primary, Some(Decision::PrimaryPinned))
    } else {
        (Which::Standby, None)
    };
    // A write, or a statement of a transaction that may commit one: learn the WAL position.
    let capture_lsn = routing.read_your_writes_by_lsn
        && target == Which::Primary
        && req.mode == Mode::Sync
        && (req.writes || !s.tx.idle());
    Choice {
        target,
        decision,
        capture_lsn,
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
        }
    }

    fn write() -> Request {
        Request {
            standby_ok: false,
            writes: true,
            mode: Mode::Sync,
        }
    }

    fn state(sticky: &Sticky) -> State<'_> {
        State {
            cur: None,
            tx: Tx::default(),
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
        wrote.sent(true, Which::Primary, &always, now);
        assert!(wrote.wrote);
        assert_eq!(choose(read(), state(&wrote), &always, now).target, Which::Primary);
        assert_eq!(choose(read(), state(&wrote), &r, now).target, Which::Standby);
        let ryw = RoutingConfig {
            read_your_writes: 500,
            ..RoutingConfig::default()
        };
        let mut recent = Sticky::default();
        recent.sent(true, Which::Primary, &ryw, now);
        assert_eq!(choose(read(), state(&recent), &ryw, now).target, Which::Primary);
        let later = now + Duration::from_millis(600);
        assert_eq!(choose(read(), state(&recent), &ryw, later).target, Which::Standby);
        let mut standby_write = Sticky::default();
        standby_write.sent(true, Which::Standby, &ryw, now);
        assert!(!standby_write.wrote, "only a write the primary ran counts");
    }

    #[test]
    fn the_wal_position_is_learned_behind_writes() {
        let lsn = RoutingConfig {
            read_your_writes_by_lsn: true,
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
        assert!(!choose(write(), state(&st), &RoutingConfig::default(), now).capture_lsn);
        let mut s = state(&st);
        s.tx.status = TxStatus::InTransaction;
        assert!(
            choose(read(), s, &lsn, now).capture_lsn,
            "a transaction may commit a write"
        );
    }
}
