//! The extended-protocol batch a client is sending (everything up to its Sync or Flush), held to
//! be routed whole, and the reuse of emptied message lists so a request allocates none.

use super::cycle::Mode;
use super::route::{Request, Role};
use crate::protocol::Frame;

/// The most messages an extended-protocol batch holds before it is sent on without its Sync.
pub(super) const MAX_BATCH_MESSAGES: usize = 4096;

/// The most bytes an extended-protocol batch holds before it is sent on without its Sync.
pub(super) const MAX_BATCH_BYTES: usize = 4 << 20;

/// The largest emptied list (in entries) a session keeps for reuse.
pub(super) const MAX_SPARE: usize = 64;

/// Extended-protocol messages waiting for Sync or Flush.
#[derive(Debug)]
pub(super) struct Batch {
    frames: Vec<Frame>,
    /// Every statement of the batch surely only reads.
    read_only: bool,
    /// A statement of the batch may be a COPY FROM STDIN.
    copy_in: bool,
    /// A statement of the batch may end a transaction block.
    ends_tx: bool,
    /// Bind and Execute messages in the batch: an Execute of a portal bound in an earlier
    /// batch runs a statement this batch does not name.
    binds: usize,
    executes: usize,
    /// The bytes held.
    bytes: usize,
}

impl Default for Batch {
    fn default() -> Batch {
        Batch {
            frames: Vec::new(),
            read_only: true,
            copy_in: false,
            ends_tx: false,
            binds: 0,
            executes: 0,
            bytes: 0,
        }
    }
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// A statement of the batch may write (or is unknown): the batch goes to the primary.
    pub fn not_read_only(&mut self) {
        self.read_only = false;
    }

    /// A statement of the batch may be a COPY FROM STDIN.
    pub fn copy_in(&mut self) {
        self.copy_in = true;
    }

    /// A statement of the batch may end a transaction block.
    pub fn ends_tx(&mut self) {
        self.ends_tx = true;
    }

    /// A Bind (`bind`) or an Execute (`!bind`) is in the batch.
    pub fn count(&mut self, bind: bool) {
        if bind {
            self.binds += 1;
        } else {
            self.executes += 1;
        }
    }

    /// Adds a message; true when the batch outgrew its limits and must be sent on now.
    pub fn push(&mut self, f: Frame) -> bool {
        self.bytes += f.raw().len();
        self.frames.push(f);
        self.frames.len() >= MAX_BATCH_MESSAGES || self.bytes > MAX_BATCH_BYTES
    }

    /// Takes the batch's messages and the request they make (ending with `mode`), leaving it
    /// empty: read-only when all its statements only read, a possible COPY FROM STDIN, and
    /// whether it may end a transaction block (a statement that may, or a portal bound before).
    pub fn take(&mut self, mode: Mode) -> (Vec<Frame>, Request) {
        let read_only = std::mem::replace(&mut self.read_only, true);
        let req = Request {
            standby_ok: read_only,
            writes: !read_only,
            mode,
            role: Role::Other,
            copy_in: std::mem::take(&mut self.copy_in),
            ends_tx: std::mem::take(&mut self.ends_tx) || self.executes > self.binds,
        };
        self.bytes = 0;
        self.binds = 0;
        self.executes = 0;
        (std::mem::take(&mut self.frames), req)
    }

    /// A message list holding just `f`, made of the batch's emptied list so that a Query or
    /// FunctionCall allocates nothing. Only called with no batch pending.
    pub fn alone(&mut self, f: Frame) -> Vec<Frame> {
        debug_assert!(self.frames.is_empty());
        let mut frames = std::mem::take(&mut self.frames);
        frames.push(f);
        frames
    }

    /// Keeps an emptied message list as the next batch's, when the batch has none and the list
    /// is small (a long batch's list is freed instead of being held by an idle session).
    pub fn recycle(&mut self, mut frames: Vec<Frame>) {
        if self.frames.is_empty() && self.frames.capacity() == 0 && frames.capacity() <= MAX_SPARE {
            frames.clear();
            self.frames = frames;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn sync() -> Frame {
        Frame::from_raw(Bytes::from_static(b"S\0\0\0\x04"))
    }

    #[test]
    fn lists_are_reused() {
        let mut b = Batch::default();
        let list = b.alone(sync());
        let ptr = list.as_ptr();
        b.recycle(list);
        let again = b.alone(sync());
        assert_eq!(again.as_ptr(), ptr, "the emptied list was kept");
        let big: Vec<Frame> = Vec::with_capacity(MAX_SPARE + 1);
        b.recycle(big);
        assert_eq!(b.frames.capacity(), 0, "a long list is not held");
    }

    #[test]
    fn a_batch_past_its_limits_is_sent_on() {
        let mut b = Batch::default();
        b.not_read_only();
        for _ in 1..MAX_BATCH_MESSAGES {
            assert!(!b.push(sync()));
        }
        assert!(b.push(sync()));
        b.copy_in();
        let (frames, req) = b.take(Mode::Flush);
        assert_eq!(
            (frames.len(), req.standby_ok, req.copy_in, req.ends_tx),
            (MAX_BATCH_MESSAGES, false, true, false)
        );
        assert!(b.is_empty() && b.read_only && !b.copy_in && b.bytes == 0);
        b.count(true);
        b.count(false);
        assert!(!b.take(Mode::Sync).1.ends_tx, "its own Bind");
        b.count(false);
        assert!(b.take(Mode::Sync).1.ends_tx, "a portal bound before");
        b.ends_tx();
        assert!(b.take(Mode::Sync).1.ends_tx);
    }
}
