//! The Postern relay: accepts agents (which dial out from private networks) and exposes their
//! services to authorised clients with mutual TLS.
//!
//! [`Relay::bind`] opens every socket (so errors such as a port in use surface before anything
//! runs, and tests learn the ephemeral ports), then [`Relay::run`] serves until the shutdown
//! token fires, drains, and returns.
//!
//! * `listen`: one module per listener kind (MySQL-native, TLS-first, QUIC, the WebSocket
//!   tunnel) and the connection limits they share; `http`: the HTTP listener.
//! * `sessions`: authenticated sessions; `agents` serves an agent's (hello, welcome,
//!   heartbeats, drain) and registers it in the [`registry`]; `connect` clients' streams.
//! * [`access`]: who may use which service, and revocations: the one owner of those rules.
//! * `forward`: reaching a service for one client connection, and carrying its bytes.
//! * `cluster`: the agents' reports of each service's nodes, the best decision the relay routes
//!   by, and severing the connections to nodes that are no longer active.
//! * [`broker`]: the Open Service Broker API under `/v2/`: bindings with certificates of their
//!   own, kept in a store every instance shares.
//! * [`users`]: per-binding database users, made by the agents for the service broker.
//! * [`config`]: `relay.yaml`; [`certs`]: the `certs` subcommand.
//! * `reload`: a new `relay.yaml` and certificates put in force while the relay runs
//!   ([`Reloader`], SIGHUP).

pub mod access;
mod agents;
pub mod broker;
pub mod certs;
pub mod cli;
mod cluster;
pub mod config;
mod forward;
mod http;
mod listen;
pub mod registry;
mod reload;
mod sessions;
mod state;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_common::events::Events;
use postern_common::tls;
use postern_common::transport::quic;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
pub use listen::BindError;
use listen::{ListenerKind, ServiceListener};
pub use reload::{ReloadError, Reloaded, Reloader};
use state::Shared;

/// How long shutdown lets open connections finish (Cloud Foundry kills an app 10 s after
/// SIGTERM).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// A relay with its sockets bound, ready to [`run`](Self::run).
pub struct Relay {
    shared: Arc<Shared>,
    listeners: Vec<ServiceListener>,
    http: Option<TcpListener>,
    health: Option<TcpListener>,
}

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The QUIC endpoint could not be created.
    #[error(transparent)]
    Quic(#[from] quic::EndpointError),
    /// TLS material was refused.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The service broker cannot start (its signing CA, its store).
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// The audit log cannot be appended to.
    #[error("audit_log {0}: {1}")]
    Audit(std::path::PathBuf, #[source] std::io::Error),
}

impl Relay {
    /// Binds the QUIC endpoint, the HTTP listener and every service listener.
    pub async fn bind(mut config: Config) -> Result<Self, StartError> {
        let idle = postern_common::control::dead_after(config.heartbeat) + Duration::from_secs(5);
        let quic = match config.quic_listen {
            Some(addr) => Some(quic::server(addr, &config.tls, idle)?),
            None => None,
        };
        let acceptors = state::Acceptors::new(&config.tls)?;
        let listeners = listen::bind_services(&config).await?;
        let http = match config.http_listen {
            Some(addr) => Some(listen::bind_tcp("http", addr).await?),
            None => None,
        };
        let health = match config.health_listen {
            Some(addr) => Some(listen::bind_tcp("health", addr).await?),
            None => None,
        };
        if let Some(b) = &mut config.broker {
            for plan in b.plans.values_mut().filter(|p| p.port == 0) {
                if let Some(addr) = listeners
                    .iter()
                    .find(|l| l.service == plan.service && l.kind == ListenerKind::Mysql)
                    .and_then(|l| l.socket.local_addr().ok())
                {
                    plan.port = addr.port();
                }
            }
        }
        let broker = match &config.broker {
            Some(settings) => Some(Arc::new(broker::Broker::open(settings.clone()).await?)),
            None => None,
        };
        let audit_log = config.audit_log.clone();
        let shared = Arc::new(Shared::new(config, broker, acceptors, quic));
        if let Some(path) = audit_log {
            shared
                .events
                .audit_to(&path, &shared.config().instance)
                .map_err(|e| StartError::Audit(path, e))?;
        }
        if let Some(b) = &shared.broker {
            // Bindings work from the first connection on, not after the first poll.
            b.apply(&shared.access)
                .await
                .map_err(broker::BrokerError::from)?;
        }
        Ok(Self {
            shared,
            listeners,
            http,
            health,
        })
    }

    /// The bound address of the HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address of the health listener (`health_listen`).
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The UDP address agents and `connect` clients dial, when the relay listens for QUIC.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        let endpoint = self.shared.quic.as_ref()?.endpoint();
        endpoint
            .local_addr()
            .ok()
            .or(self.shared.config().quic_listen)
    }

    /// The bound address of a service's `listen` listener (MySQL-native for MySQL services,
    /// TLS-first for TCP services).
    pub fn service_addr(&self, service: &str) -> Option<SocketAddr> {
        let protocol = self.shared.config().services.get(service)?.protocol;
        self.listener_addr(service, ListenerKind::of_listen(protocol))
    }

    /// The bound address of a MySQL service's TLS-first `tls_listen` listener.
    pub fn tls_service_addr(&self, service: &str) -> Option<SocketAddr> {
        let config = self.shared.config();
        let svc = config.services.get(service)?;
        svc.tls_listen?;
        if svc.protocol == config::Protocol::Tcp {
            return None;
        }
        self.listener_addr(service, ListenerKind::Tls)
    }

    fn listener_addr(&self, service: &str, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.service == service && l.kind == kind)
            .and_then(|l| l.socket.local_addr().ok())
    }

    /// What reloads this relay's configuration while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` fires, then drains: stops accepting, tells agents to move, lets
    /// open connections finish for up to [`SHUTDOWN_GRACE`], and closes what is left.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            shared,
            listeners,
            http,
            health,
        } = self;
        let tasks = &shared.tasks;
        tasks.spawn(
            shared
                .access
                .clone()
                .watch_revocations(shared.abort.clone()),
        );
        tasks.spawn(http::metrics::follow(shared.clone()));
        {
            let watched = shared.clone();
            tasks.spawn(tls::expiry::watch(
                move || watched.certificates(),
                shared.abort.clone(),
            ));
        }
        if let Some(b) = &shared.broker {
            tasks.spawn(
                b.clone()
                    .follow(shared.access.clone(), shared.abort.clone()),
            );
        }
        if let Some(listener) = http {
            tasks.spawn(http::serve(shared.clone(), listener));
        }
        if let Some(listener) = health {
            tasks.spawn(http::serve_health(shared.clone(), listener));
        }
        for listener in listeners {
            listen::start(&shared, listener);
        }
        let quic = shared.quic.clone();
        let quic_addr = quic.as_ref().and_then(|q| q.endpoint().local_addr().ok());
        if let Some(server) = quic.clone() {
            tasks.spawn(listen::quic::serve(
                shared.clone(),
                server,
                shutdown.clone(),
            ));
        }
        info!(quic = %quic_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()), instance = %shared.config().instance, "relay listening");
        shutdown.cancelled().await;
        drain(&shared).await;
        if let Some(server) = quic {
            let endpoint = server.endpoint();
            endpoint.close(quinn::VarInt::from_u32(0), b"relay shutting down");
            // Let the close frames go out.
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// A handle that can inspect the relay while it runs.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }
}

