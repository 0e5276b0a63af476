//! Samples waiting for the database: a bounded in-memory queue mirrored in an append-only file of
//! JSON lines, so neither an outage nor a restart of the collector loses a sample.
//!
//! The file may hold samples that were already written (it is only emptied when the queue is), so a
//! restart can re-send a few; the UNIQUE (host, sampled_at) key turns those into no-ops.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use schema::Sample;

/// Why the spool file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading, writing or syncing the spool file failed.
    #[error("spool file {path}: {source}")]
    Io {
        /// The spool file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What [`Spool::open`] found in an existing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Samples read back and queued again.
    pub samples: usize,
    /// Lines that were not valid samples (e.g. a line cut short by a crash) and were dropped.
    pub bad_lines: usize,
    /// Valid samples dropped because there were more than the capacity (the oldest go first).
    pub over_capacity: usize,
}

/// The queue of unwritten samples, oldest first.
#[derive(Debug)]
pub struct Spool {
    queue: VecDeque<Sample>,
    capacity: usize,
    file: Option<SpoolFile>,
    dropped: u64,
}

#[derive(Debug)]
struct SpoolFile {
    path: PathBuf,
    file: File,
    /// Lines in the file, written samples included: decides when to compact.
    lines: usize,
    /// The last append failed, so the file may end in a partial line.
    torn: bool,
}

impl Spool {
    /// A queue of at most `capacity` samples that lives only in memory.
    pub fn in_memory(capacity: usize) -> Self {
        Spool {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            file: None,
            dropped: 0,
        }
    }

    /// Opens (or creates) the spool file at `path`, queueing every valid sample in it.
    ///
    /// Invalid lines are skipped, not fatal: a crash can leave the last line half-written, and the
    /// lines before it must still be sent. The file is then rewritten to exactly the queue, so the
    /// next append never lands after a torn line.
    pub fn open(path: &Path, capacity: usize) -> Result<(Spool, Recovered), SpoolError> {
        let io = |source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut spool = Spool::in_memory(capacity);
        let mut rec = Recovered::default();
        match File::open(path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut buf = Vec::new();
                let mut line_no = 0;
                loop {
                    buf.clear();
                    let Some(complete) = read_line_bounded(&mut reader, &mut buf).map_err(io)? else {
                        break;
                    };
                    line_no += 1;
                    if !complete {
                        tracing::warn!(path = %path.display(), line = line_no,
                            "dropping a spool line longer than {MAX_LINE} bytes");
                        rec.bad_lines += 1;
                        continue;
                    }
                    let line = buf.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    match serde_json::from_slice::<Sample>(line) {
                        Ok(s) => {
                            if spool.queue.len() == spool.capacity {
                                spool.queue.pop_front();
                                rec.over_capacity += 1;
                            }
                            spool.queue.push_back(s);
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), line = line_no, error = %e,
                                "dropping a spool line that is not a sample");
                            rec.bad_lines += 1;
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        rec.samples = spool.queue.len();
        spool.file = Some(SpoolFile {
            path: path.to_path_buf(),
            file: rewrite(path, &spool.queue)?,
            lines: spool.queue.len(),
            torn: false,
        });
        Ok((spool, rec))
    }

    /// Queues a sample and appends it to the file (synced, so a crash right after keeps it).
    ///
    /// When the queue is full the oldest sample is dropped. A file error is returned, but the sample
    /// stays queued in memory: it is still written if the database comes back before a restart.
    pub fn push(&mut self, s: Sample) -> Result<(), SpoolError> {
        let mut line = serde_json::to_vec(&s).unwrap_or_default();
        line.push(b'\n');
        if self.queue.len() >= self.capacity {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(s);
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        if f.torn {
            // A failed append may have left half a line: rewrite the whole file rather than glue
            // the next sample onto it.
            return self.compact();
        }
        let appended = f.file.write_all(&line).and_then(|_| f.file.sync_data());
        if let Err(source) = appended {
            f.torn = true;
            return Err(SpoolError::Io {
                path: f.path.clone(),
                source,
            });
        }
        f.lines += 1;
        // Written samples linger in the file until the queue empties; a long outage with a
        // flaky database would grow it without bound, so rewrite it once it is twice the queue.
        if f.lines > 2 * self.capacity {
            self.compact()?;
        }
        Ok(())
    }

    /// The oldest unwritten sample.
    pub fn front(&self) -> Option<&Sample> {
        self.queue.front()
    }

    /// Removes the oldest sample if it is still the one stamped `sampled_at` (it may have been
    /// dropped for capacity while it was being written). Empties the file once the queue is empty.
    pub fn written(&mut self, sampled_at: SystemTime) -> Result<(), SpoolError> {
        if self.queue.front().map(|s| s.sampled_at) == Some(sampled_at) {
            self.queue.pop_front();
        }
        if self.queue.is_empty() {
            if let Some(f) = self.file.as_mut() {
                if f.lines > 0 {
                    f.file.set_len(0).map_err(|source| SpoolError::Io {
                        path: f.path.clone(),
                        source,
                    })?;
                    f.lines = 0;
                }
            }
        }
        Ok(())
    }

    /// Rewrites the file to hold exactly the queued samples (atomically, via a rename).
    pub fn compact(&mut self) -> Result<(), SpoolError> {
        if let Some(f) = self.file.as_mut() {
            f.file = rewrite(&f.path, &self.queue)?;
            f.lines = self.queue.len();
            f.torn = false;
        }
        Ok(())
    }

    /// Samples waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The newest queued sample's stamp.
    pub fn newest(&self) -> Option<SystemTime> {
        self.queue.back().map(|s| s.sampled_at)
    }

    /// Samples dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// No sample is anywhere near this long (a few hundred bytes per mount and interface); a longer
/// line is damage, and reading it whole would let a corrupt file exhaust memory.
const MAX_LINE: usize = 1 << 20;

/// Reads one line into `buf`, at most [`MAX_LINE`] bytes of it. Returns None at end of file,
/// Some(false) when the line was too long (the rest of it is skipped), Some(true) otherwise.
fn read_line_bounded(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    let n = std::io::Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if n < MAX_LINE || buf.last() == Some(&b'\n') {
        return Ok(Some(true));
    }
    // Skip the rest of the over-long line without holding it.
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Some(false));
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(Some(false));
            }
            None => {
                let len = chunk.len();
                r.consume(len);
            }
        }
    }
}

