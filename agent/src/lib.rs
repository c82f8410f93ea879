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
use postern_common::tls;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
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
    reloads: mpsc::Sender<ReloadRequest>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
}

/// A new config for the running agent, and where its outcome goes.
type ReloadRequest = (Config, oneshot::Sender<Result<Reloaded, ReloadError>>);

/// Hands a running agent a new config ([`Agent::reloader`]).
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<ReloadRequest>);

impl Reloader {
    /// Applies `config` to the running agent (see [`Agent::run`]); an error leaves the config
    /// in force as it was.
    pub async fn reload(&self, config: Config) -> Result<Reloaded, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((config, tx))
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        rx.await.map_err(|_| ReloadError::NotRunning)?
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The agent is not running (any more).
    #[error("the agent is not running")]
    NotRunning,
    /// The new certificates or dial settings cannot be used.
    #[error("cannot dial relays with the new config: {0}")]
    Dial(#[from] dial::DialError),
    /// The new certificate is expired or not valid yet: relays would refuse every new session,
    /// so the one in use stays.
    #[error("the new agent certificate {0}")]
    Certificate(String),
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Services offered now that were not before.
    pub added: Vec<String>,
    /// Services no longer offered (their connections were ended).
    pub removed: Vec<String>,
    /// Services whose nodes, checks or settings changed (new connections use the new ones).
    pub changed: Vec<String>,
    /// Relays added to the config.
    pub relays_added: Vec<String>,
    /// Relays removed from the config (their sessions drain).
    pub relays_removed: Vec<String>,
    /// The agent's certificate, key or CA changed.
    pub certificates: bool,
    /// Each relay session was renewed (the agent's hello changed); the old sessions finish
    /// their streams.
    pub sessions_renewed: bool,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let list = |what: &str, v: &[String]| format!("{what} {}", v.join(", "));
        for (what, v) in [
            ("services added:", &self.added),
            ("services removed:", &self.removed),
            ("services changed:", &self.changed),
            ("relays added:", &self.relays_added),
            ("relays removed:", &self.relays_removed),
        ] {
            if !v.is_empty() {
                parts.push(list(what, v));
            }
        }
        if self.certificates {
            parts.push("certificates renewed".into());
        }
        if self.sessions_renewed {
            parts.push("relay sessions renewed".into());
        }
        if parts.is_empty() {
            f.write_str("nothing changed")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

impl Agent {
    /// Prepares an agent; nothing is dialled until [`run`](Self::run).
    pub fn new(config: Config) -> Self {
        let (status, _) = watch::channel(Status::Disconnected("not started".into()));
        let (reloads, reload_rx) = mpsc::channel(1);
        Self {
            config: Arc::new(config),
            status,
            events: Events::new(),
            reloads,
            reload_rx,
        }
    }

    /// A handle that applies a new config to the agent while it runs (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reloads.clone())
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
    ///
    /// A reload ([`Reloader::reload`]) applies a new config without a restart: services added
    /// are offered to every relay, services removed are withdrawn and their connections end,
    /// services whose backends changed take new connections to the new backends, relays added
    /// or removed get or lose their session. When what the agent says in its hello changes
    /// (services, certificate, how it dials), each relay session opens its successor before it
    /// stops taking new streams, and finishes the ones it carries: connections of unchanged
    /// services are not disturbed.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut reload_rx = self.reload_rx;
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
        let state = Arc::new(AgentState::new(
            config.clone(),
            dialer,
            self.status,
            e2e::FrontEnd::new(&config, self.events),
            Backends::new(&config),
        ));
        // Health checks and decisions run until the last stream is done.
        let checks = CancellationToken::new();
        state.backends.start(&config, &checks);
        let expiry = {
            let state = state.clone();
            tokio::spawn(tls::expiry::watch(
                move || certificates(&state.config()),
                checks.clone(),
            ))
        };
        let reloads = {
            let (state, checks) = (state.clone(), checks.clone());
            tokio::spawn(async move {
                while let Some((config, done)) = reload_rx.recv().await {
                    let outcome = reload(&state, config, &checks).await;
                    match &outcome {
                        Ok(r) => {
                            info!(changes = %r, "configuration reloaded");
                            tls::expiry::warn_ahead(
                                &certificates(&state.config()),
                                std::time::SystemTime::now(),
                            );
                        }
                        Err(e) => {
                            error!(error = %e, "reload refused: the running configuration stays")
                        }
                    }
                    let _ = done.send(outcome);
                }
            })
        };
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
        reloads.abort();
        expiry.abort();
        checks.cancel();
    }
}

/// The certificates the agent presents (to relays, and to clients of services it ends TLS for)
/// and trusts, with their expiry.
fn certificates(config: &Config) -> Vec<tls::expiry::Expiry> {
    let mut certs = tls::expiry::of_material(&config.tls, "agent");
    for svc in config.services.values() {
        if let Some(m) = &svc.tls {
            certs.extend(
                m.chain
                    .first()
                    .and_then(|c| tls::expiry::Expiry::of("service", c)),
            );
        }
    }
    certs
}

/// Applies `new` to the running agent (see [`Agent::run`]).
async fn reload(
    state: &AgentState,
    new: Config,
    checks: &CancellationToken,
) -> Result<Reloaded, ReloadError> {
    let old = state.config();
    let certificates = !old.tls.same_as(&new.tls);
    let dial_changed = certificates
        || old.server_name != new.server_name
        || old.transport != new.transport
        || old.websocket != new.websocket;
    // Everything that can fail comes first: a refused reload changes nothing.
    if certificates {
        check_dates(&new.tls)?;
    }
    let dialer = if dial_changed {
        Some(
            Dialer::load(
                new.tls.clone(),
                new.server_name.clone(),
                new.transport,
                new.websocket.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let names = |c: &Config| c.services.keys().cloned().collect::<Vec<_>>();
    let mut r = Reloaded {
        added: names(&new)
            .into_iter()
            .filter(|s| !old.services.contains_key(s))
            .collect(),
        removed: names(&old)
            .into_iter()
            .filter(|s| !new.services.contains_key(s))
            .collect(),
        relays_added: new
            .relays
            .iter()
            .filter(|t| !old.relays.contains(t))
            .map(|t| t.to_string())
            .collect(),
        relays_removed: old
            .relays
            .iter()
            .filter(|t| !new.relays.contains(t))
            .map(|t| t.to_string())
            .collect(),
        certificates,
        ..Reloaded::default()
    };
    for name in state.backends.reconfigure(&new, checks) {
        state.front.forget(&name);
        if new.services.contains_key(&name) {
            r.changed.push(name);
        }
    }
    r.sessions_renewed = dial_changed
        || !r.added.is_empty()
        || !r.removed.is_empty()
        || session::features(&old) != session::features(&new);
    state.replace(Arc::new(new), dialer);
    if r.sessions_renewed {
        state.rehello.send_modify(|v| *v = v.wrapping_add(1));
    }
    state.reloaded.send_modify(|v| *v = v.wrapping_add(1));
    Ok(r)
}

/// Refuses a certificate that relays would refuse for its dates.
fn check_dates(tls: &tls::Material) -> Result<(), ReloadError> {
    let Some(leaf) = tls.chain.first() else {
        return Err(ReloadError::Certificate("is missing".into()));
    };
    match postern_common::pki::unusable_now(leaf) {
        Some(why) => Err(ReloadError::Certificate(why)),
        None => Ok(()),
    }
}
