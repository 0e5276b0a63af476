//! Which session settings (SET, RESET, DISCARD, `set_config(..., false)`) a session's requests
//! leave in force, so that only those are replayed on its other backend connections. No I/O: it
//! follows the statements sent and the answers that come back, one CommandComplete or error per
//! statement, and PostgreSQL's transaction rules:
//!
//! - a SET is undone if its transaction rolls back; a multi-statement Query, and the statements
//!   of an extended-protocol batch up to Sync, run as one implicit transaction unless BEGIN/COMMIT
//!   say otherwise, so an error in one undoes the SETs before it (BEGIN in the middle turns that
//!   implicit transaction into an explicit one, statements before it included);
//! - ROLLBACK TO a savepoint undoes the SETs made after it; RELEASE keeps them;
//! - SET LOCAL never outlives its transaction, so it is never remembered.
//!
//! The status byte of each ReadyForQuery is checked against the model; when statements and
//! answers do not line up (a split the lexer got wrong), the tracker says so and the session
//! keeps to the connection that ran them.

use std::collections::{HashMap, VecDeque};

use crate::classify::Step;

/// The most SETs and savepoints one transaction may have pending; past it the tracker gives up
/// (the session then stays on the primary), so memory stays bounded whatever the client sends.
pub const MAX_PENDING: usize = 1024;

/// The statements and the answers did not line up: which settings hold is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// No explicit transaction: what runs commits at the end of the request (or at COMMIT).
    Implicit,
    /// Inside BEGIN ... (status `T`).
    Explicit,
    /// An explicit transaction that failed (status `E`).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Set(String),
    Savepoint(String),
}

/// Follows one session's requests; see the module comment.
#[derive(Debug)]
pub struct Tracker {
    /// SETs (and savepoints among them) of the transaction in progress, not committed yet.
    open: Vec<Pending>,
    /// Steps of the statements sent in this cycle whose answers have not arrived, in order.
    expect: VecDeque<Step>,
    block: Block,
    /// The current cycle is followed (off for simple queries that can change nothing).
    active: bool,
    /// An error arrived: PostgreSQL skips the rest of the request.
    skipping: bool,
    /// Something of this cycle could not be split into statements.
    unsure: bool,
    /// What each portal of the open transaction executes.
    unnamed: Step,
    portals: HashMap<String, Step>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            open: Vec::new(),
            expect: VecDeque::new(),
            block: Block::Implicit,
            active: false,
            skipping: false,
            unsure: false,
            unnamed: Step::Other,
            portals: HashMap::new(),
        }
    }
}

/// Whether `tag` (a CommandComplete tag) ends, starts or marks a transaction.
fn is_control(tag: &[u8]) -> bool {
    matches!(
        tag,
        b"BEGIN"
            | b"START TRANSACTION"
            | b"COMMIT"
            | b"ROLLBACK"
            | b"SAVEPOINT"
            | b"RELEASE"
            | b"PREPARE TRANSACTION"
    )
}

impl Tracker {
    /// Whether a request must be followed even if it holds no SET or transaction command: an
    /// open transaction has SETs that a ROLLBACK TO, an error or a COMMIT decides on.
    pub fn needed(&self) -> bool {
        !self.open.is_empty()
    }

    /// Whether the current cycle is followed.
    pub fn active(&self) -> bool {
        self.active
    }

    /// A new request cycle begins with transaction status `status` (of the last ReadyForQuery);
    /// `follow` turns following on (it stays on for the rest of the cycle once on).
    pub fn start(&mut self, status: u8, follow: bool) {
        self.block = match status {
            b'T' => Block::Explicit,
            b'E' => Block::Failed,
            _ => Block::Implicit,
        };
        self.expect.clear();
        self.active = follow;
        self.skipping = false;
        self.unsure = false;
    }

    /// Turns following on in the middle of a cycle (a later batch of it has SETs). Only sound
    /// while nothing of the cycle was sent unfollowed, which the session guarantees by
    /// following every extended-protocol cycle.
    pub fn follow(&mut self) {
        self.active = true;
    }

    /// The statements of a simple Query were sent (`None`: they could not be split).
    pub fn query(&mut self, steps: Option<Vec<Step>>) {
        match steps {
            Some(s) if !self.skipping => self.expect.extend(s),
            Some(_) => {}
            None => self.unsure = true,
        }
    }

    /// A Bind of `portal` to a statement whose step is `step` was sent.
    pub fn bind(&mut self, portal: &str, step: Step) {
        if portal.is_empty() {
            self.unnamed = step;
        } else {
            self.portals.insert(portal.to_string(), step);
        }
    }

