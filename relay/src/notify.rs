//! systemd integration for `postern-relay run` under `Type=notify`: ready once every listener
//! is bound, the watchdog, stopping. Every call is a no-op outside systemd.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use postern_relay::Relay;

/// Tells systemd the relay serves (its listeners are bound: call after [`Relay::bind`]), keeps
/// the watchdog fed (`WATCHDOG_USEC`, half the interval, when `WATCHDOG_PID` is unset or this
/// process), and says STOPPING=1 when `shutdown` fires (the relay drains first).
pub(crate) fn started(relay: &Relay, shutdown: CancellationToken) {
    let mut line = String::from("listening:");
    if let Some(a) = relay.quic_addr() {
        line.push_str(&format!(" quic {a}"));
    }
    if let Some(a) = relay.http_addr() {
        line.push_str(&format!(" http {a}"));
    }
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Fed while draining too: systemd's stop timeout governs the drain.
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
    tokio::spawn(async move {
        shutdown.cancelled().await;
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    });
}
