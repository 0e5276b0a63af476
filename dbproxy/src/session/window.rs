//! The 25006 replay window: what a session sent to a standby outside a transaction, kept until
//! something executed of it reaches the client, so a standby's refusal (25006, read-only
//! transaction) can still run the request on the primary (DESIGN.md invariant 1).

use std::collections::VecDeque;

use crate::protocol::frontend::Kind;
use crate::protocol::{BackendMessage, Frame, FrontendMessage};

use super::cycle::{Mode, Replay};

/// The batches of the current cycle sent to a standby whose answers have not reached the
/// client. Answers are held back until the first one that does not only acknowledge (see
/// [`BackendMessage::acknowledges`]); that one (rows, a CommandComplete, an error) closes the
/// window for the rest of the cycle. A batch ended by Flush and without Execute is answered by
/// held messages only and the client waits for them: once all have arrived they are passed on
/// and the batch leaves the window, whose later batches stay replayable (nothing executed was
/// passed on).
#[derive(Debug, Default)]
pub(super) struct Window {
    pub batches: VecDeque<Held>,
}

/// One batch in the replay window.
#[derive(Debug)]
pub(super) struct Held {
    pub frames: Vec<Frame>,
    /// Held answers still to come that end a message's answer (all but ParameterDescription).
    answers: usize,
    /// It ends with Flush and holds no Execute (see [`Window`]).
    released_when_answered: bool,
}

impl Window {
    /// A batch was sent to the standby.
    pub fn push(&mut self, frames: Vec<Frame>) {
        let mut answers = 0;
        let mut execute = false;
        for f in &frames {
            match Kind::of(f) {
                Kind::Parse | Kind::Bind | Kind::Close | Kind::Describe => answers += 1,
                Kind::Execute | Kind::Query | Kind::FunctionCall => execute = true,
                _ => {}
            }
        }
        let flush = frames.last().is_some_and(|f| Kind::of(f) == Kind::Flush);
        let released_when_answered = flush && !execute;
        if !(released_when_answered && answers == 0) {
            self.batches.push_back(Held {
                frames,
                answers,
                released_when_answered,
            });
        }
    }

    /// A held answer `msg` arrived; true when it completes the answers of a batch the client
    /// waits for, which leaves the window (its held answers are to be passed on).
    pub fn answered(&mut self, msg: &BackendMessage<'_>) -> bool {
        let Some(front) = self.batches.front_mut() else {
            return false;
        };
        // A ParameterDescription is followed by the RowDescription or NoData that ends the
        // Describe's answer.
        if !matches!(msg, BackendMessage::ParameterDescription(_)) {
            front.answers = front.answers.saturating_sub(1);
        }
        if front.released_when_answered && front.answers == 0 {
            self.batches.pop_front();
            return true;
        }
        false
    }

    /// The frames to replay on the primary and how their last batch ended; `None` when there
    /// is nothing to replay or it cannot run on its own: an Execute of a portal bound in a batch
    /// whose answers were already passed on exists only on the standby.
    pub fn replayable(self) -> Option<Replay> {
        let frames: Vec<Frame> = self.batches.into_iter().flat_map(|b| b.frames).collect();
        let mut bound: Vec<&str> = Vec::new();
        for f in &frames {
            match FrontendMessage::parse(f) {
                Ok(FrontendMessage::Bind(b)) => bound.push(b.portal),
                Ok(FrontendMessage::Execute { portal }) if !bound.contains(&portal) => return None,
                Ok(_) => {}
                // Unreadable here: let the primary judge nothing it cannot be sure of.
                Err(_) => return None,
            }
        }
        let mode = match Kind::of(frames.last()?) {
            Kind::Flush => Mode::Flush,
            _ => Mode::Sync,
        };
        Some(Replay {
            frames,
            mode,
            open: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse() -> Frame {
        Frame::new(b'P', b"\0select f()\0\0\0")
    }
    fn bind(portal: &str) -> Frame {
        Frame::new(b'B', format!("{portal}\0\0\0\0\0\0\0\0").as_bytes())
    }
    fn execute(portal: &str) -> Frame {
        Frame::new(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
    }
    fn describe() -> Frame {
        Frame::new(b'D', b"S\0")
    }
    fn flush() -> Frame {
        Frame::new(b'H', b"")
    }
    fn sync() -> Frame {
        Frame::new(b'S', b"")
    }
    fn tags(r: Option<Replay>) -> Option<(Vec<u8>, Mode)> {
        r.map(|r| (r.frames.iter().map(Frame::tag).collect(), r.mode))
    }
    const PARSE_COMPLETE: BackendMessage<'static> = BackendMessage::ParseComplete;
    const BIND_COMPLETE: BackendMessage<'static> = BackendMessage::BindComplete;
    const ROW_DESCRIPTION: BackendMessage<'static> = BackendMessage::RowDescription;

    fn parameter_description() -> BackendMessage<'static> {
        let f = Box::leak(Box::new(Frame::new(b't', b"\0\0")));
        BackendMessage::parse(f).unwrap()
    }

    #[test]
    fn a_sync_batch_is_replayed_whole() {
        let mut w = Window::default();
        w.push(vec![parse(), bind(""), execute(""), sync()]);
        assert!(!w.answered(&PARSE_COMPLETE));
        assert!(!w.answered(&BIND_COMPLETE));
        assert_eq!(tags(w.replayable()), Some((b"PBES".to_vec(), Mode::Sync)));
    }

    #[test]
    fn a_flush_batch_without_execute_is_passed_on_when_answered() {
        let mut w = Window::default();
        w.push(vec![parse(), describe(), flush()]);
        w.push(vec![bind(""), execute(""), sync()]);
        assert!(!w.answered(&PARSE_COMPLETE));
        assert!(
            !w.answered(&parameter_description()),
            "ParameterDescription is followed by the row description"
        );
        assert!(
            w.answered(&ROW_DESCRIPTION),
            "Parse and Describe answered: the client waits for them"
        );
        assert!(
            !w.answered(&BIND_COMPLETE),
            "a batch with an Execute waits for its result"
        );
        assert_eq!(tags(w.replayable()), Some((b"BES".to_vec(), Mode::Sync)));
    }

    #[test]
    fn a_flush_batch_with_execute_is_replayed_with_flush() {
        let mut w = Window::default();
        w.push(vec![parse(), bind(""), execute(""), flush()]);
        assert_eq!(tags(w.replayable()), Some((b"PBEH".to_vec(), Mode::Flush)));
        let mut w = Window::default();
        w.push(vec![flush()]);
        assert!(w.batches.is_empty(), "nothing to wait for");
    }

    #[test]
    fn a_portal_bound_in_a_batch_passed_on_cannot_be_replayed() {
        let mut w = Window::default();
        w.push(vec![parse(), bind("p"), flush()]);
        assert!(!w.answered(&PARSE_COMPLETE));
        assert!(w.answered(&BIND_COMPLETE));
        w.push(vec![execute("p"), sync()]);
        assert_eq!(tags(w.replayable()), None);
        let mut w = Window::default();
        w.push(vec![bind("p"), execute("q"), sync()]);
        assert_eq!(tags(w.replayable()), None);
    }
}
