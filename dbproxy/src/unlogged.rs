//! Which relations of each database are unlogged (`pg_class.relpersistence = 'u'`): a standby
//! refuses to read them (`cannot access temporary or unlogged relations during recovery`), so
//! reads that name one go to the primary (see [`crate::classify::Classifier::classify_with`]).
//!
//! A session learns the names from the primary's catalog on its own primary connection, before
//! it routes its next statement: when nobody has learned them yet for its database since
//! dbproxy started, and after its own CREATE, ALTER or DROP has committed. A name missed
//! (DDL through another dbproxy or straight to the server) costs one round trip outside an
//! explicit transaction: the standby's refusal is replayed on the primary like a 25006. No I/O
//! here: the session runs [`QUERY`] and hands the rows to [`Db::learned`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::classify::Relations;

/// The catalog query that lists a database's unlogged relations (tables, their indexes and
/// sequences, materialized views).
pub const QUERY: &str = "select relname::text from pg_catalog.pg_class where relpersistence = 'u'";

/// The most names kept for one database; past it the list is cut (a read of a name left out is
/// refused by the standby and replayed on the primary).
pub const MAX_NAMES: usize = 10_000;

/// The unlogged relations of every database seen, shared by all sessions and configuration
/// generations.
#[derive(Debug, Default)]
pub struct Unlogged {
    dbs: Mutex<HashMap<String, Arc<Db>>>,
}

impl Unlogged {
    /// Database `name`'s entry (made empty, not learned yet, the first time).
    pub fn db(&self, name: &str) -> Arc<Db> {
        let mut dbs = self.dbs.lock().expect("unlogged poisoned");
        dbs.entry(name.to_string()).or_default().clone()
    }
}

/// One database's unlogged relations.
#[derive(Debug, Default)]
pub struct Db {
    names: ArcSwap<Relations>,
    /// How many times the names were learned (0: never): a prepared statement classified before
    /// the last time is classified again at its next use.
    generation: AtomicU64,
}

impl Db {
    /// The names known now (lock-free: read for every query).
    pub fn names(&self) -> arc_swap::Guard<Arc<Relations>> {
        self.names.load()
    }

    /// How many times the names were learned.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The names a session read from the catalog.
    pub fn learned(&self, mut names: Vec<Vec<u8>>) {
        names.truncate(MAX_NAMES);
        self.names.store(Arc::new(Relations::new(names)));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether `sql` (the bytes a client sent) may change which relations are unlogged: it starts
/// with CREATE, ALTER or DROP, or is a SELECT INTO (which can make an unlogged table).
pub fn may_change(sql: &[u8]) -> bool {
    let head = sql.trim_ascii_start();
    let starts = |w: &[u8]| head.len() >= w.len() && head[..w.len()].eq_ignore_ascii_case(w);
    if starts(b"create") || starts(b"alter") || starts(b"drop") {
        return true;
    }
    starts(b"select") && head.windows(8).any(|w| w.eq_ignore_ascii_case(b"unlogged"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_has_its_names() {
        let reg = Unlogged::default();
        let db = reg.db("app");
        assert!(Arc::ptr_eq(&db, &reg.db("app")));
        assert!(!Arc::ptr_eq(&db, &reg.db("other")));
        assert_eq!((db.names().len(), db.generation()), (0, 0));
        db.learned(vec![b"u1".to_vec(), b"u1_pkey".to_vec()]);
        assert_eq!((db.names().len(), db.generation()), (2, 1));
        db.learned(Vec::new());
        assert_eq!((db.names().len(), db.generation()), (0, 2));
        assert_eq!(reg.db("other").generation(), 0);
    }

    #[test]
    fn statements_that_may_change_persistence() {
        for sql in [
            "create unlogged table u (id int)",
            "  ALTER TABLE t SET UNLOGGED",
            "drop table u",
            "select * into unlogged table u2 from t",
        ] {
            assert!(may_change(sql.as_bytes()), "{sql}");
        }
        for sql in ["select * from u", "insert into u values (1)", "dro", ""] {
            assert!(!may_change(sql.as_bytes()), "{sql}");
        }
    }
}
