//! The agent's connection to the relay: dial, hello, serve streams, heartbeat, reconnect.
//!
//! The agent reconnects forever. Delays grow exponentially from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`] with full jitter (so a relay restart is not met by every agent at the same
//! instant), and start over after a session that stayed up for [`HEALTHY_AFTER`].

use std::sync::Arc;
use std::time::Duration;

use postern_common::control::{self, ControlEnd};
use postern_common::protocol::{self, Control, FEATURE_MYSQL_E2E};
use postern_common::transport::{Session, Stream, TransportKind};
use postern_common::wire;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, RelayTarget};
use crate::dial::{Dialer, Pinned};
use crate::e2e::{EndToEnd, FrontEnd};
use crate::forward;
use postern_common::config::RelayUrl;

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
    // One MySQL front end (and events sink) for every relay session of this agent.
    let front = Arc::new(FrontEnd::new(
        &config,
        postern_common::events::Events::new(),
    ));
    let mut loops = tokio::task::JoinSet::new();
    for target in config.relays.clone() {
        let span = info_span!("relay", relay = %target);
        let (config, front, dialer, status, shutdown) = (
            config.clone(),
            front.clone(),
            dialer.clone(),
            status.clone(),
            shutdown.clone(),
        );
        loops.spawn(
            async move {
                if dialer.pins_instances(&target) {
                    cf_supervisor(config, front, dialer, target, status, shutdown).await;
                } else {
                    relay_loop(
                        config,
                        front,
                        dialer,
                        Route::Target(target),
                        None,
                        status,
                        shutdown,
                    )
                    .await;
                }
            }
            .instrument(span),
        );
    }
    while loops.join_next().await.is_some() {}
    status.send_replace(Status::Disconnected("shut down".into()));
}

/// How a session loop reaches its relay.
#[derive(Debug, Clone)]
enum Route {
    /// Any instance behind this target (QUIC, WebSocket or raced).
    Target(RelayTarget),
    /// One instance of a Cloud Foundry app, pinned with `X-Cf-App-Instance`.
    Pinned {
        url: RelayUrl,
        app_guid: String,
        index: u32,
    },
}

/// Why a session attempt failed.
enum Failure {
    /// The pinned instance no longer exists: stop this loop.
    Gone,
    /// Anything else: retry with backoff.
    Other(String),
}

