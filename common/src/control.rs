//! Liveness on the control stream, the same code at both ends.
//!
//! After the hello and welcome, each side sends [`Control::Heartbeat`] every interval and expects
//! to hear from its peer at least once every two intervals (plus a little slack for scheduling).
//! A peer that stays silent longer, closes the stream or sends anything that is not protocol ends
//! the session: the caller closes it, and an agent then reconnects.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::protocol::Control;
use crate::transport::Stream;
use crate::wire::{self, WireError};

/// Why a control stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlEnd {
    /// Shutdown was requested locally.
    #[error("shutting down")]
    Shutdown,
    /// Nothing arrived for too long.
    #[error("peer silent for {0:?} (heartbeat missed)")]
    Silent(Duration),
    /// The peer closed the control stream.
    #[error("peer closed the control stream")]
    Closed,
    /// The peer sent something that is not protocol, or the stream failed.
    #[error("control stream: {0}")]
    Broken(String),
}

/// The shortest heartbeat interval either side uses, whatever the peer asks for.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest heartbeat interval either side uses, whatever the peer asks for (also the
/// longest `heartbeat_interval` a relay config accepts).
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// A heartbeat interval brought within [`MIN_INTERVAL`]..=[`MAX_INTERVAL`]. Intervals come from
/// config files and from the peer (the relay's welcome): neither may make timer arithmetic
/// overflow or spin.
pub fn clamp_interval(interval: Duration) -> Duration {
    interval.clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// How long after the last frame a peer is considered dead: two intervals and a little slack.
pub fn dead_after(interval: Duration) -> Duration {
    interval
        .saturating_mul(2)
        .saturating_add(Duration::from_millis(250))
}

/// Runs a control stream after the hello and welcome: sends heartbeats and watches for the
/// peer's until the session should end; also sends the messages that arrive on `outgoing`, and
/// hands messages other than heartbeats to `incoming`, which hands back a message it does not
/// take (that ends the session as not protocol).
pub async fn run(
    stream: Stream,
    interval: Duration,
    cancel: CancellationToken,
    mut outgoing: mpsc::Receiver<Control>,
    mut incoming: impl FnMut(Control) -> Result<(), Box<Control>>,
) -> ControlEnd {
    let interval = clamp_interval(interval);
    let mut outgoing_open = true;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Result<Control, WireError>>(4);
    let read_task = tokio::spawn(async move {
        loop {
            let frame = wire::read_frame::<_, Control>(&mut reader).await;
            let stop = frame.is_err();
            if tx.send(frame).await.is_err() || stop {
                return;
            }
        }
    });

    let limit = dead_after(interval);
    let mut deadline = Instant::now() + limit;
    let mut ticks = interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let end = loop {
        tokio::select! {
            _ = cancel.cancelled() => break ControlEnd::Shutdown,
            _ = sleep_until(deadline) => break ControlEnd::Silent(limit),
            _ = ticks.tick() => {
                seq += 1;
                if let Err(e) = wire::write_frame(&mut writer, &Control::Heartbeat { seq }).await {
                    break ControlEnd::Broken(e.to_string());
                }
            }
            out = outgoing.recv(), if outgoing_open => match out {
                Some(msg) => {
                    if let Err(e) = wire::write_frame(&mut writer, &msg).await {
                        break ControlEnd::Broken(e.to_string());
                    }
                }
                None => outgoing_open = false,
            },
            frame = rx.recv() => match frame {
                Some(Ok(Control::Heartbeat { .. })) => deadline = Instant::now() + limit,
                Some(Ok(other)) => {
                    // Any frame shows the peer is alive.
                    deadline = Instant::now() + limit;
                    if let Err(other) = incoming(other) {
                        let what: String = format!("{other:?}").chars().take(200).collect();
                        break ControlEnd::Broken(format!("unexpected message {what}"));
                    }
                }
                Some(Err(WireError::Frame(crate::protocol::FrameError::Truncated))) | None => {
                    break ControlEnd::Closed;
                }
                Some(Err(e)) => break ControlEnd::Broken(e.to_string()),
            },
        }
    };
    read_task.abort();
    let _ = writer.shutdown().await;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_after_is_about_two_intervals() {
        let d = dead_after(Duration::from_secs(10));
        assert!(d >= Duration::from_secs(20) && d < Duration::from_secs(21));
    }

    #[test]
    fn intervals_from_a_peer_cannot_overflow_or_spin() {
        // Before: `interval * 2` panicked ("overflow when multiplying duration by scalar").
        assert_eq!(dead_after(Duration::MAX), Duration::MAX);
        assert_eq!(
            clamp_interval(Duration::from_millis(u64::MAX)),
            MAX_INTERVAL
        );
        assert_eq!(clamp_interval(Duration::ZERO), MIN_INTERVAL);
        let _ = Instant::now() + dead_after(clamp_interval(Duration::MAX));
    }
}