    /// An Execute of `portal` was sent.
    pub fn execute(&mut self, portal: &str) {
        if self.skipping {
            return;
        }
        let step = if portal.is_empty() {
            self.unnamed.clone()
        } else {
            self.portals.get(portal).cloned().unwrap_or(Step::Other)
        };
        self.expect.push_back(step);
    }

    /// A CommandComplete with `tag` arrived; returns the SETs it committed (in order).
    pub fn complete(&mut self, tag: &[u8]) -> Result<Vec<String>, Lost> {
        if !self.active {
            return Ok(Vec::new());
        }
        let Some(step) = self.expect.pop_front() else {
            return Err(self.lost());
        };
        let fits = match &step {
            Step::Set(_) => !is_control(tag),
            Step::Begin => matches!(tag, b"BEGIN" | b"START TRANSACTION"),
            Step::Commit { .. } => matches!(tag, b"COMMIT" | b"ROLLBACK" | b"PREPARE TRANSACTION"),
            Step::Rollback { .. } | Step::RollbackTo(_) => tag == b"ROLLBACK",
            Step::Savepoint(_) => tag == b"SAVEPOINT",
            Step::Release(_) => tag == b"RELEASE",
            Step::Other => !is_control(tag) && tag != b"RESET" && !tag.starts_with(b"DISCARD"),
            Step::Unknown => false,
        };
        let grows = matches!(step, Step::Set(_) | Step::Savepoint(_));
        if !fits
            || (grows && self.open.len() >= MAX_PENDING)
            || self.block == Block::Failed
                && !matches!(
                    step,
                    Step::Commit { .. } | Step::Rollback { .. } | Step::RollbackTo(_)
                )
        {
            return Err(self.lost());
        }
        let mut committed = Vec::new();
        match step {
            Step::Set(text) => self.open.push(Pending::Set(text)),
            Step::Begin => self.block = Block::Explicit,
            Step::Commit { chain } | Step::Rollback { chain } => {
                // A failed transaction's COMMIT answers ROLLBACK; PREPARE TRANSACTION keeps
                // the settings, as a commit does.
                if tag == b"ROLLBACK" {
                    self.open.clear();
                } else {
                    committed = self.commit();
                }
                self.block = if chain { Block::Explicit } else { Block::Implicit };
                if !chain {
                    self.forget_portals();
                }
            }
            Step::Savepoint(name) => self.open.push(Pending::Savepoint(name)),
            Step::Release(name) => {
                // Releasing a savepoint releases the ones made after it too; one made before
                // anything was remembered releases every remembered one.
                let at = self.savepoint(&name).unwrap_or(0);
                let mut i = 0;
                self.open.retain(|p| {
                    i += 1;
                    i <= at || matches!(p, Pending::Set(_))
                });
            }
            Step::RollbackTo(name) => {
                // Undoes what followed the savepoint, which itself stays.
                let keep = self.savepoint(&name).map_or(0, |i| i + 1);
                self.open.truncate(keep);
                self.block = Block::Explicit;
            }
            Step::Other | Step::Unknown => {}
        }
        Ok(committed)
    }

    /// An ErrorResponse arrived: PostgreSQL skips the rest of the request, and the transaction
    /// it ran in is undone (an implicit one) or failed (an explicit one).
    pub fn error(&mut self) {
        if !self.active {
            return;
        }
        self.expect.clear();
        self.skipping = true;
        match self.block {
            Block::Implicit => self.open.clear(),
            Block::Explicit | Block::Failed => self.block = Block::Failed,
        }
    }

    /// An answer that ends a statement without CommandComplete (EmptyQueryResponse,
    /// PortalSuspended) arrived.
    pub fn ended(&mut self) {
        if self.active {
            self.expect.pop_front();
        }
    }

    /// The request's connection was lost before its ReadyForQuery: nothing of it holds, on a
    /// connection that is gone.
    pub fn abandon(&mut self) {
        self.lost();
    }

    /// The cycle's ReadyForQuery arrived with `status`; returns the SETs that committed.
    pub fn ready(&mut self, status: u8) -> Result<Vec<String>, Lost> {
        if status == b'I' {
            self.forget_portals();
        }
        if !std::mem::take(&mut self.active) {
            self.expect.clear();
            return Ok(Vec::new());
        }
        let aligned = (self.skipping || self.expect.is_empty()) && !self.unsure;
        self.expect.clear();
        let out = match (self.block, status) {
            _ if !aligned => return Err(self.lost()),
            (Block::Implicit, b'I') => self.commit(),
            (Block::Explicit, b'T') | (Block::Failed, b'E') => Vec::new(),
            _ => return Err(self.lost()),
        };
        Ok(out)
    }

    fn commit(&mut self) -> Vec<String> {
        self.open
            .drain(..)
            .filter_map(|p| match p {
                Pending::Set(s) => Some(s),
                Pending::Savepoint(_) => None,
            })
            .collect()
    }

