//! The one shutdown path: SIGINT/SIGTERM cancel a shared token, SIGHUP feeds a reload stream.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A shutdown signal shared by every task of a process. Cloning is cheap.
pub type Shutdown = CancellationToken;

/// What the signal handler hands to the program.
#[derive(Debug)]
pub struct Signals {
    /// Cancelled on the first SIGINT or SIGTERM.
    pub shutdown: Shutdown,
    /// One item per SIGHUP. Bursts collapse into one pending reload.
    pub reload: mpsc::Receiver<()>,
}

/// Installs handlers for SIGINT, SIGTERM and SIGHUP. Must be called inside a tokio runtime.
///
/// A second SIGINT/SIGTERM while draining exits the process at once with status 130, as users of
/// nginx and pgpool expect from a repeated Ctrl-C.
pub fn install() -> std::io::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = CancellationToken::new();
    let (tx, reload) = mpsc::channel(1);
    let token = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {
                    // A full channel means a reload is already pending; that one will read the new file.
                    let _ = tx.try_send(());
                    continue;
                }
            }
            if token.is_cancelled() {
                tracing::warn!("second shutdown signal: exiting now");
                std::process::exit(130);
            }
            tracing::info!("shutdown signal received: draining");
            token.cancel();
        }
    });
    Ok(Signals { shutdown, reload })
}

/// Waits for `tasks` to finish, at most `deadline` after shutdown began. Returns false on timeout.
pub async fn drain<F: std::future::Future>(tasks: F, deadline: Duration) -> bool {
    tokio::time::timeout(deadline, tasks).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_reports_timeouts() {
        tokio::time::pause();
        assert!(drain(async {}, Duration::from_secs(1)).await);
        assert!(!drain(std::future::pending::<()>(), Duration::from_secs(1)).await);
    }
}
