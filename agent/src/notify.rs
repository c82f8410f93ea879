//! systemd integration for `postern-agent run` under `Type=notify`: ready, watchdog, status
//! line. Every call is a no-op outside systemd.
//!
//! Ready means "in session with a relay": `systemctl start` (and units ordered after the agent)
//! wait until the agent serves, and `TimeoutStartSec=` in the packaged unit bounds that wait.
//! Sessions that end later do not take readiness back (the agent reconnects by itself); the
//! status line says what is going on.

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::Status;

/// Keeps the watchdog fed from the start (`WATCHDOG_USEC`, half the interval, when
/// `WATCHDOG_PID` is unset or this process), sends READY=1 once the first relay session is up,
/// and publishes the status line (`systemctl status` shows it) at every change.
pub async fn run(mut status: watch::Receiver<Status>) {
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
    let mut ready = false;
    loop {
        let (line, connected) = match &*status.borrow_and_update() {
            Status::Connected {
                relay_instance,
                transport,
                ..
            } => (
                format!("connected to relay {relay_instance} over {transport}"),
                true,
            ),
            Status::Disconnected(why) => (format!("disconnected: {why}"), false),
        };
        let line = NotifyState::Status(&line);
        let _ = if connected && !ready {
            ready = true;
            sd_notify::notify(&[NotifyState::Ready, line])
        } else {
            sd_notify::notify(&[line])
        };
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Tells systemd the agent is stopping (it drains its connections first).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
