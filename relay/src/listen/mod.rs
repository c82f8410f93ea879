//! The relay's listeners, one module per kind, and what they share: binding, the accept loop,
//! and connection limits.
//!
//! * [`mysql`]: the MySQL-native listener of a service (TLS negotiated in-band, client
//!   certificate, user policy) for stock MySQL and MariaDB clients.
//! * [`tcp`]: the TLS-first listener of a service (sidecars, any TCP protocol).
//! * [`quic`]: the QUIC endpoint, for agents and `connect` clients.
//! * [`tunnel`]: `/v1/tunnel`, the WebSocket endpoint on the HTTP listener, for the same.
//!
//! # Limits
//!
//! Every connection a peer can open costs a task and a file descriptor before anything is known
//! about the peer, so the number of them is bounded twice:
//! * process-wide, `max_connections` in `relay.yaml`: every accepted service connection, QUIC
//!   session and WebSocket tunnel holds one slot;
//! * per service listener: `max_connections + max_handshakes` of its service (the authorised
//!   connections it may carry, and the ones still in their handshake, of which the oldest give
//!   way to newcomers).
//!
//! A connection over either limit is refused at once, in its protocol's terms where it has
//! any: a MySQL ERR packet (1040, "too many connections") on a MySQL-native listener; a closed
//! socket on a TLS-first one; a refused QUIC connection; HTTP 503 for a WebSocket upgrade.

pub(crate) mod mysql;
pub(crate) mod quic;
pub(crate) mod tcp;
pub(crate) mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_common::events::Origin;
use postern_common::net;
use postern_common::protocol::{Code, Refusal};
use postern_common::transport::{ConnectError, TransportError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::Shared;
use crate::config::{Config, Protocol};

/// What a service listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// MySQL with TLS negotiated in-band (the `listen` address of a MySQL service).
    Mysql,
    /// TLS first, then the service's protocol (`tls_listen`, or `listen` of a TCP service).
    Tls,
}

impl ListenerKind {
    /// The name in logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Mysql => "mysql",
            Self::Tls => "tls",
        }
    }

    /// The kind of a service's `listen` address.
    pub(crate) fn of_listen(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Mysql => Self::Mysql,
            Protocol::Tcp => Self::Tls,
        }
    }

    fn origin(self) -> Origin {
        match self {
            Self::Mysql => Origin::MysqlListener,
            Self::Tls => Origin::TlsListener,
        }
    }
}

/// One bound service listener.
pub(crate) struct ServiceListener {
    pub(crate) service: String,
    pub(crate) kind: ListenerKind,
    /// The address in the config (port 0: any).
    pub(crate) configured: SocketAddr,
    pub(crate) socket: TcpListener,
    /// Its own connection limit.
    limit: Arc<Semaphore>,
    /// The limit's size: the service's `max_connections + max_handshakes`.
    size: usize,
}

/// A service listener that runs: what a reload compares with the new config, and how it stops
/// the listener.
pub(crate) struct Running {
    pub(crate) service: String,
    pub(crate) kind: ListenerKind,
    pub(crate) configured: SocketAddr,
    /// The address it is bound to.
    pub(crate) bound: Option<SocketAddr>,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) size: usize,
    /// Stops it: the socket closes; its connections go on.
    pub(crate) stop: CancellationToken,
}

/// A listener a config asks for: service, kind, address and the size of its limit.
pub(crate) struct Wanted {
    pub(crate) service: String,
    pub(crate) kind: ListenerKind,
    pub(crate) addr: SocketAddr,
    pub(crate) size: usize,
}

/// Every service listener `config` asks for.
pub(crate) fn wanted(config: &Config) -> Vec<Wanted> {
    let mut out = Vec::new();
    for svc in config.services.values() {
        let pairs = [
            svc.listen
                .map(|a| (a, ListenerKind::of_listen(svc.protocol))),
            svc.tls_listen.map(|a| (a, ListenerKind::Tls)),
        ];
        for (addr, kind) in pairs.into_iter().flatten() {
            out.push(Wanted {
                service: svc.name.clone(),
                kind,
                addr,
                size: svc.max_connections.saturating_add(svc.max_handshakes),
            });
        }
    }
    out
}

/// A service listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("{service}: bind tcp {addr}: {source}")]
pub struct BindError {
    /// The service (or "http").
    pub service: String,
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// Binds a TCP listener, naming what it is for when that fails.
pub(crate) async fn bind_tcp(service: &str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        service: service.to_owned(),
        addr,
        source,
    })
}

/// Binds every service's listeners.
pub(crate) async fn bind_services(config: &Config) -> Result<Vec<ServiceListener>, BindError> {
    bind(wanted(config)).await
}

/// Binds `wanted`; the first failure drops (closes) the ones bound before it.
pub(crate) async fn bind(wanted: Vec<Wanted>) -> Result<Vec<ServiceListener>, BindError> {
    let mut listeners = Vec::new();
    for w in wanted {
        listeners.push(ServiceListener {
            socket: bind_tcp(&w.service, w.addr).await?,
            service: w.service,
            kind: w.kind,
            configured: w.addr,
            limit: Arc::new(Semaphore::new(w.size)),
            size: w.size,
        });
    }
    Ok(listeners)
}

