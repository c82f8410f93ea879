//! Holding a session with **every** instance of a relay that runs as a Cloud Foundry app, so
//! that any instance can serve any client.
//!
//! The first session (routed to a random instance) learns the app GUID from the welcome; then
//! instances `0, 1, ...` are dialled with `X-Cf-App-Instance: GUID:INDEX` until the router
//! answers 400 (no such instance), and again every [`REPROBE`] to find instances added by
//! scaling. Each instance gets its own reconnect loop, which ends when the router says the
//! instance is gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::backoff::Backoff;
use crate::config::RelayTarget;
use crate::dial::Pinned;
use crate::session::{self, SessionError};
use crate::state::{AgentState, Status};
use crate::supervisor::{Route, relay_loop};

/// How often a Cloud Foundry relay app is probed for instances added by scaling.
pub(crate) const REPROBE: Duration = Duration::from_secs(30);
/// The most instances probed.
const MAX_INSTANCES: u32 = 256;

/// Finds the instances of the relay app behind `target` and holds a session with each.
pub(crate) async fn supervise(
    state: Arc<AgentState>,
    target: RelayTarget,
    shutdown: CancellationToken,
) {
    let Some(url) = target.websocket.clone() else {
        return;
    };
    let mut backoff = Backoff::default();
    let app_guid = loop {
        let started = tokio::time::Instant::now();
        let found = async {
            let session = state.dialer().websocket(&url, &[]).await?;
            let ready = session::handshake(&state, &session, false).await;
            session.close("instance discovery done");
            Ok::<_, SessionError>(ready?.welcome.app_guid)
        }
        .await;
        match found {
            Ok(Some(guid)) => break guid,
            Ok(None) => {
                info!("relay does not run on Cloud Foundry: holding a single session");
                relay_loop(state, Route::Target(target), None, shutdown).await;
                return;
            }
            Err(e) => {
                let delay = backoff.after(started);
                warn!(reason = %e, retry_in_ms = delay.as_millis() as u64, "relay instance discovery failed");
                state
                    .status
                    .send_replace(Status::Disconnected(e.to_string()));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        }
    };
    info!(%app_guid, "relay is a Cloud Foundry app: holding a session with every instance");
    let mut running: BTreeMap<u32, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        running.retain(|_, h| !h.is_finished());
        for index in 0..MAX_INSTANCES {
            if running.contains_key(&index) {
                continue;
            }
            match state
                .dialer()
                .websocket_pinned(&url, &app_guid, index)
                .await
            {
                Ok(session) => {
                    info!(index, "relay instance found");
                    let route = Route::Pinned {
                        url: url.clone(),
                        app_guid: app_guid.clone(),
                        index,
                    };
                    let span = info_span!("instance", index);
                    let task = relay_loop(state.clone(), route, Some(session), shutdown.clone());
                    running.insert(index, tokio::spawn(task.instrument(span)));
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
