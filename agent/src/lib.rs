//! The Postern agent: runs next to the database, dials out to the relay, and connects the
//! relay's streams to local backends. Also home of `connect`, the client side for laptops.
//!
//! * `supervisor`: one reconnect loop per relay ([`backoff`]); `cf` finds every instance
//!   of a relay that is a Cloud Foundry app.
//! * `session`: one relay session (hello, welcome, heartbeats, drain); `takeover` moves it
//!   from WebSocket back to QUIC.
//! * [`forward`]: one stream from the relay to a backend, chosen by [`backends`]; for services
//!   whose TLS ends here, the MySQL front end with the rules the relay sent (`e2e`).
//! * [`health`]: the nodes' health checks (mysql, http, tcp); [`decide`]: which node is
//!   active, numbered by a term, kept in the state directory or in the cluster itself.
//! * [`dial`]: reaching a relay over QUIC, WebSocket, or both raced.
//! * [`connect`]: a local port leading to a service through the relay ([`exec`] runs a client
//!   against it, [`chooser`] asks which one on a terminal); [`bound`] reads the service, relay
//!   and certificate from a Cloud Foundry binding or service key (the sidecar, `cf tunnel`).
//! * [`notify`]: systemd readiness, watchdog and status.
//! * [`diagnose`]: where a broken setup breaks, step by step.
//! * [`users`]: per-binding database users, created and dropped for the relay's service broker.

pub mod backends;
pub mod backoff;
pub mod bound;
mod cf;
pub mod chooser;
pub mod cli;
pub mod config;
pub mod connect;
pub mod decide;
pub mod diagnose;
pub mod dial;
mod e2e;
pub mod exec;
pub mod forward;
pub mod health;
pub mod notify;
mod session;
mod state;
mod supervisor;
mod takeover;
pub mod users;

use std::sync::Arc;

use postern_common::events::Events;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::Config;
pub use session::SHUTDOWN_GRACE;
pub use state::Status;

use backends::Backends;
use dial::Dialer;
use state::AgentState;

/// A configured agent.
pub struct Agent {
    config: Arc<Config>,
    status: watch::Sender<Status>,
    events: Events,
}

impl Agent {
    /// Prepares an agent; nothing is dialled until [`run`](Self::run).
    pub fn new(config: Config) -> Self {
        let (status, _) = watch::channel(Status::Disconnected("not started".into()));
        Self {
            config: Arc::new(config),
            status,
            events: Events::new(),
        }
    }

    /// Watches the agent's status.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The agent's events sink (refusals, tunnels opened and closed).
    pub fn events(&self) -> Events {
        self.events.clone()
    }

    /// Runs until `shutdown` fires, then drains: every relay is told that this agent is going
    /// (so it routes nothing new here), open connections get up to [`SHUTDOWN_GRACE`] to
    /// finish, and then the sessions close.
    pub async fn run(self, shutdown: CancellationToken) {
        let config = self.config;
        let dialer = Dialer::load(
            config.tls.clone(),
            config.server_name.clone(),
            config.transport,
            config.websocket.clone(),
        )
        .await;
        let dialer = match dialer {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "cannot dial relays");
                self.status
                    .send_replace(Status::Disconnected(e.to_string()));
                return;
            }
        };
        let state = Arc::new(AgentState {
            backends: Backends::new(&config),
            front: e2e::FrontEnd::new(&config, self.events),
            config,
            dialer,
            status: self.status,
            forwards: TaskTracker::new(),
            abort: CancellationToken::new(),
        });
        // Health checks and decisions run until the last stream is done.
        let checks = CancellationToken::new();
        state.backends.start(&state.config, &checks);
        let grace = {
            let (shutdown, abort) = (shutdown.clone(), state.abort.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                info!(
                    grace_s = SHUTDOWN_GRACE.as_secs(),
                    "agent shutting down: open connections may finish"
                );
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                abort.cancel();
            })
        };
        supervisor::run(state.clone(), shutdown).await;
        state.forwards.close();
        tokio::select! {
            _ = state.forwards.wait() => {}
            _ = state.abort.cancelled() => {
                warn!(open = state.forwards.len(), "shutdown grace period over: closing remaining connections");
            }
        }
        grace.abort();
        checks.cancel();
    }
}
