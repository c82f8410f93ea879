//! The Postern relay: accepts agents (which dial out from private networks) and exposes their
//! services to authorised clients with mutual TLS.
//!
//! [`Relay::bind`] opens every socket (so errors such as a port in use surface before anything
//! runs, and tests learn the ephemeral ports), then [`Relay::run`] serves until the shutdown
//! token fires, drains, and returns.
//!
//! * [`agents`]: agent sessions (hello, welcome, heartbeats) and the [`registry`] of them.
//! * [`clients`]: the per-service listeners and `connect` client sessions.
//! * [`listen`]: the MySQL-native listener (TLS negotiated in-band, client certificate, user
//!   policy) for stock MySQL and MariaDB clients.
//! * [`forward`]: authorising one client connection and opening its stream to an agent.
//! * [`certs`]: the `certs` subcommand.

pub mod agents;
mod api;
pub mod certs;
pub mod cli;
pub mod clients;
pub mod config;
pub mod forward;
pub mod listen;
pub mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postern_common::events::Events;
use postern_common::mysql::server::{ConnIds, Gate, Greetings};
use postern_common::net;
use postern_common::pki::Identity;
use postern_common::tls;
use postern_common::transport::quic;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use clients::ListenerKind;
pub use config::Config;
use registry::Registry;

/// How long shutdown lets open connections finish (Cloud Foundry kills an app 10 s after
/// SIGTERM).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// State shared by every task of a relay.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    /// Per-service connection limits.
    pub(crate) limits: HashMap<String, Arc<Semaphore>>,
    /// Per-service gates of MySQL-native connections still in their handshake.
    pub(crate) gates: HashMap<String, Gate>,
    /// The greeting templates of MySQL services whose TLS ends here.
    pub(crate) greetings: Greetings,
    /// The connection ids this relay hands out in its own greetings.
    pub(crate) ids: ConnIds,
    /// Where refusals and opened and closed tunnels go.
    pub(crate) events: Events,
    /// Cancelled when the relay starts to drain: listeners stop accepting, agents are told
    /// (so they open their next session elsewhere first), `connect` clients' new streams are
    /// refused as `shutting_down`. Open connections go on.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the grace period is over, or every connection has ended: sessions close.
    pub(crate) abort: CancellationToken,
    /// Client connections (and `connect` streams): draining waits for these.
    pub(crate) connections: TaskTracker,
    /// Sessions, listeners and housekeeping: they end at `abort`.
    pub(crate) tasks: TaskTracker,
    /// Bumped when the revocation lists are reloaded, so agents get them again.
    pub(crate) revocations_changed: tokio::sync::watch::Sender<u64>,
    next_conn: AtomicU64,
}

