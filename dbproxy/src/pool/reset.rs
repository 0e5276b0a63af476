//! Resetting a server connection its client left: the reset query (`DISCARD ALL` by default),
//! whose answer must end in ReadyForQuery `I` without an error; the ParameterStatus values it
//! reports become what the next client is told at login.

use crate::backend::{Backend, BackendError};
use crate::protocol::{simple, status, BackendMessage, Frame, ProtocolError, TxStatus};

/// Why a connection was not reset (it is then closed).
#[derive(Debug, thiserror::Error)]
pub(super) enum ResetError {
    /// The connection failed or broke the protocol.
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The reset query failed (for instance inside a transaction block).
    #[error("the reset query failed")]
    Failed,
    /// It did not end outside a transaction, or something else followed its answer.
    #[error("the connection is not idle after the reset")]
    NotIdle,
}

impl From<ProtocolError> for ResetError {
    fn from(e: ProtocolError) -> Self {
        ResetError::Backend(BackendError::Protocol(e))
    }
}

/// Runs `query` on `b` and reads its answer up to its ReadyForQuery, updating `greeting` (the
/// ParameterStatus frames a client taking the connection is sent) from what the server reports.
/// The caller bounds it in time.
pub(super) async fn run(b: &mut Backend, query: &str, greeting: &mut Vec<Frame>) -> Result<(), ResetError> {
    simple::encode_query(query, &mut b.conn.wbuf);
    b.conn.flush().await.map_err(BackendError::Io)?;
    let mut failed = false;
    loop {
        let f = b.conn.read_frame().await?.ok_or(BackendError::Closed)?;
        match BackendMessage::parse(&f)? {
            BackendMessage::ReadyForQuery { status } => {
                if failed {
                    return Err(ResetError::Failed);
                }
                // Anything after the one ReadyForQuery expected means the connection's state
                // was not what the session believed: never reuse it.
                if status != TxStatus::Idle || !b.conn.rbuf.is_empty() {
                    return Err(ResetError::NotIdle);
                }
                break;
            }
            BackendMessage::ErrorResponse(_) => failed = true,
            BackendMessage::ParameterStatus => {
                let (name, _) = status::parameter_status(f.body())?;
                let name = name.to_string();
                greeting.retain(|g| status::parameter_status(g.body()).map_or(true, |(n, _)| n != name));
                greeting.push(f);
            }
            // Command tags, notices, notifications and result rows of a custom reset query.
            _ => {}
        }
    }
    // DISCARD ALL (or whatever the reset does) leaves no statement and no setting behind.
    b.prepared.clear();
    b.to_close.clear();
    b.sets_applied = 0;
    b.sets_owner = 0;
    Ok(())
}
