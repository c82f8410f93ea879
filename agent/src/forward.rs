//! One data stream from the relay: read its open frame, connect to the backend, pipe bytes.
//!
//! A stream in [`StreamMode::MysqlE2e`] carries a MySQL client's raw connection (the relay only
//! splices it): the agent runs the MySQL front end itself ([`server::serve_tls`]) with the
//! service's certificate and the policy the relay sent, so TLS ends here and the relay never
//! sees queries, results or passwords. The agent greets the client with a copy of the
//! database's greeting (fetched on first need and refreshed after every login) and connects to
//! the database only once the client is authorised, so a client that has not shown a valid
//! certificate costs the database nothing; its deadlines count from the stream's arrival, and
//! at most `max_handshakes` such clients per service wait at once (a newcomer evicts the
//! oldest).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_common::events::{self, Origin};
use postern_common::mysql::Greeting;
use postern_common::mysql::server::Conn;
use postern_common::mysql::server::{self, Deadlines, Dialled, Front, Greeter, Rules};
use postern_common::pki::Identity;
use postern_common::protocol::{Answer, Code, Open, Refusal, StreamMode};
use postern_common::transport::{Stream, TransportKind};
use postern_common::{net, splice, wire};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{Instrument, debug, info_span};

use crate::backends::Backend;
use crate::config::Service;
use crate::e2e::EndToEnd;
use crate::state::AgentState;

/// How long the relay has to send the open frame of a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one stream the relay opened.
pub(crate) async fn serve(state: Arc<AgentState>, e2e: Arc<EndToEnd>, stream: Stream) {
    // Boxed: reading the open frame and reaching the backend (or serving an end-to-end client)
    // need far more state than carrying bytes, which is all an idle connection does; only the
    // carrying part stays for the connection's life.
    let Some(tunnel) = Box::pin(start(&state, &e2e, stream)).await else {
        return;
    };
    let span = tunnel.span.clone();
    tunnel.carry(&state).instrument(span).await;
}

/// A plain stream connected to its backend, ready to carry bytes.
struct Tunnel {
    stream: Stream,
    tcp: tokio::net::TcpStream,
    /// The node, counted as in use while the tunnel lives.
    backend: Backend,
    /// What the events and the audit record say of it; `None` for a stream opened for the
    /// relay itself (to read the greeting), not for a client.
    record: Option<Arc<events::Tunnel>>,
    span: tracing::Span,
}

impl Tunnel {
    /// Copies bytes both ways until both directions end (or the backend is taken out of
    /// service), and tells the events sink how it ended.
    async fn carry(mut self, state: &AgentState) {
        let spliced = tokio::select! {
            r = splice::splice(&mut self.stream, &mut self.tcp) => r.map_err(|e| (e.transferred, e.to_string())),
            // The counts of a splice cut short here are lost with it: the record says so.
            _ = self.backend.severed.cancelled() => Err((
                splice::Transferred::default(),
                "backend taken out of service (bytes moved before it are not counted)".to_owned(),
            )),
        };
        let (up, down, failure) = match spliced {
            Ok(t) => (t.a_to_b, t.b_to_a, None),
            Err((t, why)) => {
                self.stream.abort();
                net::reset_on_close(&self.tcp);
                (t.a_to_b, t.b_to_a, Some(why))
            }
        };
        if let Some(record) = self.record {
            record.closed(&state.front.events, up, down, failure);
        }
    }
}

/// Reads the open frame and reaches the backend: a [`Tunnel`] for a plain stream; `None` when
/// the stream was refused or served whole (end to end).
async fn start(state: &AgentState, e2e: &EndToEnd, mut stream: Stream) -> Option<Tunnel> {
    let arrived = Instant::now();
    let front = &state.front;
    let open =
        match tokio::time::timeout(OPEN_TIMEOUT, wire::read_first::<_, Open>(&mut stream)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                let r = Refusal::new(Code::BadRequest, format!("bad open frame: {e}"));
                front
                    .events
                    .refused(Origin::AgentStream, None, None, None, &r);
                stream.abort();
                return None;
            }
            Err(_) => {
                let r = Refusal::new(Code::BadRequest, "no open frame in time");
                front
                    .events
                    .refused(Origin::AgentStream, None, None, None, &r);
                stream.abort();
                return None;
            }
        };
    // In end-to-end mode the client is known only after TLS; the front end records it.
    let span = info_span!("stream", service = %open.service, client = tracing::field::Empty, pre_auth = open.pre_auth, e2e = open.mode == StreamMode::MysqlE2e, conn_id = open.conn_id);
    if !open.client.is_empty() {
        span.record("client", &open.client);
    }
    let started = forward(state, e2e, stream, open, arrived)
        .instrument(span.clone())
        .await;
    started.map(|mut t| {
        t.span = span;
        t
    })
}