impl Shared {
    /// Numbers client connections; the count is also how many this relay has opened.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A relay with its sockets bound, ready to [`run`](Self::run).
pub struct Relay {
    shared: Arc<Shared>,
    /// The QUIC endpoint, when `listen.quic` is set.
    endpoint: Option<quic::Server>,
    listeners: Vec<Listener>,
    http: Option<TcpListener>,
    acceptor: TlsAcceptor,
    mysql_acceptor: TlsAcceptor,
}

/// One bound service listener.
struct Listener {
    service: String,
    kind: ListenerKind,
    socket: TcpListener,
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
    #[error("{service}: bind tcp {addr}: {source}")]
    Bind {
        /// The service (or "http").
        service: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Relay {
    /// Binds the QUIC endpoint and every service listener.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let idle = postern_common::control::dead_after(config.heartbeat) + Duration::from_secs(5);
        let endpoint = match config.quic_listen {
            Some(addr) => Some(quic::server(addr, &config.tls, idle)?),
            None => None,
        };
        let acceptor = TlsAcceptor::from(Arc::new(tls::listener_server(&config.tls)?));
        let mysql_acceptor = TlsAcceptor::from(Arc::new(tls::mysql_listener_server(&config.tls)?));
        let mut listeners = Vec::new();
        for svc in config.services.values() {
            let listen_kind = match svc.protocol {
                config::Protocol::Mysql => ListenerKind::Mysql,
                config::Protocol::Tcp => ListenerKind::Tls,
            };
            let wanted = [
                svc.listen.map(|a| (a, listen_kind)),
                svc.tls_listen.map(|a| (a, ListenerKind::Tls)),
            ];
            for (addr, kind) in wanted.into_iter().flatten() {
                let socket = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind {
                        service: svc.name.clone(),
                        addr,
                        source,
                    })?;
                listeners.push(Listener {
                    service: svc.name.clone(),
                    kind,
                    socket,
                });
            }
        }
        let http = match config.http_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            service: "http".into(),
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let limits = config
            .services
            .values()
            .map(|s| (s.name.clone(), Arc::new(Semaphore::new(s.max_connections))))
            .collect();
        let gates = config
            .services
            .keys()
            .map(|name| (name.clone(), Gate::new()))
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                registry: Registry::default(),
                limits,
                gates,
                greetings: Greetings::new(),
                ids: ConnIds::new(),
                events: Events::new(),
                stop: CancellationToken::new(),
                abort: CancellationToken::new(),
                connections: TaskTracker::new(),
                tasks: TaskTracker::new(),
                revocations_changed: tokio::sync::watch::Sender::new(0),
                next_conn: AtomicU64::new(0),
            }),
            endpoint,
            listeners,
            http,
            acceptor,
            mysql_acceptor,
        })
    }

    /// The bound address of the HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The UDP address agents and `connect` clients dial, when the relay listens for QUIC.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        let endpoint = self.endpoint.as_ref()?.endpoint();
        endpoint
            .local_addr()
            .ok()
            .or(self.shared.config.quic_listen)
    }

    /// The bound address of a service's `listen` listener (MySQL-native for MySQL services,
    /// TLS-first for TCP services).
    pub fn service_addr(&self, service: &str) -> Option<SocketAddr> {
        let kind = match self.shared.config.services.get(service)?.protocol {
            config::Protocol::Mysql => ListenerKind::Mysql,
            config::Protocol::Tcp => ListenerKind::Tls,
        };
        self.listener_addr(service, kind)
    }

    /// The bound address of a MySQL service's TLS-first `tls_listen` listener.
    pub fn tls_service_addr(&self, service: &str) -> Option<SocketAddr> {
        let svc = self.shared.config.services.get(service)?;
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

    /// Serves until `shutdown` fires, then drains: stops accepting, tells agents to move, lets
    /// open connections finish for up to [`SHUTDOWN_GRACE`], and closes what is left.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            shared,
            endpoint,
            listeners,
            http,
            acceptor,
            mysql_acceptor,
        } = self;
        if shared.config.tls.revocations.path().is_some() {
            shared.tasks.spawn(watch_revocations(shared.clone()));
        }
        if let Some(listener) = http {
            info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "http listener ready");
            let router = api::router(shared.clone());
            let stop = shared.stop.clone();
            shared.tasks.spawn(async move {
                // WebSocket sessions carry small frames back and forth: without TCP_NODELAY,
                // Nagle's algorithm and delayed ACKs add tens of milliseconds to stream opens.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| net::tune(tcp));
                let serve = axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    warn!(error = %e, "http listener failed");
                }
            });
        }
        let quic = endpoint
            .as_ref()
            .and_then(|e| e.endpoint().local_addr().ok());
        info!(quic = %quic.map(|a| a.to_string()).unwrap_or_else(|| "off".into()), instance = %shared.config.instance, "relay listening");
        for Listener {
            service,
            kind,
            socket,
        } in listeners
        {
            info!(service = %service, kind = kind.as_str(), addr = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), "service listener ready");
            let acceptor = match kind {
                ListenerKind::Mysql => mysql_acceptor.clone(),
                ListenerKind::Tls => acceptor.clone(),
            };
            shared.tasks.spawn(clients::listen(
                shared.clone(),
                service,
                kind,
                socket,
                acceptor,
            ));
        }
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = async {
                    match &endpoint {
                        Some(e) => e.endpoint().accept().await,
                        // Without QUIC the HTTP listener carries everything; wait for shutdown.
                        None => std::future::pending().await,
                    }
                } => i,
            };
            let Some(incoming) = incoming else { break };
            let Some(server) = endpoint.clone() else {
                break;
            };
            let shared2 = shared.clone();
            shared.tasks.spawn(async move {
                let remote = incoming.remote_address();
                let session = match tokio::time::timeout(
                    shared2.config.handshake_timeout,
                    server.accept(incoming),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(%remote, reason = %e, "refused connection");
                        return;
                    }
                    Err(_) => {
                        warn!(%remote, "refused connection: handshake timed out");
                        return;
                    }
                };
                serve_session(shared2, session).await;
            });
        }
        info!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            open = shared.connections.len(),
            "relay draining: no new connections; open ones may finish"
        );
        shared.stop.cancel();
        // New QUIC connections are refused at once, not left to time out.
        if let Some(endpoint) = &endpoint {
            let (endpoint, abort) = (endpoint.endpoint().clone(), shared.abort.clone());
            shared.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = abort.cancelled() => return,
                        i = endpoint.accept() => match i {
                            Some(incoming) => incoming.refuse(),
                            None => return,
                        },
                    }
                }
            });
        }
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
        if let Some(server) = endpoint {
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

/// How often the revocation list file is checked for changes.
const REVOCATION_POLL: Duration = Duration::from_secs(2);

/// Re-reads `tls.crl` when it changes, so revoking a certificate needs no restart: the next
/// handshake with it is refused.
async fn watch_revocations(shared: Arc<Shared>) {
    let revocations = shared.config.tls.revocations.clone();
    loop {
        tokio::select! {
            _ = shared.abort.cancelled() => return,
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
        }
        match revocations.reload() {
            Ok(true) => {
                info!(path = %revocations.path().map(|p| p.display().to_string()).unwrap_or_default(), "revocation list reloaded");
                shared.revocations_changed.send_modify(|g| *g += 1);
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "revocation list not reloaded; keeping the previous one"),
        }
    }
}

/// Serves an authenticated session, whatever its transport: agents and clients are told apart
/// by the identity in their certificate.
pub(crate) async fn serve_session(
    shared: Arc<Shared>,
    session: postern_common::transport::Session,
) {
    match session.peer().cloned() {
        Some(Identity::Agent(name)) => {
            let span = info_span!("agent", agent = %name);
            agents::serve(shared, session, name).instrument(span).await;
        }
        Some(Identity::Client(name)) => clients::serve_session(shared, session, name).await,
        None => session.close("no identity"),
    }
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

    /// How many client connections this relay has sent to an agent so far.
    pub fn connections_opened(&self) -> u64 {
        self.shared.next_conn.load(Ordering::Relaxed)
    }
}
