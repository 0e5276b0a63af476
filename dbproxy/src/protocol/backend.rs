//! Typed, borrowed views of the messages a server sends: each frame is parsed into a
//! [`BackendMessage`] pointing into the frame's bytes, so the session and the backend login match
//! on variants and relay the raw [`Frame`] untouched. Fields read on every request (the status
//! of ReadyForQuery, a CommandComplete tag) are read at once; the rest (error fields, row values,
//! parameter types) on demand.

use super::{auth, error, extended, status, Frame, ProtocolError};

/// A transaction status, as ReadyForQuery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries refused until it ends).
    Failed,
}

impl TxStatus {
    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    /// The status of a byte, `None` for an unknown one.
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// Whether a transaction block is open (in progress or failed).
    pub fn in_block(self) -> bool {
        self != TxStatus::Idle
    }
}

/// One server message, borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    /// An Authentication request: its code (`protocol::auth::OK`, `SASL`, ...) and data.
    Authentication {
        /// The request code.
        code: i32,
        /// What follows the code (salt, mechanisms, SCRAM data).
        data: &'a [u8],
    },
    /// BackendKeyData: the keys a CancelRequest names.
    BackendKeyData {
        /// The process id.
        pid: i32,
        /// The secret key.
        key: i32,
    },
    /// ParameterStatus: a run-time parameter's value.
    ParameterStatus,
    /// ReadyForQuery: the end of a request cycle.
    ReadyForQuery {
        /// The transaction status.
        status: TxStatus,
    },
    /// An ErrorResponse.
    ErrorResponse(Fields<'a>),
    /// A NoticeResponse.
    NoticeResponse(Fields<'a>),
    /// A NotificationResponse (LISTEN/NOTIFY).
    NotificationResponse,
    /// ParseComplete.
    ParseComplete,
    /// BindComplete.
    BindComplete,
    /// CloseComplete.
    CloseComplete,
    /// ParameterDescription: the parameter types of a described statement.
    ParameterDescription(ParameterDescription<'a>),
    /// RowDescription.
    RowDescription,
    /// NoData: a described statement or portal returns no rows.
    NoData,
    /// A DataRow.
    DataRow(DataRow<'a>),
    /// CommandComplete with its tag (`SELECT 1`, `SET`, ...).
    CommandComplete {
        /// The command tag, without its NUL.
        tag: &'a [u8],
    },
    /// EmptyQueryResponse.
    EmptyQueryResponse,
    /// PortalSuspended: an Execute's row limit was reached.
    PortalSuspended,
    /// CopyInResponse: COPY FROM STDIN starts; the client sends CopyData.
    CopyInResponse,
    /// CopyOutResponse.
    CopyOutResponse,
    /// CopyBothResponse.
    CopyBothResponse,
    /// CopyData from the server.
    CopyData,
    /// CopyDone from the server.
    CopyDone,
    /// FunctionCallResponse.
    FunctionCallResponse,
    /// NegotiateProtocolVersion.
    NegotiateProtocolVersion,
    /// A type byte no backend message has.
    Unknown {
        /// The type byte.
        tag: u8,
    },
}

/// The fields of an ErrorResponse or NoticeResponse, read on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// The SQLSTATE.
    pub fn code(&self) -> Option<&'a str> {
        error::sqlstate(self.0)
    }

    /// The severity (`ERROR`, `FATAL`, `PANIC`, `NOTICE`, ...).
    pub fn severity(&self) -> Option<&'a str> {
        error::field(self.0, b'S')
    }

    /// The primary message.
    pub fn message(&self) -> Option<&'a str> {
        error::field(self.0, b'M')
    }

    /// Whether the error ends the connection (FATAL or PANIC).
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity(), Some("FATAL" | "PANIC"))
    }
}

/// A ParameterDescription, read on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterDescription<'a>(&'a [u8]);

impl ParameterDescription<'_> {
    /// The parameter type OIDs.
    pub fn types(&self) -> Result<Vec<u32>, ProtocolError> {
        extended::parameter_description(self.0)
    }
}