async fn forward(
    state: &AgentState,
    e2e: &EndToEnd,
    mut stream: Stream,
    open: Open,
    arrived: Instant,
) -> Option<Tunnel> {
    let config = state.config();
    let Some(svc) = config.services.get(&open.service) else {
        let r = Refusal::new(
            Code::UnknownService,
            format!(
                "agent {} does not offer service {:?}",
                config.name, open.service
            ),
        );
        refuse(state, &mut stream, &open, r).await;
        return None;
    };
    if let Some(admin) = &open.admin {
        crate::users::serve(state, svc, stream, &open, admin).await;
        return None;
    }
    match open.mode {
        StreamMode::Plain => plain(state, svc, stream, &open).await,
        StreamMode::MysqlE2e => {
            end_to_end(state, e2e, svc, stream, &open, arrived).await;
            None
        }
    }
}

/// The client's bytes as the backend takes them: connect and answer; the caller carries them.
async fn plain(
    state: &AgentState,
    svc: &Service,
    mut stream: Stream,
    open: &Open,
) -> Option<Tunnel> {
    let (backend, tcp) = match state.backends.connect(&svc.name, relay_choice(open)).await {
        Ok(b) => b,
        Err(r) => {
            refuse(state, &mut stream, open, r).await;
            return None;
        }
    };
    let ok = Answer::Ok {
        backend: backend.addr().to_owned(),
    };
    if let Err(e) = wire::write_first(&mut stream, &ok).await {
        debug!(error = %e, "relay went away before the stream started");
        return None;
    }
    // A stream without a client is the relay reading the greeting for its template.
    let record = (!open.pre_auth).then(|| {
        let mut t = tunnel_record(open, svc, &backend, stream.kind());
        t.identity = (!open.client.is_empty()).then(|| Identity::Client(open.client.clone()).uri());
        t.open(&state.front.events)
    });
    Some(Tunnel {
        stream,
        tcp,
        backend,
        record,
        span: tracing::Span::none(),
    })
}

/// What the agent knows of a client connection, for its events and audit record.
fn tunnel_record(
    open: &Open,
    svc: &Service,
    backend: &Backend,
    transport: TransportKind,
) -> events::Tunnel {
    let mut t = events::Tunnel::new(Origin::AgentStream, open.conn_id, &svc.name, backend.addr());
    t.client_addr = open.client_addr.parse().ok();
    t.node = Some(backend.node().to_owned());
    t.transport = Some(transport.as_str());
    t
}

/// TLS ends here: the MySQL front end, with the database reached once the client is
/// authorised.
async fn end_to_end(
    state: &AgentState,
    e2e: &EndToEnd,
    svc: &Service,
    mut stream: Stream,
    open: &Open,
    arrived: Instant,
) {
    let front = &state.front;
    let (policy, acceptor) = match e2e.for_service(&state.config().name, &svc.name).await {
        Ok(p) => p,
        Err(r) => return refuse(state, &mut stream, open, r).await,
    };
    // Both come from the relay: bounded, so no deadline arithmetic can overflow.
    let handshake = policy.handshake_timeout();
    let first_packet = match policy.first_packet_timeout_ms {
        0 => handshake,
        ms => Duration::from_millis(ms).min(handshake),
    };
    let deadlines = Deadlines::from_accept(arrived, first_packet, handshake);
    let template = front
        .greetings
        .get_or_fetch(&svc.name, || fetch_greeting(state, svc, open));
    let template = match tokio::time::timeout_at(deadlines.handshake, template).await {
        Ok(Ok(t)) => t,
        Ok(Err(r)) => return refuse(state, &mut stream, open, r).await,
        Err(_) => {
            let r = cannot_connect(svc, &"no greeting in time");
            return refuse(state, &mut stream, open, r).await;
        }
    };
    let gate = front.gate(&svc.name);
    let (admission, _) = gate.admit(policy.max_handshakes);
    let ok = Answer::Ok {
        backend: svc.backend.clone(),
    };
    if let Err(e) = wire::write_first(&mut stream, &ok).await {
        debug!(error = %e, "relay went away before the stream started");
        return;
    }
    let peer: Option<SocketAddr> = open.client_addr.parse().ok();
    let front_end = Front {
        rules: Rules {
            service: &policy.name,
            clients: &policy.clients,
            allowed_users: &policy.allowed_users,
            bindings: &policy.bindings,
            client_attribute: policy.client_attribute,
            handshake_timeout: handshake,
        },
        events: &front.events,
        origin: Origin::AgentStream,
        peer,
    };
    let greeter = Greeter {
        acceptor: &acceptor,
        greetings: &front.greetings,
        ids: &front.ids,
        template,
        deadlines,
    };
    let transport = stream.kind();
    let dial = |client: Identity| async move {
        let revoked = e2e.binding_cut(&client);
        if revoked
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
        {
            return Err(Refusal::new(
                Code::NotAuthorized,
                format!("the binding of {client} was withdrawn"),
            ));
        }
        let (backend, tcp) = state
            .backends
            .connect(&svc.name, relay_choice(open))
            .await?;
        debug!(client_addr = %open.client_addr, backend = %backend.addr(), node = %backend.node(), "client authorised; connected to backend");
        Ok(Dialled {
            record: tunnel_record(open, svc, &backend, transport),
            node: backend.addr().to_owned(),
            io: NodeConn::new(tcp, backend, revoked),
            slot: None,
        })
    };
    server::serve_tls(&front_end, greeter, admission, stream, dial).await;
}

