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
use tokio_rustls::TlsAcceptor;
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
    pub(crate) socket: TcpListener,
    /// Its own connection limit.
    limit: Arc<Semaphore>,
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
    let mut listeners = Vec::new();
    for svc in config.services.values() {
        let wanted = [
            svc.listen
                .map(|a| (a, ListenerKind::of_listen(svc.protocol))),
            svc.tls_listen.map(|a| (a, ListenerKind::Tls)),
        ];
        for (addr, kind) in wanted.into_iter().flatten() {
            listeners.push(ServiceListener {
                service: svc.name.clone(),
                kind,
                socket: bind_tcp(&svc.name, addr).await?,
                limit: Arc::new(Semaphore::new(
                    svc.max_connections.saturating_add(svc.max_handshakes),
                )),
            });
        }
    }
    Ok(listeners)
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
            Refusal::new(
                Code::TooManyConnections,
                format!(
                    "too many connections to relay {} (limit {})",
                    shared.config.instance, shared.config.max_connections
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

/// Serves one service listener until the relay drains: every accepted connection gets its
/// slots, then its own task (MySQL-native or TLS-first).
pub(crate) async fn serve(shared: Arc<Shared>, listener: ServiceListener, acceptor: TlsAcceptor) {
    let ServiceListener {
        service,
        kind,
        socket,
        limit,
    } = listener;
    info!(service = %service, kind = kind.as_str(), addr = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), "service listener ready");
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
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
        let (shared2, service2, acceptor2) = (shared.clone(), service.clone(), acceptor.clone());
        match kind {
            ListenerKind::Mysql => shared.connections.spawn(
                async move {
                    mysql::serve(shared2, service2, tcp, peer, acceptor2).await;
                    drop(slots);
                }
                .instrument(span),
            ),
            ListenerKind::Tls => shared.connections.spawn(
                async move {
                    tcp::serve(shared2, service2, tcp, peer, acceptor2).await;
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
