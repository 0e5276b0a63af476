//! Typed, borrowed views of the messages a client sends after startup: each frame is parsed into
//! a [`FrontendMessage`] that points into the frame's bytes, so the session matches on variants
//! and still relays the raw [`Frame`] untouched.

use super::{cbytes, cstr, extended, i16_, simple, Frame, ProtocolError};

/// One client message, borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    /// A simple Query.
    Query {
        /// The SQL text, as sent: in the client's `client_encoding`, not necessarily UTF-8.
        sql: &'a [u8],
    },
    /// Parse: prepare `sql` as statement `name` (empty: the unnamed statement).
    Parse {
        /// The statement name.
        name: &'a str,
        /// The SQL text, as sent (in the client's encoding).
        sql: &'a [u8],
        /// The declared parameter types (0 where the server is to infer one).
        param_types: ParamTypes<'a>,
    },
    /// Bind: make portal `portal` of statement `stmt`.
    Bind(Bind<'a>),
    /// Execute portal `portal`.
    Execute {
        /// The portal name.
        portal: &'a str,
    },
    /// Describe a statement or a portal.
    Describe(Target<'a>),
    /// Close a statement or a portal.
    Close(Target<'a>),
    /// Sync: ends an extended-protocol batch; the server answers ReadyForQuery.
    Sync,
    /// Flush: the server is to send what it has; the batch goes on.
    Flush,
    /// CopyData during COPY FROM STDIN.
    CopyData,
    /// CopyDone: the end of COPY FROM STDIN data.
    CopyDone,
    /// CopyFail: the client aborts COPY FROM STDIN.
    CopyFail,
    /// A FunctionCall (fast-path function call).
    FunctionCall,
    /// Terminate: the client leaves.
    Terminate,
    /// A `p` message: PasswordMessage, SASLInitialResponse or SASLResponse, told apart by the
    /// authentication step that expects it (see `protocol::auth`).
    Password {
        /// The message body.
        body: &'a [u8],
    },
    /// A type byte no frontend message has.
    Unknown {
        /// The type byte.
        tag: u8,
    },
}

/// The parameter type OIDs a Parse declares, borrowed (read with [`ParamTypes::to_vec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamTypes<'a>(&'a [u8]);

impl ParamTypes<'_> {
    /// How many types are declared.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    /// Whether none is declared.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The OIDs in order.
    pub fn to_vec(&self) -> Vec<u32> {
        self.0
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// A Bind message: the names are read at once; the parameters on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    /// The portal made (empty: the unnamed portal).
    pub portal: &'a str,
    /// The statement bound (empty: the unnamed statement).
    pub stmt: &'a str,
    body: &'a [u8],
}

impl<'a> Bind<'a> {
    /// The parameter values with their format codes.
    pub fn params(&self) -> Result<Vec<extended::Param<'a>>, ProtocolError> {
        extended::bind_params(self.body)
    }
}

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A prepared statement.
    Statement(&'a str),
    /// A portal.
    Portal(&'a str),
}

impl<'a> Target<'a> {
    /// The statement named, if it is one.
    pub fn statement(self) -> Option<&'a str> {
        match self {
            Target::Statement(s) => Some(s),
            Target::Portal(_) => None,
        }
    }
}

fn target<'a>(body: &'a [u8], what: &'static str) -> Result<Target<'a>, ProtocolError> {
    Ok(match extended::target(body, what)? {
        (b'S', name) => Target::Statement(name),
        (_, name) => Target::Portal(name),
    })
}

impl<'a> FrontendMessage<'a> {
    /// Parses a client frame. The fields the proxy reads are checked (a malformed one is a
    /// protocol violation); the bodies it only relays (Sync, Flush, COPY, FunctionCall) are not.
    pub fn parse(f: &'a Frame) -> Result<FrontendMessage<'a>, ProtocolError> {
        let body = f.body();
        Ok(match f.tag() {
            b'Q' => FrontendMessage::Query {
                sql: simple::query_text(body)?,
            },
            b'P' => {
                let mut b = body;
                let name = cstr(&mut b, "Parse")?;
                let sql = cbytes(&mut b, "Parse")?;
                let n = i16_(&mut b, "Parse")?;
                if n < 0 || b.len() != n as usize * 4 {
                    return Err(ProtocolError::Malformed("Parse"));
                }
                FrontendMessage::Parse {
                    name,
                    sql,
                    param_types: ParamTypes(b),
                }
            }
            b'B' => {
                let (portal, stmt) = extended::bind_names(body)?;
                FrontendMessage::Bind(Bind { portal, stmt, body })
            }
            b'E' => FrontendMessage::Execute {
                portal: extended::execute_portal(body)?,
            },
            b'D' => FrontendMessage::Describe(target(body, "Describe")?),
            b'C' => FrontendMessage::Close(target(body, "Close")?),
            b'S' => FrontendMessage::Sync,
            b'H' => FrontendMessage::Flush,
            b'd' => FrontendMessage::CopyData,
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail,
            b'F' => FrontendMessage::FunctionCall,
            b'X' => FrontendMessage::Terminate,
            b'p' => FrontendMessage::Password { body },
            tag => FrontendMessage::Unknown { tag },
        })
    }

    /// Whether this message ends a batch (Sync or Flush).
    pub fn ends_batch(&self) -> bool {
        matches!(self, FrontendMessage::Sync | FrontendMessage::Flush)
    }
}

/// What a frontend message is, read from its type byte alone: for code that only needs the
/// kind (counting a batch's answers), where parsing the fields would scan the SQL again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Query.
    Query,
    /// Parse.
    Parse,
    /// Bind.
    Bind,
    /// Execute.
    Execute,
    /// Describe.
    Describe,
    /// Close.
    Close,
    /// Sync.
    Sync,
    /// Flush.
    Flush,
    /// FunctionCall.
    FunctionCall,
    /// Anything else (COPY messages, Terminate, passwords, unknown types).
    Other,
}

impl Kind {
    /// The kind of `f`.
    pub fn of(f: &Frame) -> Kind {
        match f.tag() {
            b'Q' => Kind::Query,
            b'P' => Kind::Parse,
            b'B' => Kind::Bind,
            b'E' => Kind::Execute,
            b'D' => Kind::Describe,
            b'C' => Kind::Close,
            b'S' => Kind::Sync,
            b'H' => Kind::Flush,
            b'F' => Kind::FunctionCall,
            _ => Kind::Other,
        }
    }
}

/// Whether the next message buffered in `buf` (not necessarily complete) is a Sync or a Flush;
/// read without decoding, to decide whether it may be taken yet.
pub fn next_ends_batch(buf: &[u8]) -> bool {
    matches!(buf.first(), Some(b'S' | b'H'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_parses_into_its_view() {
        let q = Frame::new(b'Q', b"select 1\0");
        assert_eq!(
            FrontendMessage::parse(&q),
            Ok(FrontendMessage::Query { sql: b"select 1" })
        );
        let p = Frame::new(b'P', b"s1\0select $1\0\0\x01\0\0\0\x17");
        let FrontendMessage::Parse {
            name,
            sql,
            param_types,
        } = FrontendMessage::parse(&p).unwrap()
        else {
            panic!("not a Parse");
        };
        assert_eq!(
            (name, sql, param_types.to_vec()),
            ("s1", &b"select $1"[..], vec![23])
        );
        // SQL text in a single-byte client encoding (LATIN1 `\xe9`) is taken as sent.
        let q = Frame::new(b'Q', b"select '\xe9'\0");
        assert_eq!(
            FrontendMessage::parse(&q),
            Ok(FrontendMessage::Query {
                sql: b"select '\xe9'"
            })
        );
        let p = Frame::new(b'P', b"\0select '\xe9'\0\0\0");
        assert!(matches!(
            FrontendMessage::parse(&p),
            Ok(FrontendMessage::Parse {
                sql: b"select '\xe9'",
                ..
            })
        ));
        assert_eq!(param_types.len(), 1);
        let b = Frame::new(b'B', b"p\0s\0\0\0\0\x01\0\0\0\x01x\0\0");
        let FrontendMessage::Bind(bind) = FrontendMessage::parse(&b).unwrap() else {
            panic!("not a Bind");
        };
        assert_eq!((bind.portal, bind.stmt), ("p", "s"));
        assert_eq!(bind.params().unwrap(), [(0, Some(&b"x"[..]))]);
        let e = Frame::new(b'E', b"p\0\0\0\0\0");
        assert_eq!(
            FrontendMessage::parse(&e),
            Ok(FrontendMessage::Execute { portal: "p" })
        );
        let d = Frame::new(b'D', b"Ss1\0");
        assert_eq!(
            FrontendMessage::parse(&d),
            Ok(FrontendMessage::Describe(Target::Statement("s1")))
        );
        let c = Frame::new(b'C', b"Pp\0");
        assert_eq!(
            FrontendMessage::parse(&c),
            Ok(FrontendMessage::Close(Target::Portal("p")))
        );
        for (tag, msg) in [
            (b'S', FrontendMessage::Sync),
            (b'H', FrontendMessage::Flush),
            (b'd', FrontendMessage::CopyData),
            (b'c', FrontendMessage::CopyDone),
            (b'f', FrontendMessage::CopyFail),
            (b'F', FrontendMessage::FunctionCall),
            (b'X', FrontendMessage::Terminate),
            (b'y', FrontendMessage::Unknown { tag: b'y' }),
        ] {
            assert_eq!(FrontendMessage::parse(&Frame::new(tag, b"")), Ok(msg));
        }
        assert!(FrontendMessage::parse(&Frame::new(b'S', b""))
            .unwrap()
            .ends_batch());
        assert!(!FrontendMessage::parse(&e).unwrap().ends_batch());
        assert_eq!(Target::Statement("a").statement(), Some("a"));
        assert_eq!(Target::Portal("a").statement(), None);
    }

    #[test]
    fn malformed_fields_are_refused() {
        for (tag, body) in [
            (b'Q', &b"select 1"[..]),
            (b'P', b"s1\0select"),
            (b'P', b"s1\0select $1\0\0\x02\0\0\0\x17"),
            (b'B', b"p"),
            (b'E', b"p\0\0"),
            (b'D', b"Xs\0"),
            (b'C', b""),
        ] {
            assert!(
                FrontendMessage::parse(&Frame::new(tag, body)).is_err(),
                "{} {body:?}",
                tag as char
            );
        }
    }

    #[test]
    fn kinds_agree_with_the_views() {
        for (tag, kind) in [
            (b'S', Kind::Sync),
            (b'H', Kind::Flush),
            (b'F', Kind::FunctionCall),
            (b'X', Kind::Other),
        ] {
            assert_eq!(Kind::of(&Frame::new(tag, b"")), kind);
        }
        assert_eq!(Kind::of(&Frame::new(b'Q', b"select 1\0")), Kind::Query);
        assert_eq!(Kind::of(&Frame::new(b'E', b"\0\0\0\0\0")), Kind::Execute);
    }

    #[test]
    fn peeking_at_the_next_message() {
        assert!(next_ends_batch(b"S\0\0\0\x04"));
        assert!(next_ends_batch(b"H"));
        assert!(!next_ends_batch(b"d\0\0"));
        assert!(!next_ends_batch(b""));
    }
}
