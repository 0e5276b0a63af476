//! A client's prepared statements ([`Stmt`]): remembered with their Parse so they can be prepared
//! lazily on any backend, and, for a `set_config` call with parameters, the text that replays
//! it elsewhere with the bound values written in.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use crate::classify::Step;
use crate::protocol::frontend::Bind;
use crate::protocol::Frame;

/// The most Describe-statement answers a session waits for at once (see [`Statements`]).
const MAX_DESCRIBING: usize = 4096;

/// A client's prepared statement.
#[derive(Debug)]
pub(super) struct Stmt {
    /// The client's Parse message, replayed as is.
    pub parse: Frame,
    /// Its [`fingerprint`]: a connection holding a statement of this name made by another
    /// Parse (another client's, in transaction pooling) gets this one prepared again.
    pub fp: u64,
    /// The statement surely only reads.
    pub read_only: bool,
    /// It may be a COPY FROM STDIN.
    pub copy_in: bool,
    /// It may end a transaction block.
    pub ends_tx: bool,
    /// The generation of the unlogged relations it was classified with (see
    /// [`crate::unlogged::Db::generation`]).
    pub unlogged: u64,
    /// What executing it does to session settings and the transaction.
    pub step: Step,
    /// Its parameter types, as declared or as a Describe learned them; kept only for a
    /// `set_config` call, whose bound values are written into the text replayed elsewhere.
    pub param_types: Vec<u32>,
}

impl Stmt {
    /// What executing this statement with the parameters of `bind` does: for a `set_config`
    /// call with parameters, the text with the values written in as literals, so that another
    /// connection replays exactly what ran; [`Step::Unknown`] when they cannot be written out.
    pub fn bound(&self, bind: &Bind<'_>) -> Step {
        let Step::Set(text) = &self.step else {
            return self.step.clone();
        };
        let Ok(params) = bind.params() else {
            return Step::Unknown;
        };
        if params.is_empty() {
            return self.step.clone();
        }
        let mut values = Vec::with_capacity(params.len());
        for (i, (format, value)) in params.into_iter().enumerate() {
            let oid = self.param_types.get(i).copied().unwrap_or(0);
            match value.map(|v| param_text(format, oid, v)) {
                None => values.push(None),
                Some(Some(v)) => values.push(Some(v)),
                Some(None) => return Step::Unknown,
            }
        }
        let values: Vec<Option<&str>> = values.iter().map(|v| v.as_deref()).collect();
        crate::classify::inline_params(text, &values).map_or(Step::Unknown, Step::Set)
    }
}

/// A parameter value as SQL text: text format as is; binary format for the types whose binary
/// form is known here (text-like, boolean, integers); `None` otherwise.
pub(super) fn param_text(format: i16, oid: u32, v: &[u8]) -> Option<Cow<'_, str>> {
    const BOOL: u32 = 16;
    const NAME: u32 = 19;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const UNKNOWN: u32 = 705;
    const BPCHAR: u32 = 1042;
    const VARCHAR: u32 = 1043;
    match (format, oid) {
        (0, _) | (1, TEXT | VARCHAR | BPCHAR | NAME | UNKNOWN) => {
            std::str::from_utf8(v).ok().map(Cow::Borrowed)
        }
        (1, BOOL) => match v {
            [0] => Some(Cow::Borrowed("false")),
            [1] => Some(Cow::Borrowed("true")),
            _ => None,
        },
        (1, INT2) => Some(Cow::Owned(i16::from_be_bytes(v.try_into().ok()?).to_string())),
        (1, INT4) => Some(Cow::Owned(i32::from_be_bytes(v.try_into().ok()?).to_string())),
        (1, INT8) => Some(Cow::Owned(i64::from_be_bytes(v.try_into().ok()?).to_string())),
        _ => None,
    }
}

/// The fingerprint of a Parse message (name, text and parameter types together).
pub(super) fn fingerprint(parse: &Frame) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(parse.raw())
}

