//! Reaching a service for one client connection: authorise, find the agent, open a stream to it.
//!
//! Every client front end goes through [`crate::access`] and `open`, so the checks and their
//! refusal messages are the same whichever way a client comes. The TLS-first listeners and
//! `connect` clients know the client before anything else and use `reach` (both steps at
//! once), then [`carry`] the bytes. The MySQL-native listener greets the client itself and
//! authorises it before it opens a stream (see [`crate::listen::mysql`]); it opens streams
//! before a client is known only to fetch the backend's greeting for its template (marked
//! pre-authorisation, no client byte follows) and, in end-to-end mode, for the agent to
//! authorise the client itself.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postern_common::events::{self, Origin};
use postern_common::mysql::server::Conn;
use postern_common::pki::Identity;
use postern_common::protocol::{Answer, Code, Open, StreamMode};
use postern_common::transport::{Stream, TransportKind};
use postern_common::{splice, wire};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use crate::Shared;
use crate::cluster::Registration;
use crate::config::{Service, TlsTermination};

pub(crate) use postern_common::protocol::Refusal;

/// A stream to the agent, connected to the backend and ready for bytes.
pub(crate) struct Reached {
    pub(crate) stream: Tunnel,
    pub(crate) agent: String,
    pub(crate) backend: String,
    pub(crate) conn_id: u64,
    /// The node the agent reached, when the relay knows its name.
    pub(crate) node: Option<String>,
    /// The transport of the agent's session.
    pub(crate) transport: TransportKind,
    /// The client's address, when there is a client.
    pub(crate) client_addr: Option<SocketAddr>,
    /// Held for the life of the connection: counts against the service's limit.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// Authorises `client` for `service` and connects through an agent.
pub(crate) async fn reach(
    shared: &Arc<Shared>,
    service: &str,
    client: &Identity,
    client_addr: SocketAddr,
) -> Result<Reached, Refusal> {
    let config = shared.config();
    let Some(svc) = config.services.get(service) else {
        return Err(Refusal::new(
            Code::UnknownService,
            format!("unknown service {service:?}"),
        ));
    };
    shared.access.authorise(service, client)?;
    if svc.tls_termination == TlsTermination::Agent {
        // These clients' TLS ends here, so the relay would see their queries and passwords.
        return Err(Refusal::new(
            Code::NotAuthorized,
            format!(
                "service {service:?} ends TLS at the agent (tls_termination: agent): connect to \
                 its MySQL listener with TLS and a client certificate"
            ),
        ));
    }
    open(
        shared,
        svc,
        Some(client),
        Some(client_addr),
        StreamMode::Plain,
    )
    .await
}

/// Takes a connection slot of `svc` and opens a stream to an agent that serves it, which
/// connects to the backend.
///
/// `client` is `None` when no client is authorised: the stream is then marked
/// pre-authorisation, and no client byte may go into it (the relay only reads the backend's
/// greeting). In [`StreamMode::MysqlE2e`] the agent authorises the client itself.
/// `client_addr` is `None` for streams the relay opens for itself.
pub(crate) async fn open(
    shared: &Arc<Shared>,
    svc: &Service,
    client: Option<&Identity>,
    client_addr: Option<SocketAddr>,
    mode: StreamMode,
) -> Result<Reached, Refusal> {
    let service = svc.name.as_str();
    // An operator disabled traffic (through any relay, or at the agent): refuse at once with
    // the operator's message, in the agent's words, without a round trip to the agent.
    if let Some(message) = shared.cluster.traffic_disabled(service) {
        let message = if message.is_empty() {
            "traffic is disabled by an operator".to_owned()
        } else {
            message
        };
        return Err(Refusal::new(Code::BackendUnavailable, message));
    }
    let permit = shared
        .limit(service)
        .and_then(|s| s.try_acquire_owned().ok())
        .ok_or_else(|| {
            Refusal::new(
                Code::TooManyConnections,
                format!(
                    "too many connections to service {service:?} (limit {})",
                    svc.max_connections
                ),
            )
        })?;
    // The node of the best decision any agent made; an agent that reports it healthy first.
    let (term, node) = shared.cluster.route(service);
    let route = match &node {
        Some(n) => shared.registry.route_preferring(service, |agent| {
            shared.cluster.healthy_at(service, agent, n)
        }),
        None => shared.registry.route(service),
    };
    let Some(route) = route else {
        return Err(Refusal::new(
            Code::NoAgent,
            format!("service {service:?} is unavailable: no agent is connected for it"),
        ));
    };
    let (agent, session, transport) = (route.agent, route.session, route.transport);
    if mode == StreamMode::MysqlE2e && !route.mysql_e2e {
        return Err(Refusal::new(
            Code::NoAgent,
            format!(
                "service {service:?} is unavailable: agent {agent} cannot end TLS itself \
                 (tls_termination: agent needs a newer agent)"
            ),
        ));
    }
    // A stream with no client at all (the greeting fetch) is not a client connection.
    let conn_id = match (client, mode) {
        (None, StreamMode::Plain) => 0,
        _ => shared.next_conn_id(),
    };
    let no_agent = |e: &dyn std::fmt::Display| {
        Refusal::new(
            Code::NoAgent,
            format!("service {service:?} is unavailable: agent {agent} did not answer ({e})"),
        )
    };
    let mut stream = session.open().await.map_err(|e| no_agent(&e))?;
    let open = Open {
        service: service.to_owned(),
        client: client.map(|c| c.name().to_owned()).unwrap_or_default(),
        client_addr: client_addr.map(|a| a.to_string()).unwrap_or_default(),
        conn_id,
        pre_auth: client.is_none(),
        mode,
        node: node.clone(),
        term,
        admin: None,
    };
    wire::write_first(&mut stream, &open)
        .await
        .map_err(|e| no_agent(&e))?;
    let answer = tokio::time::timeout(
        shared.config().handshake_timeout,
        wire::read_first::<_, Answer>(&mut stream),
    )
    .await
    .map_err(|_| no_agent(&"timed out"))?
    .map_err(|e| no_agent(&e))?;
    match answer {
        Answer::Ok { backend } => {
            // The node is the one at the address the agent connected to, as the agent reports
            // it; else the one the relay asked for.
            let reached = shared
                .cluster
                .node_at(service, &agent, &backend)
                .or_else(|| node.clone());
            debug!(
                conn_id,
                agent,
                backend,
                node = reached.as_deref().unwrap_or(""),
                "stream to agent open"
            );
            // A binding withdrawn while the stream opened is refused now; one withdrawn later
            // cuts the connection.
            let revoked = client.and_then(|c| shared.access.binding_cut(c));
            if revoked
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled)
            {
                stream.abort();
                return Err(Refusal::new(
                    Code::NotAuthorized,
                    format!(
                        "the binding of {} was withdrawn",
                        client.map(|c| c.to_string()).unwrap_or_default()
                    ),
                ));
            }
            // A stream that carries no client (the greeting fetch) is not a connection.
            let registration = (conn_id != 0).then(|| {
                shared
                    .cluster
                    .register(service, reached.clone(), (term, node), transport)
            });
            Ok(Reached {
                stream: Tunnel::new(stream, registration, revoked),
                agent,
                backend,
                conn_id,
                node: reached,
                transport,
                client_addr,
                permit,
            })
        }
        Answer::Refused { code, message } => Err(Refusal::new(code, message)),
    }
}

