//! The durable cluster record: which node is the elected primary, its timeline, a term bumped on
//! every change, and the fenced nodes with the term that fenced each. It is the one source of
//! truth for "who is primary" across restarts: the failover manager writes it *before* routing
//! changes and reads it at start-up.
//!
//! It lives behind [`RecordStore`] (load, and a store that only succeeds when the stored term is
//! the one the caller last saw), so a store in etcd can replace the file without changing callers.
//! [`FileStore`] keeps it in `state_dir/cluster.json`, replaced atomically: written to a temporary
//! file, fsync'd, renamed over the old one, and the directory fsync'd, so a crash leaves either
//! the old record or the new one, never a torn file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// The record's file format version.
pub const FORMAT: u32 = 1;

/// The file [`FileStore`] keeps the record in, inside `state_dir`.
pub const FILE_NAME: &str = "cluster.json";

/// Who is primary, durably.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRecord {
    /// File format version ([`FORMAT`]).
    #[serde(default)]
    pub format: u32,
    /// Bumped on every change; 0 only before the first record was written.
    pub term: u64,
    /// The elected primary's node name.
    pub primary: Option<String>,
    /// The timeline the elected primary writes on, when known.
    pub timeline: Option<u32>,
    /// Fenced nodes by name, with the term whose change fenced each.
    #[serde(default)]
    pub fenced: BTreeMap<String, u64>,
    /// A promotion the leader started and had not finished when it wrote this record, with the
    /// step it had reached, so whoever leads next finishes or rolls it back. Absent (and not
    /// written) when none is under way, so records of earlier versions read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Pending>,
}

/// A promotion under way: failover or switchover from `from` to `to`, at `step`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// What is under way.
    pub kind: PendingKind,
    /// The primary being replaced.
    pub from: String,
    /// The standby being promoted.
    pub to: String,
    /// How far it got.
    pub step: Step,
}

/// Which operation a [`Pending`] promotion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingKind {
    /// The primary was lost.
    Failover,
    /// A planned switchover (the old primary is read-only while it runs).
    Switchover,
}

/// How far a [`Pending`] promotion got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Written just before the promotion: `to` may or may not be a primary now. The record's
    /// `primary` is still `from`; instances route no writes while this is the newest record.
    Promoting,
    /// `to` was promoted and the record names it; the other standbys may not follow it yet.
    Switched,
}

impl Step {
    /// Its name in records, logs and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Promoting => "promoting",
            Step::Switched => "switched",
        }
    }
}

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The state directory or file cannot be read.
    #[error("cannot read the cluster record {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds something that is not a record.
    #[error(
        "the cluster record {path} is unreadable ({reason}); dbproxy will not guess who is primary: \
         restore it, or move it away to start with discovery from the nodes"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing, syncing or renaming failed.
    #[error("cannot write the cluster record {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store (etcd) cannot be reached or answered with an error.
    #[error("cannot reach the cluster record at {location}: {reason}")]
    Unavailable {
        /// Where the record is kept.
        location: String,
        /// What went wrong.
        reason: String,
    },
    /// This instance does not hold the leader lease, so it must not change the record.
    #[error("this dbproxy does not hold the leader lease; it only follows the cluster record")]
    NotLeader,
    /// Someone else changed the record since it was read.
    #[error("the cluster record changed meanwhile (expected term {expected}, found {found})")]
    Conflict {
        /// The term the caller last saw.
        expected: u64,
        /// The term stored.
        found: u64,
    },
}

/// Where the record is kept.
pub trait RecordStore: Send + Sync {
    /// The stored record; `None` when none was ever written.
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, RecordError>>;
    /// Replaces the record with `next` if the stored one is still at term `expected` (0: none is
    /// stored); [`RecordError::Conflict`] otherwise. Durable when it returns `Ok`.
    fn store<'a>(&'a self, expected: u64, next: &'a ClusterRecord) -> BoxFuture<'a, Result<(), RecordError>>;
    /// Where it is kept, for logs and `/status`.
    fn location(&self) -> String;
}

/// The record in a file of `state_dir`.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    path: PathBuf,
    /// Serialises stores from this process (the check of the term and the rename are one step).
    lock: tokio::sync::Mutex<()>,
}

impl FileStore {
    /// A store in directory `dir` (created on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> FileStore {
        let dir = dir.into();
        FileStore {
            path: dir.join(FILE_NAME),
            dir,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// A store in directory `dir`, created if missing and checked to be writable now, so a
    /// directory dbproxy cannot write fails at start-up rather than at the first failover.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore, RecordError> {
        let store = FileStore::new(dir);
        let err = |source| RecordError::Write {
            path: store.path.clone(),
            source,
        };
        std::fs::create_dir_all(&store.dir).map_err(err)?;
        let probe = store.dir.join(format!(".{FILE_NAME}.probe"));
        std::fs::write(&probe, b"").map_err(err)?;
        std::fs::remove_file(&probe).map_err(err)?;
        Ok(store)
    }

    /// The record file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the record file; `None` when it does not exist.
pub fn read_file(path: &Path) -> Result<Option<ClusterRecord>, RecordError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    decode(&bytes, path).map(Some)
}

