//! The reconnect loops: one per relay in the config (or, for a relay that is a Cloud Foundry
//! app, one per instance, see [`crate::cf`]), each holding a session with its relay forever.
//!
//! A loop dials, serves the session until it ends, and dials again: after a failure with
//! [`Backoff`], after a relay's drain at once (make before break: the old session is still
//! finishing its streams), after a take-over straight into the QUIC session it already has.

use std::sync::Arc;

use postern_common::transport::Session;
use postern_common::transport::addr::RelayUrl;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::backoff::Backoff;
use crate::config::{RelayTarget, TransportChoice};
use crate::dial::{DialError, Pinned};
use crate::session::{self, Outcome, Ready, SessionError};
use crate::state::{AgentState, Status};

/// Runs one session loop per relay until `shutdown`, and until every session has finished.
/// After a reload, relays added to the config get a loop, and the loops of relays removed from
/// it stop (their sessions drain, as at shutdown).
pub(crate) async fn run(state: Arc<AgentState>, shutdown: CancellationToken) {
    let mut loops = tokio::task::JoinSet::new();
    let mut running: Vec<(RelayTarget, CancellationToken)> = Vec::new();
    let mut reloaded = state.reloaded.subscribe();
    loop {
        let relays = state.config().relays.clone();
        running.retain(|(target, stop)| {
            let keep = relays.contains(target);
            if !keep {
                info!(relay = %target, "relay removed from the config: its session drains");
                stop.cancel();
            }
            keep
        });
        for target in relays {
            if running.iter().any(|(t, _)| *t == target) {
                continue;
            }
            let stop = shutdown.child_token();
            running.push((target.clone(), stop.clone()));
            let span = info_span!("relay", relay = %target);
            let state = state.clone();
            loops.spawn(
                async move {
                    if state.dialer().pins_instances(&target) {
                        crate::cf::supervise(state, target, stop).await;
                    } else {
                        relay_loop(state, Route::Target(target), None, stop).await;
                    }
                }
                .instrument(span),
            );
        }
        tokio::select! {
            r = reloaded.changed() => if r.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
    }
    while loops.join_next().await.is_some() {}
    state
        .status
        .send_replace(Status::Disconnected("shut down".into()));
}

/// How a session loop reaches its relay.
#[derive(Debug, Clone)]
pub(crate) enum Route {
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
    Session(SessionError),
}

/// Holds a session with one relay (or relay instance), reconnecting with backoff. Ends at
/// shutdown, or when a pinned instance is gone. `first`: a session already dialled.
pub(crate) async fn relay_loop(
    state: Arc<AgentState>,
    route: Route,
    mut first: Option<Session>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut moved: Option<Ready> = None;
    // Set after a relay's drain: the next session takes over from the one still finishing.
    let mut take_over = false;
    let quic_probe = match &route {
        Route::Target(RelayTarget {
            quic: Some(q),
            websocket: Some(_),
        }) if state.config().transport == TransportChoice::Auto => Some(q.clone()),
        _ => None,
    };
    loop {
        let started = Instant::now();
        let ready = match moved.take() {
            Some(r) => Ok(r),
            None => start(&state, &route, first.take(), take_over).await,
        };
        take_over = false;
        let outcome = match ready {
            Ok(r) => session::serve(&state, r, quic_probe.as_ref(), &shutdown).await,
            Err(Failure::Gone) => {
                info!("relay instance no longer exists; its session loop ends");
                break;
            }
            Err(Failure::Session(e)) => {
                if shutdown.is_cancelled() {
                    break;
                }
                wait(&state, &mut backoff, started, e.to_string(), &shutdown).await;
                continue;
            }
        };
        match outcome {
            Outcome::Moved(next) => {
                moved = Some(*next);
                backoff.reset();
            }
            Outcome::Drained => {
                take_over = true;
                backoff.reset();
            }
            Outcome::Ended(_) if shutdown.is_cancelled() => break,
            Outcome::Ended(end) => {
                let reason = format!("session ended: {end}");
                wait(&state, &mut backoff, started, reason, &shutdown).await;
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
}

/// Dials `route` (unless `first` is a session already dialled) and says hello.
async fn start(
    state: &AgentState,
    route: &Route,
    first: Option<Session>,
    take_over: bool,
) -> Result<Ready, Failure> {
    let session = match first {
        Some(s) => s,
        None => dial(state, route).await?,
    };
    match session::handshake(state, &session, take_over).await {
        Ok(r) => Ok(r),
        Err(e) => {
            session.close("handshake failed");
            Err(Failure::Session(e))
        }
    }
}

async fn dial(state: &AgentState, route: &Route) -> Result<Session, Failure> {
    let dialled = match route {
        Route::Target(t) => state.dialer().dial(t).await,
        Route::Pinned {
            url,
            app_guid,
            index,
        } => match state.dialer().websocket_pinned(url, app_guid, *index).await {
            Ok(s) => Ok(s),
            Err(Pinned::Gone) => return Err(Failure::Gone),
            Err(Pinned::Failed(e)) => Err(e),
        },
    };
    dialled.map_err(|e: DialError| Failure::Session(e.into()))
}

/// Reports `reason` and waits for the next attempt (or shutdown).
async fn wait(
    state: &AgentState,
    backoff: &mut Backoff,
    started: Instant,
    reason: String,
    shutdown: &CancellationToken,
) {
    let delay = backoff.after(started);
    warn!(%reason, retry_in_ms = delay.as_millis() as u64, "relay session down; reconnecting");
    state.status.send_replace(Status::Disconnected(reason));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}
