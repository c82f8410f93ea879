//! Shutdown on a signal, the same for every binary: SIGTERM (systemd, Cloud Foundry) or SIGINT
//! (Ctrl-C) cancels the token the process runs under, and the process drains from there.
//! SIGHUP asks for a reload ([`hangups`]).

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

/// SIGHUP, the reload signal (`systemctl reload` sends it): each [`recv`] returns once per
/// signal, several signals that arrive during one reload count as one. `None`, logged, when the
/// handler cannot be installed (the process then runs on without reloads).
///
/// [`recv`]: tokio::signal::unix::Signal::recv
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler: reload will not work");
            None
        }
    }
}