/// A stream to the agent that fails (as a reset, both ways) when its connection is severed:
/// the node it reached is no longer active, or the client's binding was withdrawn. Its
/// registration keeps the node's connection count.
pub(crate) struct Tunnel {
    stream: Stream,
    /// Resolves when the connection must be cut; `None` when it never is.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Resolves when the client's binding is withdrawn; `None` for clients that are not
    /// bindings.
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    severed: bool,
    _registration: Option<Registration>,
}

impl Tunnel {
    fn new(
        stream: Stream,
        registration: Option<Registration>,
        revoked: Option<CancellationToken>,
    ) -> Self {
        Self {
            stream,
            cut: registration
                .as_ref()
                .map(|r| Box::pin(r.cut.clone().cancelled_owned())),
            revoked: revoked.map(|t| Box::pin(t.cancelled_owned())),
            severed: false,
            _registration: registration,
        }
    }

    /// Resets the stream.
    pub(crate) fn abort(&mut self) {
        self.stream.abort();
    }

    /// Whether the connection was severed; registers the task to wake when it is.
    fn poll_severed(&mut self, cx: &mut Context<'_>) -> bool {
        if self.severed {
            return true;
        }
        let fired = |f: &mut Option<Pin<Box<WaitForCancellationFutureOwned>>>,
                     cx: &mut Context<'_>| {
            f.as_mut().is_some_and(|f| f.as_mut().poll(cx).is_ready())
        };
        if fired(&mut self.cut, cx) || fired(&mut self.revoked, cx) {
            self.severed = true;
            self.cut = None;
            self.revoked = None;
            self.stream.abort();
        }
        self.severed
    }
}

fn severed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "severed: the node is no longer the active one, the service was removed from the relay, or the client's binding was withdrawn",
    )
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

impl Conn for Tunnel {
    fn fail(&mut self) {
        self.stream.abort();
    }
}

/// Carries an authorised client's bytes to the agent and back until both directions end, and
/// tells the events sink that the tunnel opened and how it closed (the audit record). A failure
/// on either side fails both loudly (a reset, never a clean end). `client_tls`: the key exchange
/// group of the client's TLS, where it ended at the relay.
pub(crate) async fn carry<C: Conn>(
    shared: &Shared,
    origin: Origin,
    service: &str,
    identity: &Identity,
    client_tls: Option<&'static str>,
    mut client: C,
    reached: Reached,
) {
    let tunnel = reached.record(origin, service, Some(identity), client_tls);
    let Reached {
        mut stream, permit, ..
    } = reached;
    let tunnel = tunnel.open(&shared.events);
    let (up, down, failure) = match splice::splice(&mut client, &mut stream).await {
        Ok(t) => (t.a_to_b, t.b_to_a, None),
        Err(e) => {
            stream.fail();
            client.fail();
            (
                e.transferred.a_to_b,
                e.transferred.b_to_a,
                Some(e.to_string()),
            )
        }
    };
    drop(permit);
    tunnel.closed(&shared.events, up, down, failure);
}

impl Reached {
    /// What the relay knows of this connection, for its events and audit record.
    pub(crate) fn record(
        &self,
        origin: Origin,
        service: &str,
        identity: Option<&Identity>,
        client_tls: Option<&'static str>,
    ) -> events::Tunnel {
        let mut t = events::Tunnel::new(origin, self.conn_id, service, &self.agent);
        t.identity = identity.map(Identity::uri);
        t.client_addr = self.client_addr;
        t.node = self.node.clone();
        t.transport = Some(self.transport.as_str());
        t.client_tls = client_tls;
        t
    }
}
