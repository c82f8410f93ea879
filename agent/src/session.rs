//! The agent's connection to the relay: dial, hello, serve streams, heartbeat, reconnect.
//!
//! The agent reconnects forever. Delays grow exponentially from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`] with full jitter (so a relay restart is not met by every agent at the same
//! instant), and start over after a session that stayed up for [`HEALTHY_AFTER`].

use std::sync::Arc;
use std::time::Duration;

use postern_common::control::{self, ControlEnd};
use postern_common::protocol::{self, Control};
use postern_common::transport::{Session, Stream, TransportKind};
use postern_common::wire;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{Config, RelayTarget};
use crate::dial::Dialer;
use crate::forward;

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Deadline for the relay's welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent is doing, for tests, health checks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not connected (yet, or any more); the reason of the last failure.
    Disconnected(String),
    /// In session with a relay.
    Connected {
        /// The relay instance's name.
        relay_instance: String,
        /// The transport in use.
        transport: TransportKind,
        /// Services the relay accepted.
        accepted: Vec<String>,
    },
}

/// Runs one session loop per relay until `shutdown`.
pub(crate) async fn run(
    config: Arc<Config>,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    let dialer = match Dialer::new(
        config.tls.clone(),
        config.server_name.clone(),
        config.transport,
        config.websocket.clone(),
    ) {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "cannot dial relays");
            status.send_replace(Status::Disconnected(e));
            return;
        }
    };
    let status = Arc::new(status);
    let mut loops = tokio::task::JoinSet::new();
    for target in config.relays.clone() {
        let span = info_span!("relay", relay = %target);
        loops.spawn(
            relay_loop(
                config.clone(),
                dialer.clone(),
                target,
                status.clone(),
                shutdown.clone(),
            )
            .instrument(span),
        );
    }
    while loops.join_next().await.is_some() {}
    status.send_replace(Status::Disconnected("shut down".into()));
}

/// Holds a session with one relay, reconnecting with backoff.
async fn relay_loop(
    config: Arc<Config>,
    dialer: Dialer,
    target: RelayTarget,
    status: Arc<watch::Sender<Status>>,
    shutdown: CancellationToken,
) {
    let mut attempt: u32 = 0;
    loop {
        let started = Instant::now();
        let result = once(&config, &dialer, &target, &status, &shutdown).await;
        if shutdown.is_cancelled() {
            break;
        }
        let reason = match result {
            Ok(end) => format!("session ended: {end}"),
            Err(e) => e,
        };
        if started.elapsed() >= HEALTHY_AFTER {
            attempt = 0;
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        warn!(%reason, retry_in_ms = delay.as_millis() as u64, "relay session down; reconnecting");
        status.send_replace(Status::Disconnected(reason));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The delay before reconnect attempt `attempt` (0-based): exponential, capped, full jitter
/// over its upper half so it never collapses to zero.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let cap = exp.min(BACKOFF_MAX);
    let jitter: f64 = rand::rng().random_range(0.5..=1.0);
    cap.mul_f64(jitter)
}

/// Dials the relay and serves one session until it ends.
async fn once(
    config: &Arc<Config>,
    dialer: &Dialer,
    target: &RelayTarget,
    status: &watch::Sender<Status>,
    shutdown: &CancellationToken,
) -> Result<ControlEnd, String> {
    let session = dialer.dial(target).await?;
    let (control_stream, welcome) = handshake(config, &session)
        .await
        .inspect_err(|_| session.close("handshake failed"))?;
    let Control::Welcome {
        relay_instance,
        accepted,
        rejected,
        heartbeat_ms,
        version,
        ..
    } = welcome
    else {
        unreachable!("handshake returns only welcomes");
    };
    for r in &rejected {
        error!(service = %r.service, reason = %r.reason, "relay refused a service this agent offers");
    }
    info!(%relay_instance, transport = %session.kind(), version, services = ?accepted, "connected to relay");
    status.send_replace(Status::Connected {
        relay_instance: relay_instance.clone(),
        transport: session.kind(),
        accepted,
    });

    let streams = {
        let session = session.clone();
        let config = config.clone();
        tokio::spawn(async move {
            while let Ok(stream) = session.accept().await {
                tokio::spawn(forward::serve(config.clone(), stream));
            }
        })
    };
    let heartbeat = Duration::from_millis(heartbeat_ms.max(100));
    let end = tokio::select! {
        end = control::keepalive(control_stream, heartbeat, shutdown.clone()) => end,
        why = session.closed() => ControlEnd::Broken(why),
    };
    streams.abort();
    session.close(&end.to_string());
    Ok(end)
}

async fn handshake(config: &Config, session: &Session) -> Result<(Stream, Control), String> {
    let mut stream = session.open().await.map_err(|e| e.to_string())?;
    let hello = Control::Hello {
        versions: protocol::VERSIONS.to_vec(),
        services: config.services.keys().cloned().collect(),
        software: env!("CARGO_PKG_VERSION").to_owned(),
        take_over: false,
    };
    wire::write_first(&mut stream, &hello)
        .await
        .map_err(|e| format!("send hello: {e}"))?;
    let answer = tokio::time::timeout(WELCOME_TIMEOUT, wire::read_frame::<_, Control>(&mut stream))
        .await
        .map_err(|_| "relay did not answer the hello in time".to_owned())?;
    match answer {
        Ok(w @ Control::Welcome { .. }) => Ok((stream, w)),
        Ok(Control::Refused { code, message }) => {
            Err(format!("relay refused this agent ({code}): {message}"))
        }
        Ok(other) => Err(format!("unexpected answer to hello: {other:?}")),
        Err(e) => {
            // A refused identity shows as a closed connection; say why if the relay said.
            let why = tokio::time::timeout(Duration::from_secs(1), session.closed())
                .await
                .unwrap_or_default();
            if why.is_empty() {
                Err(format!("relay answer: {e}"))
            } else {
                Err(format!("relay: {why}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let exp = BACKOFF_MIN
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(BACKOFF_MAX);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(0) <= BACKOFF_MIN);
        assert!(backoff(30) >= BACKOFF_MAX / 2);
    }
}