/// A DataRow, read on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRow<'a>(&'a [u8]);

impl<'a> DataRow<'a> {
    /// Column `n` (from 0) as text (`None` when NULL, absent or malformed).
    pub fn text(&self, n: usize) -> Option<&'a str> {
        let body = self.0;
        let count = usize::try_from(i16::from_be_bytes(body.get(..2)?.try_into().ok()?)).ok()?;
        if n >= count {
            return None;
        }
        let mut at = 2usize;
        for i in 0..=n {
            let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            if len < 0 {
                if i == n {
                    return None;
                }
                continue;
            }
            let len = usize::try_from(len).ok()?;
            if i == n {
                return std::str::from_utf8(body.get(at..at.checked_add(len)?)?).ok();
            }
            at = at.checked_add(len)?;
        }
        None
    }

    /// The first column as text (`None` when NULL, absent or malformed).
    pub fn first_text(&self) -> Option<&'a str> {
        let body = self.0;
        let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
        if n < 1 {
            return None;
        }
        let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
        let len = usize::try_from(len).ok()?;
        std::str::from_utf8(body.get(6..6 + len)?).ok()
    }
}

impl<'a> BackendMessage<'a> {
    /// Parses a server frame. Authentication, BackendKeyData and ReadyForQuery are checked (a
    /// malformed one is a protocol error); the other bodies are read on demand or only relayed.
    pub fn parse(f: &'a Frame) -> Result<BackendMessage<'a>, ProtocolError> {
        let body = f.body();
        Ok(match f.tag() {
            b'R' => {
                let (code, data) = auth::request(body)?;
                BackendMessage::Authentication { code, data }
            }
            b'K' => {
                let (pid, key) = status::backend_key(body)?;
                BackendMessage::BackendKeyData { pid, key }
            }
            b'S' => BackendMessage::ParameterStatus,
            b'Z' => {
                let s = status::ready_status(body)?;
                BackendMessage::ReadyForQuery {
                    status: TxStatus::from_byte(s).ok_or(ProtocolError::Malformed("ReadyForQuery"))?,
                }
            }
            b'E' => BackendMessage::ErrorResponse(Fields(body)),
            b'N' => BackendMessage::NoticeResponse(Fields(body)),
            b'A' => BackendMessage::NotificationResponse,
            b'1' => BackendMessage::ParseComplete,
            b'2' => BackendMessage::BindComplete,
            b'3' => BackendMessage::CloseComplete,
            b't' => BackendMessage::ParameterDescription(ParameterDescription(body)),
            b'T' => BackendMessage::RowDescription,
            b'n' => BackendMessage::NoData,
            b'D' => BackendMessage::DataRow(DataRow(body)),
            b'C' => BackendMessage::CommandComplete {
                tag: body.strip_suffix(b"\0").unwrap_or(body),
            },
            b'I' => BackendMessage::EmptyQueryResponse,
            b's' => BackendMessage::PortalSuspended,
            b'G' => BackendMessage::CopyInResponse,
            b'H' => BackendMessage::CopyOutResponse,
            b'W' => BackendMessage::CopyBothResponse,
            b'd' => BackendMessage::CopyData,
            b'c' => BackendMessage::CopyDone,
            b'V' => BackendMessage::FunctionCallResponse,
            b'v' => BackendMessage::NegotiateProtocolVersion,
            tag => BackendMessage::Unknown { tag },
        })
    }

    /// The answer only acknowledges a message (nothing was executed): ParseComplete,
    /// BindComplete, ParameterDescription, RowDescription, NoData or CloseComplete.
    pub fn acknowledges(&self) -> bool {
        matches!(
            self,
            BackendMessage::ParseComplete
                | BackendMessage::BindComplete
                | BackendMessage::ParameterDescription(_)
                | BackendMessage::RowDescription
                | BackendMessage::NoData
                | BackendMessage::CloseComplete
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_row_columns() {
        // Three columns: "ab", NULL, "c".
        let body = b"\0\x03\0\0\0\x02ab\xff\xff\xff\xff\0\0\0\x01c";
        let row = DataRow(body);
        assert_eq!(row.text(0), Some("ab"));
        assert_eq!(row.text(1), None);
        assert_eq!(row.text(2), Some("c"));
        assert_eq!(row.text(3), None);
        assert_eq!(DataRow(b"\0\x02\0\0\0\x09ab").text(1), None, "truncated");
        assert_eq!(
            DataRow(b"\0\x01\x7f\xff\xff\xff").text(0),
            None,
            "length past the end"
        );
    }

    fn parse(tag: u8, body: &[u8]) -> Result<BackendMessage<'static>, ProtocolError> {
        let f = Box::leak(Box::new(Frame::new(tag, body)));
        BackendMessage::parse(f)
    }

    #[test]
    fn status_and_completion() {
        assert_eq!(
            parse(b'Z', b"T"),
            Ok(BackendMessage::ReadyForQuery {
                status: TxStatus::InTransaction
            })
        );
        assert!(parse(b'Z', b"X").is_err());
        assert!(parse(b'Z', b"").is_err());
        assert_eq!(
            parse(b'C', b"SELECT 1\0"),
            Ok(BackendMessage::CommandComplete { tag: b"SELECT 1" })
        );
        assert_eq!(
            parse(b'K', b"\0\0\0\x07\0\0\0\x09"),
            Ok(BackendMessage::BackendKeyData { pid: 7, key: 9 })
        );
        assert!(parse(b'K', b"\0\0").is_err());
        assert_eq!(
            parse(b'R', b"\0\0\0\0"),
            Ok(BackendMessage::Authentication { code: 0, data: b"" })
        );
        assert!(parse(b'R', b"\0").is_err());
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::from_byte(s.byte()), Some(s));
        }
        assert!(!TxStatus::Idle.in_block() && TxStatus::Failed.in_block());
    }