/// Reads the database's greeting for the service's template, on a connection that is closed
/// right after it.
async fn fetch_greeting(
    state: &AgentState,
    svc: &Service,
    open: &Open,
) -> Result<Greeting, Refusal> {
    let (_, mut tcp) = state
        .backends
        .connect(&svc.name, relay_choice(open))
        .await?;
    let greeting = server::read_greeting(&mut tcp, svc.connect_timeout).await;
    let _ = tcp.shutdown().await;
    greeting.map_err(|e| e.refusal(&svc.name))
}

/// The relay's choice of node for this stream (the active node of the highest term it knows).
pub(crate) fn relay_choice(open: &Open) -> Option<(&str, u64)> {
    open.node.as_deref().map(|n| (n, open.term))
}

/// A connection to a node for the MySQL front end (end-to-end TLS): counts against its node
/// while it lives, and fails as soon as the node's connections are severed or the client's
/// binding is withdrawn.
struct NodeConn {
    tcp: tokio::net::TcpStream,
    severed: Pin<Box<WaitForCancellationFutureOwned>>,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    _backend: Backend,
}

impl NodeConn {
    fn new(
        tcp: tokio::net::TcpStream,
        backend: Backend,
        revoked: Option<CancellationToken>,
    ) -> Self {
        Self {
            tcp,
            severed: Box::pin(backend.severed.clone().cancelled_owned()),
            revoked: revoked.map(|t| Box::pin(t.cancelled_owned())),
            _backend: backend,
        }
    }

    /// An error once the node's connections are severed or the binding withdrawn.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.severed.as_mut().poll(cx).is_ready() {
            return Err(std::io::Error::other("backend taken out of service"));
        }
        if self
            .revoked
            .as_mut()
            .is_some_and(|r| r.as_mut().poll(cx).is_ready())
        {
            net::reset_on_close(&self.tcp);
            return Err(std::io::Error::other("the client's binding was withdrawn"));
        }
        Ok(())
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Conn for NodeConn {
    fn fail(&mut self) {
        net::reset_on_close(&self.tcp);
    }
}

fn cannot_connect(svc: &Service, e: &dyn std::fmt::Display) -> Refusal {
    Refusal::new(
        Code::BackendUnavailable,
        format!(
            "service {:?} is unavailable: cannot connect to backend {}: {e}",
            svc.name, svc.backend
        ),
    )
}

/// Answers the relay with a refusal (which it turns into the client's ERR), and records it.
pub(crate) async fn refuse(state: &AgentState, stream: &mut Stream, open: &Open, r: Refusal) {
    let identity = (!open.client.is_empty()).then(|| Identity::Client(open.client.clone()).uri());
    state.front.events.refused(
        Origin::AgentStream,
        open.client_addr.parse().ok(),
        Some(&open.service),
        identity.as_deref(),
        &r,
    );
    let answer = Answer::Refused {
        code: r.code,
        message: r.message,
    };
    let _ = wire::write_first(stream, &answer).await;
    let _ = stream.shutdown().await;
}