    /// The index in `open` of the latest savepoint called `name`.
    fn savepoint(&self, name: &str) -> Option<usize> {
        self.open
            .iter()
            .rposition(|p| matches!(p, Pending::Savepoint(n) if n == name))
    }

    fn forget_portals(&mut self) {
        self.unnamed = Step::Other;
        self.portals.clear();
    }

    fn lost(&mut self) -> Lost {
        self.open.clear();
        self.expect.clear();
        self.active = false;
        Lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Classifier;

    /// Runs a simple Query `sql` starting in `status`, with PostgreSQL's answers `answers`
    /// (`C:TAG`, `E`, `Z:status`), and returns what committed.
    fn run(t: &mut Tracker, status: u8, sql: &str, answers: &[&str]) -> Result<Vec<String>, Lost> {
        t.start(status, true);
        t.query(Classifier::default().steps(sql));
        let mut out = Vec::new();
        for a in answers {
            match a.split_once(':') {
                Some(("C", tag)) => out.extend(t.complete(tag.as_bytes())?),
                Some(("Z", s)) => out.extend(t.ready(s.as_bytes()[0])?),
                _ => t.error(),
            }
        }
        Ok(out)
    }

    #[test]
    fn rolled_back_sets_are_forgotten() {
        let mut t = Tracker::default();
        let r = run(
            &mut t,
            b'I',
            "begin; set a = 1; rollback",
            &["C:BEGIN", "C:SET", "C:ROLLBACK", "Z:I"],
        );
        assert_eq!(r, Ok(vec![]));
        let r = run(
            &mut t,
            b'I',
            "begin; set a = 1; abort",
            &["C:BEGIN", "C:SET", "C:ROLLBACK", "Z:I"],
        );
        assert_eq!(r, Ok(vec![]));
        // An error in an implicit transaction undoes the SET before it.
        let r = run(&mut t, b'I', "set a = 1; select 1/0", &["C:SET", "E", "Z:I"]);
        assert_eq!(r, Ok(vec![]));
        // ROLLBACK in an implicit transaction undoes it too (PostgreSQL warns, then rolls back).
        let r = run(
            &mut t,
            b'I',
            "set a = 1; rollback",
            &["C:SET", "C:ROLLBACK", "Z:I"],
        );
        assert_eq!(r, Ok(vec![]));
        // An explicit transaction that fails keeps its SETs pending until it ends.
        let r = run(
            &mut t,
            b'I',
            "begin; set a = 1; select 1/0",
            &["C:BEGIN", "C:SET", "E", "Z:E"],
        );
        assert_eq!(r, Ok(vec![]));
        assert!(t.needed());
        assert_eq!(run(&mut t, b'E', "commit", &["C:ROLLBACK", "Z:I"]), Ok(vec![]));
        assert!(!t.needed());
        // SETs before a BEGIN join the explicit transaction.
        let r = run(
            &mut t,
            b'I',
            "set a = 1; begin; select 1/0",
            &["C:SET", "C:BEGIN", "E", "Z:E"],
        );
        assert_eq!(r, Ok(vec![]));
        assert_eq!(run(&mut t, b'E', "rollback", &["C:ROLLBACK", "Z:I"]), Ok(vec![]));
        // SET LOCAL is never remembered.
        let r = run(
            &mut t,
            b'I',
            "begin; set local a = 1; commit",
            &["C:BEGIN", "C:SET", "C:COMMIT", "Z:I"],
        );
        assert_eq!(r, Ok(vec![]));
    }

    #[test]
    fn committed_sets_hold() {
        let mut t = Tracker::default();
        assert_eq!(
            run(&mut t, b'I', "set a = 1", &["C:SET", "Z:I"]),
            Ok(vec!["set a = 1".into()])
        );
        let r = run(
            &mut t,
            b'I',
            "begin; set a = 2; rollback; set b = 3",
            &["C:BEGIN", "C:SET", "C:ROLLBACK", "C:SET", "Z:I"],
        );
        assert_eq!(r, Ok(vec!["set b = 3".into()]));
        // Across requests: pending while the transaction is open, committed by COMMIT.
        assert_eq!(
            run(&mut t, b'I', "begin; set c = 4", &["C:BEGIN", "C:SET", "Z:T"]),
            Ok(vec![])
        );
        assert_eq!(run(&mut t, b'T', "select 1", &["C:SELECT 1", "Z:T"]), Ok(vec![]));
        assert_eq!(
            run(&mut t, b'T', "commit", &["C:COMMIT", "Z:I"]),
            Ok(vec!["set c = 4".into()])
        );
        // COMMIT AND CHAIN commits what came before and opens the next transaction.
        let r = run(
            &mut t,
            b'I',
            "begin; set d = 5; commit and chain; set e = 6; rollback",
            &["C:BEGIN", "C:SET", "C:COMMIT", "C:SET", "C:ROLLBACK", "Z:I"],
        );
        assert_eq!(r, Ok(vec!["set d = 5".into()]));
    }

    #[test]
    fn savepoints() {
        let mut t = Tracker::default();
        let r = run(
            &mut t,
            b'I',
            "begin; set a = 1; savepoint s; set b = 2; rollback to s; commit",
            &[
                "C:BEGIN",
                "C:SET",
                "C:SAVEPOINT",
                "C:SET",
                "C:ROLLBACK",
                "C:COMMIT",
                "Z:I",
            ],
        );
        assert_eq!(r, Ok(vec!["set a = 1".into()]));
        let r = run(
            &mut t,
            b'I',
            "begin; savepoint s; set a = 1; release s; commit",
            &["C:BEGIN", "C:SAVEPOINT", "C:SET", "C:RELEASE", "C:COMMIT", "Z:I"],
        );
        assert_eq!(r, Ok(vec!["set a = 1".into()]));
        // A savepoint made before anything was followed: rolling back to it undoes every SET.
        assert_eq!(run(&mut t, b'T', "set a = 1", &["C:SET", "Z:T"]), Ok(vec![]));
        assert_eq!(
            run(&mut t, b'T', "rollback to x", &["C:ROLLBACK", "Z:T"]),
            Ok(vec![])
        );
        assert_eq!(run(&mut t, b'T', "commit", &["C:COMMIT", "Z:I"]), Ok(vec![]));
        // ROLLBACK TO recovers a failed transaction.
        let r = run(
            &mut t,
            b'I',
            "begin; set a = 1; savepoint s; select 1/0",
            &["C:BEGIN", "C:SET", "C:SAVEPOINT", "E", "Z:E"],
        );
        assert_eq!(r, Ok(vec![]));
        assert_eq!(
            run(
                &mut t,
                b'E',
                "rollback to s; commit",
                &["C:ROLLBACK", "C:COMMIT", "Z:I"]
            ),
            Ok(vec!["set a = 1".into()])
        );
    }

    #[test]
    fn extended_protocol_batches() {
        let mut t = Tracker::default();
        // Bind + Execute of a SET, then of a failing statement, before Sync: one implicit transaction.
        t.start(b'I', true);
        t.bind("", Step::Set("set a = 1".into()));
        t.execute("");
        t.bind("p", Step::Other);
        t.execute("p");
        assert_eq!(t.complete(b"SET"), Ok(vec![]));
        t.error();
        t.execute("p"); // skipped by PostgreSQL until Sync
        assert_eq!(t.ready(b'I'), Ok(vec![]));
        // Executed in parts (PortalSuspended), then committed at Sync.
        t.start(b'I', true);
        t.bind("", Step::Set("set b = 2".into()));
        t.execute("");
        t.bind("c", Step::Other);
        t.execute("c");
        assert_eq!(t.complete(b"SET"), Ok(vec![]));
        t.ended();
        t.execute("c");
        assert_eq!(t.complete(b"SELECT 3"), Ok(vec![]));
        assert_eq!(t.ready(b'I'), Ok(vec!["set b = 2".into()]));
    }

    #[test]
    fn misalignment_is_reported() {
        let mut t = Tracker::default();
        // More answers than statements.
        assert_eq!(run(&mut t, b'I', "set a = 1", &["C:SET", "C:SET"]), Err(Lost));
        // A status the model does not expect.
        assert_eq!(run(&mut t, b'I', "set a = 1", &["C:SET", "Z:T"]), Err(Lost));
        // A transaction command where a SET was expected.
        assert_eq!(run(&mut t, b'I', "set a = 1", &["C:COMMIT"]), Err(Lost));
        // Too many pending SETs in one transaction.
        t.start(b'T', true);
        t.query(Some(vec![Step::Set("set a = 1".into()); MAX_PENDING + 1]));
        for _ in 0..MAX_PENDING {
            assert_eq!(t.complete(b"SET"), Ok(vec![]));
        }
        assert_eq!(t.complete(b"SET"), Err(Lost));
        assert!(!t.needed());
        // A string that cannot be split.
        let sql = "set a = 1; create function f() returns int begin atomic select 1; end";
        assert_eq!(
            run(&mut t, b'I', sql, &["C:SET", "C:CREATE FUNCTION", "Z:I"]),
            Err(Lost)
        );
        assert!(!t.needed(), "nothing uncertain is kept");
        // Unfollowed cycles change nothing.
        t.start(b'I', false);
        assert_eq!(t.complete(b"SELECT 1"), Ok(vec![]));
        assert_eq!(t.ready(b'I'), Ok(vec![]));
    }
}
