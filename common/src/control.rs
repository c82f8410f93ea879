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

    /// A control stream pair over an in-memory session: (ours, the peer's).
    async fn pair() -> (
        Stream,
        Stream,
        crate::transport::Session,
        crate::transport::Session,
    ) {
        let (a, b) = crate::transport::Session::memory_pair();
        let mut ours = a.open().await.unwrap();
        // The peer learns of the stream with its first byte.
        AsyncWriteExt::write_all(&mut ours, b"PSTN").await.unwrap();
        let mut theirs = b.accept().await.unwrap();
        let mut magic = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut magic)
            .await
            .unwrap();
        (ours, theirs, a, b)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dead_after_two_intervals_and_a_little() {
        let (ours, _theirs, _a, _b) = pair().await;
        let interval = Duration::from_secs(1);
        let (_keep, outgoing) = mpsc::channel(1);
        let started = Instant::now();
        let end = run(ours, interval, CancellationToken::new(), outgoing, |m| {
            Err(Box::new(m))
        })
        .await;
        assert!(
            matches!(end, ControlEnd::Silent(d) if d == dead_after(interval)),
            "{end}"
        );
        let took = started.elapsed();
        assert!(
            took >= dead_after(interval) && took < dead_after(interval) + interval,
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_both_ends_alive_and_a_closed_stream_ends_the_session() {
        let (ours, theirs, _a, _b) = pair().await;
        let interval = Duration::from_secs(1);
        let stop = CancellationToken::new();
        let peer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (_keep, outgoing) = mpsc::channel(1);
                run(theirs, interval, stop, outgoing, |m| Err(Box::new(m))).await
            })
        };
        let (_keep, outgoing) = mpsc::channel(1);
        let mine = tokio::spawn(run(
            ours,
            interval,
            CancellationToken::new(),
            outgoing,
            |m| Err(Box::new(m)),
        ));
        // Thirty intervals: both still up.
        tokio::time::sleep(interval * 30).await;
        assert!(!mine.is_finished() && !peer.is_finished());
        // The peer stops (it shuts its side of the stream): we see a closed control stream.
        stop.cancel();
        assert!(matches!(peer.await.unwrap(), ControlEnd::Shutdown));
        assert!(matches!(mine.await.unwrap(), ControlEnd::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_nobody_takes_ends_the_session_as_not_protocol() {
        let (ours, mut theirs, _a, _b) = pair().await;
        let (_keep, outgoing) = mpsc::channel(1);
        let mine = tokio::spawn(run(
            ours,
            Duration::from_secs(1),
            CancellationToken::new(),
            outgoing,
            |m| Err(Box::new(m)),
        ));
        wire::write_frame(
            &mut theirs,
            &Control::Drain {
                reason: "x".into(),
                grace_ms: 1,
            },
        )
        .await
        .unwrap();
        let end = mine.await.unwrap();
        assert!(
            matches!(&end, ControlEnd::Broken(why) if why.contains("unexpected message")),
            "{end}"
        );
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