/// Writes `queue` to a temporary file beside `path`, syncs it, renames it over `path`, syncs the
/// directory (the rename is a change to the directory: without this a power loss right after it
/// could bring back the old file, or none at all), and returns `path` opened for appending.
fn rewrite(path: &Path, queue: &VecDeque<Sample>) -> Result<File, SpoolError> {
    let io = |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut out = std::io::BufWriter::new(File::create(&tmp).map_err(io)?);
        for s in queue {
            serde_json::to_writer(&mut out, s).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)?;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path).map_err(io)?;
    OpenOptions::new().append(true).open(path).map_err(io)
}

/// fsyncs the directory holding `path`, so that a rename or a creation in it is durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn sample(n: u64) -> Sample {
        Sample {
            host: "h".into(),
            sampled_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000 + n),
            cpu_percent: Some(1.0),
            load1: 0.0,
            load5: 0.0,
            load15: 0.0,
            mem_total_bytes: 1,
            mem_used_bytes: 1,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
            disks: vec![],
            net: vec![],
            uptime_seconds: 1.0,
            process_count: 1,
        }
    }

    fn stamps(s: &Spool) -> Vec<SystemTime> {
        s.queue.iter().map(|s| s.sampled_at).collect()
    }

    #[test]
    fn a_reopened_spool_has_every_unwritten_sample_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        let (mut s, rec) = Spool::open(&path, 10).unwrap();
        assert_eq!(rec, Recovered::default());
        for n in 0..4 {
            s.push(sample(n)).unwrap();
        }
        s.written(sample(0).sampled_at).unwrap();
        drop(s);
        let (s, rec) = Spool::open(&path, 10).unwrap();
        // The written sample may come back (harmless: the insert is idempotent); none is lost.
        assert_eq!(rec.bad_lines, 0);
        let got = stamps(&s);
        assert!(got.ends_with(&[1, 2, 3].map(|n| sample(n).sampled_at)), "{got:?}");
    }

    #[test]
    fn the_file_is_emptied_once_everything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        let (mut s, _) = Spool::open(&path, 10).unwrap();
        s.push(sample(1)).unwrap();
        s.push(sample(2)).unwrap();
        s.written(sample(1).sampled_at).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        s.written(sample(2).sampled_at).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Appends after the truncation land at the start of the file.
        s.push(sample(3)).unwrap();
        drop(s);
        let (s, _) = Spool::open(&path, 10).unwrap();
        assert_eq!(stamps(&s), vec![sample(3).sampled_at]);
    }

    #[test]
    fn a_torn_last_line_and_garbage_lose_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        let mut text = String::new();
        for n in 0..3 {
            text.push_str(&serde_json::to_string(&sample(n)).unwrap());
            text.push('\n');
            if n == 1 {
                text.push_str("not json at all\n\n{\"host\": 5}\n");
            }
        }
        let full = serde_json::to_string(&sample(3)).unwrap();
        text.push_str(&full[..full.len() / 2]);
        std::fs::write(&path, text).unwrap();

        let (mut s, rec) = Spool::open(&path, 10).unwrap();
        assert_eq!(rec.samples, 3);
        assert_eq!(rec.bad_lines, 3);
        // The next append must not be glued to the torn line.
        s.push(sample(4)).unwrap();
        drop(s);
        let (s, rec) = Spool::open(&path, 10).unwrap();
        assert_eq!(rec.bad_lines, 0);
        assert_eq!(stamps(&s), [0, 1, 2, 4].map(|n| sample(n).sampled_at).to_vec());
    }

    #[test]
    fn an_over_long_line_is_skipped_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        let mut text = serde_json::to_string(&sample(1)).unwrap();
        text.push('\n');
        text.push_str(&"x".repeat(3 * MAX_LINE + 7));
        text.push('\n');
        text.push_str(&serde_json::to_string(&sample(2)).unwrap());
        text.push('\n');
        // Exactly MAX_LINE bytes including the newline is still a (bad, but bounded) line.
        text.push_str(&"y".repeat(MAX_LINE - 1));
        text.push('\n');
        text.push_str(&serde_json::to_string(&sample(3)).unwrap());
        std::fs::write(&path, text).unwrap();
        let (s, rec) = Spool::open(&path, 10).unwrap();
        assert_eq!(stamps(&s), [1, 2, 3].map(|n| sample(n).sampled_at).to_vec());
        assert_eq!(rec.bad_lines, 2);
    }

    #[test]
    fn capacity_drops_the_oldest_and_bounds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        let (mut s, _) = Spool::open(&path, 3).unwrap();
        for n in 0..5 {
            s.push(sample(n)).unwrap();
        }
        assert_eq!(s.dropped(), 2);
        assert_eq!(stamps(&s), [2, 3, 4].map(|n| sample(n).sampled_at).to_vec());
        // A sample dropped while it was being written must not take its successor with it.
        s.written(sample(0).sampled_at).unwrap();
        assert_eq!(s.len(), 3);
        for n in 5..20 {
            s.push(sample(n)).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 6, "file has {lines} lines for a capacity of 3");
        drop(s);
        let (s, rec) = Spool::open(&path, 2).unwrap();
        assert_eq!(stamps(&s), [18, 19].map(|n| sample(n).sampled_at).to_vec());
        assert_eq!(rec.over_capacity + 2, lines);
    }

    #[test]
    fn a_spool_file_named_without_a_directory_syncs_the_current_one() {
        // `collector-spool.jsonl` (the default) has an empty parent: the directory synced is `.`.
        assert!(sync_dir(Path::new("collector-spool.jsonl")).is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(sync_dir(&dir.path().join("spool.jsonl")).is_ok());
        assert!(sync_dir(Path::new("/nonexistent-dir/spool.jsonl")).is_err());
    }

    #[test]
    fn an_unusable_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("spool.jsonl");
        let e = Spool::open(&path, 3).unwrap_err().to_string();
        assert!(e.starts_with("spool file ") && e.contains("No such file"), "{e}");
    }
}