/// Stops accepting (listeners close, QUIC refuses, agents are told to move), lets open
/// connections finish within [`SHUTDOWN_GRACE`], then ends every session.
async fn drain(shared: &Shared) {
    info!(
        grace_s = SHUTDOWN_GRACE.as_secs(),
        open = shared.connections.len(),
        "relay draining: no new connections; open ones may finish"
    );
    shared.stop.cancel();
    shared.connections.close();
    tokio::select! {
        _ = shared.connections.wait() => info!("every connection has ended"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            warn!(open = shared.connections.len(), "shutdown grace period over: closing remaining connections");
        }
    }
    shared.abort.cancel();
    shared.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), shared.tasks.wait()).await;
}

/// Inspects a running relay.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// A snapshot of connected agents.
    pub fn agents(&self) -> Vec<registry::AgentInfo> {
        self.shared.registry.agents()
    }

    /// The relay's events sink: refusals, tunnels opened and closed.
    pub fn events(&self) -> Events {
        self.shared.events.clone()
    }

    /// The (term, active node) the relay routes `service` by: the highest term any agent
    /// reported; `(0, None)` before any did.
    pub fn decision(&self, service: &str) -> (u64, Option<String>) {
        self.shared.cluster.route(service)
    }

    /// A receiver that sees a new value whenever an agent's report or a decision changes.
    pub fn cluster_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.cluster.subscribe()
    }

    /// The relay's access rules (the service broker changes them at run time).
    pub fn access(&self) -> Arc<access::Access> {
        self.shared.access.clone()
    }

    /// Asks an agent of `service` to create (or renew, with a new password) the database user
    /// of binding `binding`, with the grants of the agent's `services.SERVICE.users`.
    pub async fn create_binding_user(
        &self,
        service: &str,
        binding: &str,
    ) -> Result<users::BindingUser, postern_common::protocol::Refusal> {
        users::create_user(&self.shared, service, binding).await
    }

    /// Asks an agent of `service` to drop the database user of binding `binding` (a user that
    /// is gone already is no error).
    pub async fn drop_binding_user(
        &self,
        service: &str,
        binding: &str,
    ) -> Result<(), postern_common::protocol::Refusal> {
        users::drop_user(&self.shared, service, binding).await
    }

    /// How many client connections this relay has sent to an agent so far.
    pub fn connections_opened(&self) -> u64 {
        self.shared.connections_opened()
    }

    /// How many connections and sessions hold one of the relay's `max_connections` slots now.
    pub fn open_connections(&self) -> usize {
        self.shared
            .config()
            .max_connections
            .saturating_sub(self.shared.connection_slots.available_permits())
    }
}
