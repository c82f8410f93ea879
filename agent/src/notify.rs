//! systemd integration for `postern-agent run` under `Type=notify`: ready, watchdog, status
//! line. Every call is a no-op outside systemd.
//!
//! The status line ends with what the process holds (tokio tasks, open file descriptors,
//! resident memory), refreshed every few seconds, so `systemctl status` shows a leak as a
//! count that grows while the load does not.
//!
//! Ready means "in session with a relay": `systemctl start` (and units ordered after the agent)
//! wait until the agent serves, and `TimeoutStartSec=` in the packaged unit bounds that wait.
//! Sessions that end later do not take readiness back (the agent reconnects by itself); the
//! status line says what is going on.

use std::time::Duration;

use postern_common::procstat;
use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::Status;

/// Keeps the watchdog fed from the start (`WATCHDOG_USEC`, half the interval, when
/// `WATCHDOG_PID` is unset or this process), sends READY=1 once the first relay session is up,
/// and publishes the status line (`systemctl status` shows it) at every change.
pub async fn run(mut status: watch::Receiver<Status>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Not under systemd (or another manager that reads the protocol): nobody to tell.
        return;
    }
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
    let mut sent = String::new();
    // The counts at the end of the line change without a status change: refreshed on a timer.
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.reset();
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
        let line = with_counts(line);
        // Only news is sent: an agent at rest sends nothing.
        if line != sent || (connected && !ready) {
            let state = NotifyState::Status(&line);
            let _ = if connected && !ready {
                ready = true;
                sd_notify::notify(&[NotifyState::Ready, state])
            } else {
                sd_notify::notify(&[state])
            };
            sent = line;
        }
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = refresh.tick() => {}
        }
    }
}

/// How often the status line's counts are read (and sent, when they changed).
const REFRESH: Duration = Duration::from_secs(2);

/// `line` with what the process holds: `…; 41 tasks, 17 fds, 12 MiB` (what can be read).
fn with_counts(line: String) -> String {
    let mut counts = Vec::new();
    if let Some(n) = procstat::runtime_tasks() {
        counts.push(format!("{n} tasks"));
    }
    if let Some(n) = procstat::open_fds() {
        counts.push(format!("{n} fds"));
    }
    if let Some(n) = procstat::resident_bytes() {
        counts.push(format!("{} MiB", n / (1024 * 1024)));
    }
    if counts.is_empty() {
        line
    } else {
        format!("{line}; {}", counts.join(", "))
    }
}

/// Tells systemd the agent is stopping (it drains its connections first).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
