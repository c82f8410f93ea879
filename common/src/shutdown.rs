//! Shutdown on a signal, the same for every binary: SIGTERM (systemd, Cloud Foundry) or SIGINT
//! (Ctrl-C) cancels the token the process runs under, and the process drains from there.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Cancels `token` on the first SIGTERM or SIGINT. Returns early if `token` is cancelled
/// otherwise. If the handlers cannot be installed the process runs on (it can still be
/// stopped, only not gracefully) and says so.
pub async fn on_signal(token: CancellationToken) {
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let (mut term, mut int) = match (term, int) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot install signal handlers: SIGTERM will not drain");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = token.cancelled() => return,
    }
    token.cancel();
}