    #[test]
    fn errors_rows_and_descriptions_on_demand() {
        let Ok(BackendMessage::ErrorResponse(e)) = parse(b'E', b"SFATAL\0C57P01\0Mbye\0\0") else {
            panic!("not an error");
        };
        assert_eq!(
            (e.code(), e.severity(), e.message()),
            (Some("57P01"), Some("FATAL"), Some("bye"))
        );
        assert!(e.is_fatal());
        let Ok(BackendMessage::ErrorResponse(e)) = parse(b'E', b"SERROR\0C25006\0\0") else {
            panic!("not an error");
        };
        assert!(!e.is_fatal());
        let Ok(BackendMessage::DataRow(r)) = parse(b'D', b"\0\x01\0\0\0\x030/3") else {
            panic!("not a row");
        };
        assert_eq!(r.first_text(), Some("0/3"));
        let Ok(BackendMessage::DataRow(r)) = parse(b'D', b"\0\x01\xff\xff\xff\xff") else {
            panic!("not a row");
        };
        assert_eq!(r.first_text(), None, "NULL");
        let Ok(BackendMessage::DataRow(r)) = parse(b'D', b"\0\x01\0\0\0\x09ab") else {
            panic!("not a row");
        };
        assert_eq!(r.first_text(), None, "truncated");
        let Ok(BackendMessage::ParameterDescription(d)) = parse(b't', b"\0\x01\0\0\0\x19") else {
            panic!("not a description");
        };
        assert_eq!(d.types().unwrap(), [25]);
    }

    #[test]
    fn acknowledgements() {
        for tag in [b'1', b'2', b'3', b't', b'T', b'n'] {
            assert!(parse(tag, b"").unwrap().acknowledges(), "{}", tag as char);
        }
        for tag in [b'D', b'C', b'E', b'I', b's', b'G'] {
            assert!(!parse(tag, b"").unwrap().acknowledges(), "{}", tag as char);
        }
        assert_eq!(parse(b'?', b""), Ok(BackendMessage::Unknown { tag: b'?' }));
    }
}
