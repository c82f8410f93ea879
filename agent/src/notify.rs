//! systemd integration for `postern-agent run` under `Type=notify`: ready, watchdog, status
//! line. Every call is a no-op outside systemd.

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::Status;

/// Tells systemd the agent runs, keeps the watchdog fed and publishes the status line
/// (`systemctl status` shows it). Ready means "configured and trying": an agent whose relay is
/// unreachable must keep trying, not be restarted by a start timeout.
pub async fn run(mut status: watch::Receiver<Status>) {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
    loop {
        let line = match &*status.borrow_and_update() {
            Status::Connected {
                relay_instance,
                transport,
                ..
            } => format!("connected to relay {relay_instance} over {transport}"),
            Status::Disconnected(why) => format!("disconnected: {why}"),
        };
        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Tells systemd the agent is stopping (it drains its connections first).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
