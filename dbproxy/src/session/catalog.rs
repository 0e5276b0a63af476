//! What a session learns from the primary's catalog for routing: the unlogged relations of its
//! database (see [`crate::unlogged`]), read on its own idle primary connection before it routes
//! its next statement, so that statement already knows them.

use bytes::BytesMut;

use crate::backend::Backend;
use crate::config::secs;
use crate::protocol::{simple, BackendMessage};
use crate::unlogged::QUERY;

use super::Session;

impl Session {
    /// Learns the unlogged relations of the session's database when due (the session started
    /// before anybody learned them, or ran DDL) and its primary connection is idle with nothing
    /// of its own in flight; otherwise they stay due. A connection that fails meanwhile is
    /// dropped, as an idle one that went away (reopened when next needed).
    pub(super) async fn learn_unlogged(&mut self) {
        if !self.unlogged_due || !self.batch.is_empty() || !self.tx.idle() || self.cycle.on().is_some() {
            return;
        }
        let Some(b) = self.primary.as_mut() else {
            return;
        };
        if b.swallow_rfq > 0 || b.swallow_parse > 0 || b.swallow_close > 0 || b.capture_lsn > 0 || b.capturing
        {
            return;
        }
        self.unlogged_due = false;
        let limit = secs(self.shared.config.limits.connect_timeout);
        match tokio::time::timeout(limit, query(b, &mut self.client.wbuf)).await {
            Ok(Ok(Some(names))) => self.unlogged.learned(names),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::info!(error = %e, "primary connection lost while learning unlogged relations");
                self.primary = None;
            }
            Err(_) => {
                tracing::info!("primary connection timed out learning unlogged relations");
                self.primary = None;
            }
        }
    }
}

/// Runs [`QUERY`] on `b`: the names (`None` if the server refused the query), once its
/// ReadyForQuery came. Notifications and notices arriving meanwhile go on to the client.
async fn query(b: &mut Backend, client: &mut BytesMut) -> Result<Option<Vec<Vec<u8>>>, String> {
    simple::encode_query(QUERY, &mut b.conn.wbuf);
    b.conn.flush().await.map_err(|e| e.to_string())?;
    let mut names = Some(Vec::new());
    loop {
        let f = b
            .conn
            .read_frame()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("connection closed")?;
        match BackendMessage::parse(&f).map_err(|e| e.to_string())? {
            BackendMessage::DataRow(row) => {
                if let (Some(n), Some(name)) = (names.as_mut(), row.first_text()) {
                    n.push(name.as_bytes().to_vec());
                }
            }
            BackendMessage::ErrorResponse(e) if e.is_fatal() => return Err("FATAL error".into()),
            BackendMessage::ErrorResponse(e) => {
                tracing::warn!(
                    sqlstate = e.code().unwrap_or(""),
                    "cannot read the unlogged relations"
                );
                names = None;
            }
            BackendMessage::ReadyForQuery { .. } => return Ok(names),
            BackendMessage::NotificationResponse
            | BackendMessage::NoticeResponse(_)
            | BackendMessage::ParameterStatus => {
                client.extend_from_slice(f.raw());
            }
            _ => {}
        }
    }
}