/// Decodes a stored record (from a file or etcd); `path` names where it came from in the error.
pub fn decode(bytes: &[u8], path: &Path) -> Result<ClusterRecord, RecordError> {
    let corrupt = |reason: String| RecordError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let record: ClusterRecord = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if record.format != FORMAT {
        return Err(corrupt(format!("format {} is not {FORMAT}", record.format)));
    }
    if record.term == 0 {
        return Err(corrupt("term 0 is never written".into()));
    }
    Ok(record)
}

/// Writes `record` to `path` atomically and durably: a temporary file in the same directory,
/// fsync'd, renamed over `path`, then the directory fsync'd so the rename itself survives a crash.
pub fn write_file(dir: &Path, path: &Path, record: &ClusterRecord) -> Result<(), RecordError> {
    let err = |source| RecordError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let mut body = serde_json::to_vec_pretty(record).expect("a record serialises");
    body.push(b'\n');
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

impl RecordStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, RecordError>> {
        Box::pin(async move {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || read_file(&path))
                .await
                .expect("reading the record does not panic")
        })
    }

    fn store<'a>(&'a self, expected: u64, next: &'a ClusterRecord) -> BoxFuture<'a, Result<(), RecordError>> {
        Box::pin(async move {
            let _one = self.lock.lock().await;
            let (dir, path, mut next) = (self.dir.clone(), self.path.clone(), next.clone());
            next.format = FORMAT;
            tokio::task::spawn_blocking(move || {
                let found = read_file(&path)?.map_or(0, |r| r.term);
                if found != expected {
                    return Err(RecordError::Conflict { expected, found });
                }
                write_file(&dir, &path, &next)
            })
            .await
            .expect("writing the record does not panic")
        })
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(term: u64, primary: &str) -> ClusterRecord {
        ClusterRecord {
            format: FORMAT,
            term,
            primary: Some(primary.into()),
            timeline: Some(2),
            fenced: [("node0".to_string(), term)].into(),
            operation: None,
        }
    }

    #[tokio::test]
    async fn a_pending_promotion_round_trips_and_older_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        // A record as the previous version wrote it: no `operation` key.
        std::fs::write(
            store.path(),
            r#"{"format": 1, "term": 4, "primary": "node1", "timeline": 2, "fenced": {"node0": 3}}"#,
        )
        .unwrap();
        let old = store.load().await.unwrap().unwrap();
        assert_eq!(old.operation, None);
        let mut next = record(5, "node1");
        next.operation = Some(Pending {
            kind: PendingKind::Failover,
            from: "node1".into(),
            to: "node2".into(),
            step: Step::Promoting,
        });
        store.store(4, &next).await.unwrap();
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(text.contains(r#""step": "promoting""#), "{text}");
        assert_eq!(store.load().await.unwrap(), Some(next.clone()));
        next.operation = None;
        store
            .store(5, &{
                let mut r = next.clone();
                r.term = 6;
                r
            })
            .await
            .unwrap();
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(
            !text.contains("operation"),
            "none under way is not written: {text}"
        );
        std::fs::write(
            store.path(),
            r#"{"format": 1, "term": 7, "primary": "node1", "timeline": 2,
                "operation": {"kind": "failover", "from": "node1", "to": "node2", "step": "halfway"}}"#,
        )
        .unwrap();
        let e = store.load().await.unwrap_err().to_string();
        assert!(e.contains("is unreadable") && e.contains("halfway"), "{e}");
    }

    #[tokio::test]
    async fn a_store_needs_the_term_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state"));
        assert_eq!(store.load().await.unwrap(), None);
        store.store(0, &record(1, "node1")).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(record(1, "node1")));
        let e = store.store(0, &record(2, "node2")).await.unwrap_err();
        assert!(
            matches!(
                e,
                RecordError::Conflict {
                    expected: 0,
                    found: 1
                }
            ),
            "{e}"
        );
        store.store(1, &record(2, "node2")).await.unwrap();
        assert_eq!(
            store.load().await.unwrap().unwrap().primary.as_deref(),
            Some("node2")
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [FILE_NAME], "the temporary file was renamed");
    }

    #[tokio::test]
    async fn a_corrupt_record_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        for (bad, why) in [
            ("{\"term\": 3, \"primary\": ", "EOF"),
            (
                "{\"format\": 1, \"term\": 0, \"primary\": null, \"timeline\": null}",
                "term 0",
            ),
            (
                "{\"format\": 9, \"term\": 1, \"primary\": null, \"timeline\": null}",
                "format 9",
            ),
            (
                "{\"format\": 1, \"term\": 1, \"primary\": 5, \"timeline\": null}",
                "invalid type",
            ),
        ] {
            std::fs::write(store.path(), bad).unwrap();
            let e = store.load().await.unwrap_err().to_string();
            assert!(e.contains("is unreadable") && e.contains(why), "{bad}: {e}");
            assert!(e.contains(&store.location()), "{e}");
            let e = store.store(0, &record(1, "node1")).await.unwrap_err();
            assert!(
                matches!(e, RecordError::Corrupt { .. }),
                "a store never overwrites it: {e}"
            );
        }
    }
}
