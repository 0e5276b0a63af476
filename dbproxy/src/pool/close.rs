//! The one way an idle connection of another serving thread is ended to make room under
//! `pool.size` (see `checkout`): Terminate, then the server's close awaited, so PostgreSQL never
//! counts more than `pool.size` of a key's connections while the new login runs.

use crate::backend::Backend;

/// Ends an idle connection of another serving thread's: Terminate, then its close awaited
/// (bounded by `limit`: that thread's reactor drives the socket, which is fine while it runs),
/// then its place given back.
pub(super) async fn close_and_wait(mut b: Backend, limit: std::time::Duration) {
    crate::protocol::extended::encode_terminate(&mut b.conn.wbuf);
    let _ = tokio::time::timeout(limit, async {
        if b.conn.flush().await.is_ok() {
            while let Ok(Some(_)) = b.conn.read_frame().await {}
        }
    })
    .await;
}