/// Holds a session with one relay (or relay instance), reconnecting with backoff. Ends at
/// shutdown, or when a pinned instance is gone.
async fn relay_loop(
    config: Arc<Config>,
    front: Arc<FrontEnd>,
    dialer: Dialer,
    route: Route,
    mut first: Option<Session>,
    status: Arc<watch::Sender<Status>>,
    shutdown: CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut moved: Option<Ready> = None;
    loop {
        let started = Instant::now();
        let ready = match moved.take() {
            Some(r) => Ok(r),
            None => {
                let session = match first.take() {
                    Some(s) => Ok(s),
                    None => dial(&dialer, &route).await,
                };
                match session {
                    Ok(s) => match handshake(&config, &s, false).await {
                        Ok((control, welcome)) => Ok(Ready {
                            session: s,
                            control,
                            welcome,
                        }),
                        Err(e) => {
                            s.close("handshake failed");
                            Err(Failure::Other(e))
                        }
                    },
                    Err(f) => Err(f),
                }
            }
        };
        let quic_probe = match &route {
            Route::Target(RelayTarget {
                quic: Some(q),
                websocket: Some(_),
            }) if config.transport == crate::config::TransportChoice::Auto => Some(q),
            _ => None,
        };
        let result = match ready {
            Ok(r) => once(&config, &front, &dialer, r, quic_probe, &status, &shutdown)
                .await
                .map_err(Failure::Other),
            Err(f) => Err(f),
        };
        let result = match result {
            Ok(Outcome::Moved(next)) => {
                moved = Some(*next);
                attempt = 0;
                continue;
            }
            Ok(Outcome::Ended(end)) => Ok(end),
            Err(f) => Err(f),
        };
        if shutdown.is_cancelled() {
            break;
        }
        let reason = match result {
            Ok(end) => format!("session ended: {end}"),
            Err(Failure::Gone) => {
                info!("relay instance no longer exists; its session loop ends");
                break;
            }
            Err(Failure::Other(e)) => e,
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

async fn dial(dialer: &Dialer, route: &Route) -> Result<Session, Failure> {
    match route {
        Route::Target(t) => dialer.dial(t).await.map_err(Failure::Other),
        Route::Pinned {
            url,
            app_guid,
            index,
        } => dialer
            .websocket_pinned(url, app_guid, *index)
            .await
            .map_err(|p| match p {
                Pinned::Gone => Failure::Gone,
                Pinned::Failed(e) => Failure::Other(e),
            }),
    }
}

/// How often a Cloud Foundry relay app is probed for instances added by scaling.
pub const REPROBE: Duration = Duration::from_secs(30);
/// The most instances probed.
const MAX_INSTANCES: u32 = 256;

/// Holds one session with **every** instance of a relay running as a Cloud Foundry app, so that
/// any instance can serve any client. The first session (routed at random) learns the app GUID
/// from the welcome; then instance `0, 1, ...` are dialled with `X-Cf-App-Instance: GUID:INDEX`
/// until the router answers 400 (no such instance), and again every [`REPROBE`].
async fn cf_supervisor(
    config: Arc<Config>,
    front: Arc<FrontEnd>,
    dialer: Dialer,
    target: RelayTarget,
    status: Arc<watch::Sender<Status>>,
    shutdown: CancellationToken,
) {
    let Some(url) = target.websocket.clone() else {
        return;
    };
    let mut attempt = 0;
    let app_guid = loop {
        let found = async {
            let session = dialer.websocket(&url, &[]).await?;
            let (_, welcome) = handshake(&config, &session, false).await?;
            session.close("instance discovery done");
            match welcome {
                Control::Welcome { app_guid, .. } => Ok(app_guid),
                _ => Ok(None),
            }
        }
        .await;
        match found {
            Ok(Some(guid)) => break guid,
            Ok(None) => {
                info!("relay does not run on Cloud Foundry: holding a single session");
                relay_loop(
                    config,
                    front,
                    dialer,
                    Route::Target(target),
                    None,
                    status,
                    shutdown,
                )
                .await;
                return;
            }
            Err(e) => {
                let delay = backoff(attempt);
                attempt += 1;
                warn!(reason = %e, retry_in_ms = delay.as_millis() as u64, "relay instance discovery failed");
                status.send_replace(Status::Disconnected(e));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        }
    };
    info!(%app_guid, "relay is a Cloud Foundry app: holding a session with every instance");
    let mut running: std::collections::BTreeMap<u32, tokio::task::JoinHandle<()>> =
        std::collections::BTreeMap::new();
    loop {
        running.retain(|_, h| !h.is_finished());
        for index in 0..MAX_INSTANCES {
            if running.contains_key(&index) {
                continue;
            }
            match dialer.websocket_pinned(&url, &app_guid, index).await {
                Ok(session) => {
                    info!(index, "relay instance found");
                    let route = Route::Pinned {
                        url: url.clone(),
                        app_guid: app_guid.clone(),
                        index,
                    };
                    let span = info_span!("instance", index);
                    running.insert(
                        index,
                        tokio::spawn(
                            relay_loop(
                                config.clone(),
                                front.clone(),
                                dialer.clone(),
                                route,
                                Some(session),
                                status.clone(),
                                shutdown.clone(),
                            )
                            .instrument(span),
                        ),
                    );
                }
                Err(Pinned::Gone) => break,
                Err(Pinned::Failed(e)) => {
                    warn!(index, reason = %e, "relay instance did not answer; probing again later");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(REPROBE) => {}
        }
    }
    for (_, h) in running {
        let _ = h.await;
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

/// A session whose hello and welcome are done.
struct Ready {
    session: Session,
    control: Stream,
    welcome: Control,
}

/// How a served session ended.
enum Outcome {
    /// The session is over.
    Ended(ControlEnd),
    /// A better session (QUIC, found while on WebSocket) took over; the old one drains.
    Moved(Box<Ready>),
}

/// Serves one session until it ends or, with `quic_probe`, until QUIC works again and takes over.
async fn once(
    config: &Arc<Config>,
    front: &Arc<FrontEnd>,
    dialer: &Dialer,
    ready: Ready,
    quic_probe: Option<&RelayUrl>,
    status: &watch::Sender<Status>,
    shutdown: &CancellationToken,
) -> Result<Outcome, String> {
    let Ready {
        session,
        control,
        welcome,
    } = ready;
    let Control::Welcome {
        relay_instance,
        accepted,
        rejected,
        heartbeat_ms,
        version,
        ..
    } = welcome
    else {
        return Err("handshake did not end in a welcome".into());
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

    // Streams are tracked so that a session being replaced can finish them first.
    let tracker = tokio_util::task::TaskTracker::new();
    let e2e = Arc::new(EndToEnd::new(config));
    let streams = {
        let session = session.clone();
        let config = config.clone();
        let front = front.clone();
        let tracker = tracker.clone();
        let e2e = e2e.clone();
        tokio::spawn(async move {
            while let Ok(stream) = session.accept().await {
                tracker.spawn(forward::serve(
                    config.clone(),
                    front.clone(),
                    e2e.clone(),
                    stream,
                ));
            }
        })
    };
    let heartbeat = Duration::from_millis(heartbeat_ms.max(100));
    let stop_heartbeat = shutdown.child_token();
    // The relay sends nothing on the control stream; keep the sender so it stays open.
    let (_outgoing, outgoing_rx) = tokio::sync::mpsc::channel(1);
    let mut keepalive = tokio::spawn(control::keepalive_with(
        control,
        heartbeat,
        stop_heartbeat.clone(),
        outgoing_rx,
        move |msg| match msg {
            Control::Policy { services, crl_pem } => {
                e2e.apply(services, crl_pem);
                Ok(())
            }
            other => Err(other),
        },
    ));
    let probe = async {
        match quic_probe {
            Some(url) if session.kind() == TransportKind::Websocket => {
                probe_quic(config, dialer, url).await
            }
            _ => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        end = &mut keepalive => end.unwrap_or(ControlEnd::Shutdown),
        why = session.closed() => ControlEnd::Broken(why),
        next = probe => {
            info!(transport = %next.session.kind(), "quic works again: new streams move to it; the websocket session drains");
            // The old session keeps its heartbeats until its streams are done, then closes.
            tokio::spawn(async move {
                tracker.close();
                tokio::select! {
                    _ = tracker.wait() => {}
                    _ = session.closed() => {}
                }
                streams.abort();
                stop_heartbeat.cancel();
                let _ = keepalive.await;
                session.close("moved to quic");
            });
            return Ok(Outcome::Moved(Box::new(next)));
        }
    };
    streams.abort();
    stop_heartbeat.cancel();
    session.close(&end.to_string());
    Ok(Outcome::Ended(end))
}

/// Tries QUIC every `quic_reprobe` until a session is up and welcomed (as a take-over).
async fn probe_quic(config: &Config, dialer: &Dialer, url: &RelayUrl) -> Ready {
    loop {
        tokio::time::sleep(config.quic_reprobe).await;
        let Ok(session) = dialer.quic(url).await else {
            debug!("quic still unavailable");
            continue;
        };
        match handshake(config, &session, true).await {
            Ok((control, welcome)) => {
                return Ready {
                    session,
                    control,
                    welcome,
                };
            }
            Err(e) => {
                debug!(error = %e, "quic session refused");
                session.close("handshake failed");
            }
        }
    }
}

async fn handshake(
    config: &Config,
    session: &Session,
    take_over: bool,
) -> Result<(Stream, Control), String> {
    let mut stream = session.open().await.map_err(|e| e.to_string())?;
    let hello = Control::Hello {
        versions: protocol::VERSIONS.to_vec(),
        services: config.services.keys().cloned().collect(),
        software: env!("CARGO_PKG_VERSION").to_owned(),
        take_over,
        features: vec![FEATURE_MYSQL_E2E.to_owned()],
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