/// Whether `sql` starts with DEALLOCATE or DISCARD (which drop protocol-level statements too).
pub(super) fn forgets_prepared(sql: &[u8]) -> bool {
    let head = sql.trim_ascii_start();
    let starts = |w: &[u8]| head.len() >= w.len() && head[..w.len()].eq_ignore_ascii_case(w);
    starts(b"deallocate") || starts(b"discard")
}

/// The session's statements by name, and the Describes of statements awaiting their
/// ParameterDescription.
#[derive(Debug, Default)]
pub(super) struct Statements {
    by_name: HashMap<String, Stmt>,
    /// The statements of the Describes sent and not answered yet, in order: each
    /// ParameterDescription answers the first. Only a `set_config` statement's name and Parse
    /// are kept, to learn its parameter types; `None` for the others.
    describing: VecDeque<Option<(String, Frame)>>,
    /// More Describes than [`MAX_DESCRIBING`] are in flight: none is queued until the cycle ends.
    describing_full: bool,
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&Stmt> {
        self.by_name.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Stmt> {
        self.by_name.get_mut(name)
    }

    /// Keeps `stmt` as `name`, unless that would make more than `max` named statements (0: no
    /// limit); `false` then. The unnamed statement and a replaced name always fit.
    #[must_use]
    pub fn insert(&mut self, name: &str, stmt: Stmt, max: usize) -> bool {
        if let Some(kept) = self.by_name.get_mut(name) {
            *kept = stmt;
            return true;
        }
        let named = self.by_name.len() - usize::from(self.by_name.contains_key(""));
        if max > 0 && !name.is_empty() && named >= max {
            return false;
        }
        self.by_name.insert(name.to_string(), stmt);
        true
    }

    pub fn remove(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// A Describe of statement `name` was sent: its ParameterDescription comes back in turn.
    pub fn describe_sent(&mut self, name: &str) {
        if self.describing.len() >= MAX_DESCRIBING {
            self.describing_full = true;
        }
        if !self.describing_full {
            let set = self
                .by_name
                .get(name)
                .filter(|s| matches!(s.step, Step::Set(_)))
                .map(|s| (name.to_string(), s.parse.clone()));
            self.describing.push_back(set);
        }
    }

    /// A ParameterDescription answers the first Describe of a statement still unanswered; for
    /// a `set_config` statement (still the one described) its types are kept.
    pub fn described(&mut self, types: impl FnOnce() -> Option<Vec<u32>>) {
        let Some(Some((name, parse))) = self.describing.pop_front() else {
            return;
        };
        if let Some(st) = self.by_name.get_mut(&name).filter(|s| s.parse == parse) {
            if let Some(types) = types() {
                st.param_types = types;
            }
        }
    }

    /// An error skips the rest of the batch (its Describes included); a cycle's end leaves none
    /// unanswered.
    pub fn describes_dropped(&mut self) {
        self.describing.clear();
        self.describing_full = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrontendMessage;

    #[test]
    fn parameter_values_as_sql_text() {
        let text = |f, oid, v: &[u8]| param_text(f, oid, v).map(|c| c.into_owned());
        assert_eq!(text(0, 0, b"abc").as_deref(), Some("abc"));
        assert_eq!(
            text(0, 23, b"12").as_deref(),
            Some("12"),
            "text format whatever the type"
        );
        assert_eq!(text(0, 0, b"\xff"), None, "not UTF-8");
        assert_eq!(text(1, 25, b"abc").as_deref(), Some("abc"));
        assert_eq!(text(1, 16, &[1]).as_deref(), Some("true"));
        assert_eq!(text(1, 16, &[0]).as_deref(), Some("false"));
        assert_eq!(text(1, 16, &[2]), None);
        assert_eq!(text(1, 21, &(-7i16).to_be_bytes()).as_deref(), Some("-7"));
        assert_eq!(text(1, 23, &70000i32.to_be_bytes()).as_deref(), Some("70000"));
        assert_eq!(
            text(1, 20, &(1i64 << 40).to_be_bytes()).as_deref(),
            Some("1099511627776")
        );
        assert_eq!(text(1, 23, &[0, 1]), None, "wrong length");
        assert_eq!(text(1, 0, b"abc"), None, "binary of an unknown type");
        assert_eq!(text(1, 1700, b"abc"), None, "binary numeric");
    }

    #[test]
    fn named_statements_are_capped() {
        let parse = |sql: &str| {
            let mut body = b"s\0".to_vec();
            body.extend_from_slice(sql.as_bytes());
            body.extend_from_slice(b"\0\0\0");
            Frame::new(b'P', &body)
        };
        let stmt = |sql: &str| Stmt {
            fp: fingerprint(&parse(sql)),
            parse: parse(sql),
            read_only: true,
            copy_in: false,
            ends_tx: false,
            unlogged: 0,
            step: Step::Other,
            param_types: Vec::new(),
        };
        let mut s = Statements::default();
        assert!(s.insert("a", stmt("select 1"), 2));
        assert!(
            s.insert("", stmt("select 2"), 2),
            "the unnamed statement does not count"
        );
        assert!(s.insert("b", stmt("select 3"), 2));
        assert!(!s.insert("c", stmt("select 4"), 2));
        assert!(s.insert("b", stmt("select 5"), 2), "replacing a name fits");
        assert!(s.insert("", stmt("select 6"), 2));
        s.remove("a");
        assert!(s.insert("c", stmt("select 7"), 2));
        assert!(s.insert("d", stmt("select 8"), 0), "0: no limit");
    }

    #[test]
    fn deallocate_and_discard_forget_statements() {
        assert!(forgets_prepared(b"  DEALLOCATE ALL"));
        assert!(forgets_prepared(b"discard all"));
        assert!(!forgets_prepared(b"select 1"));
        assert!(!forgets_prepared(b"dis"));
    }

    #[test]
    fn a_set_config_call_is_replayed_with_its_values() {
        let stmt = Stmt {
            parse: Frame::new(b'P', b"s\0select set_config('a', $1, false)\0\0\0"),
            fp: 0,
            read_only: false,
            copy_in: false,
            ends_tx: false,
            unlogged: 0,
            step: Step::Set("select set_config('a', $1, false)".into()),
            param_types: vec![25],
        };
        let bind = Frame::new(b'B', b"\0s\0\0\0\0\x01\0\0\0\x02hi\0\0");
        let Ok(FrontendMessage::Bind(b)) = FrontendMessage::parse(&bind) else {
            panic!("not a Bind");
        };
        let Step::Set(text) = stmt.bound(&b) else {
            panic!("not a SET");
        };
        assert!(text.contains("'hi'"), "{text}");
        let binary_numeric = Stmt {
            param_types: vec![1700],
            ..stmt
        };
        let bind = Frame::new(b'B', b"\0s\0\0\x01\0\x01\0\x01\0\0\0\x02hi\0\0");
        let Ok(FrontendMessage::Bind(b)) = FrontendMessage::parse(&bind) else {
            panic!("not a Bind");
        };
        assert_eq!(binary_numeric.bound(&b), Step::Unknown);
    }

    #[test]
    fn describes_are_answered_in_order() {
        let mut s = Statements::default();
        let parse = Frame::new(b'P', b"s\0select set_config('a', $1, false)\0\0\0");
        assert!(s.insert(
            "s",
            Stmt {
                parse: parse.clone(),
                fp: 0,
                read_only: false,
                copy_in: false,
                ends_tx: false,
                unlogged: 0,
                step: Step::Set("x".into()),
                param_types: Vec::new(),
            },
            0,
        ));
        s.describe_sent("other");
        s.describe_sent("s");
        s.described(|| Some(vec![1]));
        assert!(
            s.get("s").unwrap().param_types.is_empty(),
            "the first answers 'other'"
        );
        s.described(|| Some(vec![25]));
        assert_eq!(s.get("s").unwrap().param_types, [25]);
        s.describe_sent("s");
        s.describes_dropped();
        s.described(|| Some(vec![16]));
        assert_eq!(s.get("s").unwrap().param_types, [25]);
    }
}