/// Runs `listener` (until the relay drains, or until a reload stops it) and records it in
/// the relay's table of running listeners.
pub(crate) fn start(shared: &Arc<Shared>, listener: ServiceListener) {
    let stop = CancellationToken::new();
    // Logged here, not in the task: the line is there when `start` returns.
    let addr = listener.socket.local_addr().ok();
    info!(service = %listener.service, kind = listener.kind.as_str(), addr = %addr.map(|a| a.to_string()).unwrap_or_default(), "service listener ready");
    let running = Running {
        service: listener.service.clone(),
        kind: listener.kind,
        configured: listener.configured,
        bound: addr,
        limit: listener.limit.clone(),
        size: listener.size,
        stop: stop.clone(),
    };
    shared
        .listeners
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(running);
    shared.tasks.spawn(serve(shared.clone(), listener, stop));
}

/// The slots one connection holds for its life: process-wide and per listener.
pub(crate) struct Slots {
    _process: OwnedSemaphorePermit,
    _listener: Option<OwnedSemaphorePermit>,
}

/// Takes a process-wide slot (and, with `listener`, one of that listener's), or says which
/// limit is reached.
pub(crate) fn take_slots(
    shared: &Shared,
    listener: Option<(&Arc<Semaphore>, &str)>,
) -> Result<Slots, Refusal> {
    let process = shared
        .connection_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            let config = shared.config();
            Refusal::new(
                Code::TooManyConnections,
                format!(
                    "too many connections to relay {} (limit {})",
                    config.instance, config.max_connections
                ),
            )
        })?;
    let listener = match listener {
        None => None,
        Some((limit, service)) => Some(limit.clone().try_acquire_owned().map_err(|_| {
            Refusal::new(
                Code::TooManyConnections,
                format!("too many connections to service {service:?} on this listener"),
            )
        })?),
    };
    Ok(Slots {
        _process: process,
        _listener: listener,
    })
}

/// Serves one service listener until the relay drains or `stop` fires (a reload removed it):
/// every accepted connection gets its slots, then its own task (MySQL-native or TLS-first),
/// with the TLS in force when it was accepted.
async fn serve(shared: Arc<Shared>, listener: ServiceListener, stop: CancellationToken) {
    let ServiceListener {
        service,
        kind,
        socket,
        limit,
        ..
    } = listener;
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = stop.cancelled() => return,
            a = socket.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(service = %service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        net::tune(&tcp);
        let slots = match take_slots(&shared, Some((&limit, &service))) {
            Ok(s) => s,
            Err(r) => {
                shared
                    .events
                    .refused(kind.origin(), Some(peer), Some(&service), None, &r);
                shared.tasks.spawn(refuse_full(tcp, kind, r));
                continue;
            }
        };
        let span = info_span!(
            "client",
            service = %service,
            peer = %peer,
            listener = kind.as_str(),
            conn_id = tracing::field::Empty,
            agent = tracing::field::Empty,
            client = tracing::field::Empty,
        );
        let acceptors = shared.acceptors();
        let (shared2, service2) = (shared.clone(), service.clone());
        match kind {
            ListenerKind::Mysql => shared.connections.spawn(
                async move {
                    mysql::serve(shared2, service2, tcp, peer, acceptors.mysql).await;
                    drop(slots);
                }
                .instrument(span),
            ),
            ListenerKind::Tls => shared.connections.spawn(
                async move {
                    tcp::serve(shared2, service2, tcp, peer, acceptors.tls).await;
                    drop(slots);
                }
                .instrument(span),
            ),
        };
    }
}

/// The refusal for a peer whose session could not be accepted: what went wrong with it, in
/// words for an inbound connection (not a dial).
pub(crate) fn inbound_refusal(e: &TransportError) -> Refusal {
    let why = match e {
        TransportError::Connect {
            source: ConnectError::Tls(f),
            ..
        } => format!("tls handshake failed: {f}"),
        TransportError::Connect {
            source: ConnectError::TlsIo(e),
            ..
        } => format!("tls handshake failed: {e}"),
        TransportError::Connect { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    Refusal::new(Code::NotAuthorized, why)
}

/// The refusal for a peer that did not finish `step` in time.
pub(crate) fn timed_out(step: &str) -> Refusal {
    Refusal::new(Code::BadRequest, format!("timed out waiting for {step}"))
}

/// Tells a connection over a limit why, where its protocol lets us: MySQL clients read an ERR
/// packet before the greeting, as a MySQL server at its limit sends it.
async fn refuse_full(mut tcp: TcpStream, kind: ListenerKind, r: Refusal) {
    if kind == ListenerKind::Mysql {
        let write = async {
            let _ = tcp
                .write_all(&postern_common::mysql::refusal(r.code, &r.message))
                .await;
            let _ = tcp.shutdown().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    }
}
