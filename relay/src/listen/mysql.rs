//! The relay's MySQL-native listener: stock MySQL and MariaDB clients and drivers connect
//! straight to the relay with TLS and a client certificate, as to a MySQL server that requires
//! X.509.
//!
//! For each connection on a service's `listen` address, by the service's `tls_termination`:
//!
//! * `relay`: the relay runs the MySQL front end itself
//!   ([`postern_common::mysql::server::serve_tls`]): it greets the client with a copy of the
//!   backend's greeting (the service's template, fetched through an agent when one registers
//!   and refreshed after every login), runs TLS, the certificate check and the service's
//!   checks with no backend connection, and only then takes a connection slot and opens a
//!   stream to an agent, which connects to the database; the client then gets the database's
//!   real scramble in an AuthSwitchRequest. A service without an agent is refused at once.
//! * `agent` (end to end): the stream is opened in [`StreamMode::MysqlE2e`] right away, the
//!   agent runs the same front end with its service certificate and the policy this relay sent
//!   it ([`crate::agents`]), and the relay only splices bytes: it never parses, decrypts or
//!   keeps anything the client sends. The agent greets the client itself too, so the stream
//!   costs the database nothing until the agent has authorised the client; the deadlines and
//!   the handshake cap are applied there.
//!
//! # Why no backend connection before authorisation
//!
//! A client that has not shown a valid certificate must cost the relay little and the database
//! nothing, and must never lock an authorised client out. So nothing of the backend is opened
//! for it: no stream, no database connection, no connection slot (`max_connections`). What it
//! holds is a task, a socket and, once it starts TLS, TLS state; and its place in the service's
//! handshake gate (`max_handshakes`), where a newcomer evicts the oldest connection still in its
//! handshake instead of being refused. Deadlines count from accept: the first packet (the
//! SSLRequest) must arrive within `first_packet_timeout`, and the client must be authorised
//! within `handshake_timeout`. A silent socket is gone after a few seconds, a flood of them
//! evicts itself, and a real client (whose handshake takes milliseconds) gets through.
//!
//! Greeting first used to need the backend's greeting (its scramble, which the client's
//! password answer is computed over), and so a backend connection per unauthenticated client.
//! The copy needs none: the client's first answer, to the relay's own scramble, is discarded,
//! and the AuthSwitchRequest asks it to answer the backend's real scramble once it is
//! authorised. The cost is one round trip per login, and connection ids in greetings that are
//! the relay's, not the database's: `KILL` commands that name them are rewritten (see
//! [`postern_common::mysql::server`] for how, and for the limits).
//!
//! # Clients that arrive already authenticated
//!
//! `connect` streams and the TLS-first listener carry the client's MySQL in plaintext inside the
//! tunnel, and open their stream after the client is authorised. When the service has a user
//! policy or `client_attribute` (`needs_inspection`), `serve_inspected` applies the same
//! policy to them without TLS inside.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_common::events::Origin;
use postern_common::mysql::Greeting;
use postern_common::mysql::server::{self, Conn, Deadlines, Dialled, Front, Greeter};
use postern_common::pki::Identity;
use postern_common::protocol::{Code, StreamMode};
use postern_common::splice;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span};

use crate::Shared;
use crate::access::Access;
use crate::config::{Protocol, Service, TlsTermination};
use crate::forward::{self, Reached, Refusal};

/// Serves one connection accepted on a service's MySQL-native listener.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    service: String,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
) {
    let accepted = Instant::now();
    let config = shared.config();
    let (Some(svc), Some(access)) = (
        config.services.get(&service),
        shared.access.service(&service),
    ) else {
        return;
    };
    let front = Front {
        rules: Access::rules(svc, &access, shared.config().handshake_timeout),
        events: &shared.events,
        origin: Origin::MysqlListener,
        peer: Some(peer),
    };
    match svc.tls_termination {
        TlsTermination::Relay => terminate(&shared, svc, &front, tcp, &acceptor, accepted).await,
        TlsTermination::Agent => end_to_end(&shared, svc, &front, tcp, accepted).await,
    }
}

/// TLS ends here: the MySQL front end, with the backend reached once the client is authorised.
async fn terminate(
    shared: &Arc<Shared>,
    svc: &Service,
    front: &Front<'_>,
    mut tcp: TcpStream,
    acceptor: &TlsAcceptor,
    accepted: Instant,
) {
    let config = shared.config();
    let deadlines = Deadlines::from_accept(
        accepted,
        config.first_packet_timeout,
        config.handshake_timeout,
    );
    // With no agent there is nobody to serve the client: say so before any handshake.
    if shared.registry.route(&svc.name).is_none() {
        let r = Refusal::new(
            Code::NoAgent,
            format!(
                "service {:?} is unavailable: no agent is connected for it",
                svc.name
            ),
        );
        front.refused(None, &r);
        return server::refuse(&mut tcp, 0, &r).await;
    }
    let template = shared
        .greetings
        .get_or_fetch(&svc.name, || fetch_greeting(shared, svc));
    let template = match tokio::time::timeout_at(deadlines.handshake, template).await {
        Ok(Ok(t)) => t,
        Ok(Err(r)) => {
            front.refused(None, &r);
            return server::refuse(&mut tcp, 0, &r).await;
        }
        Err(_) => {
            let r = Refusal::new(
                Code::NoAgent,
                format!(
                    "service {:?} is unavailable: the agent did not answer in time",
                    svc.name
                ),
            );
            front.refused(None, &r);
            return server::refuse(&mut tcp, 0, &r).await;
        }
    };
    let Some(gate) = shared.gate(&svc.name) else {
        return;
    };
    let (admission, _) = gate.admit(svc.max_handshakes);
    let greeter = Greeter {
        acceptor,
        greetings: &shared.greetings,
        ids: &shared.ids,
        template,
        deadlines,
    };
    let peer = front.peer;
    let dial = |identity: Identity| async move {
        let reached = forward::open(shared, svc, Some(&identity), peer, StreamMode::Plain).await?;
        let record = reached.record(front.origin, &svc.name, None, None);
        let Reached {
            stream,
            agent,
            backend,
            permit,
            ..
        } = reached;
        tracing::Span::current().record("agent", &agent);
        Ok(Dialled {
            io: stream,
            record,
            // Connection ids are per database server: the agent's name tells apart servers
            // that agents on different hosts both call by the same address.
            node: format!("{agent}/{backend}"),
            slot: Some(permit),
        })
    };
    // Boxed: the front end's state is large, and connections wait in it.
    Box::pin(server::serve_tls(front, greeter, admission, tcp, dial)).await;
}

/// Reads the backend's greeting through an agent, for the service's template: a stream
/// marked pre-authorisation, which carries no client byte and is dropped after the greeting.
async fn fetch_greeting(shared: &Arc<Shared>, svc: &Service) -> Result<Greeting, Refusal> {
    let mut reached = forward::open(shared, svc, None, None, StreamMode::Plain).await?;
    let greeting =
        server::read_greeting(&mut reached.stream, shared.config().handshake_timeout).await;
    // The stream has served its purpose: the agent closes the database connection.
    reached.stream.abort();
    greeting.map_err(|e| e.refusal(&svc.name))
}

/// Fetches the greeting templates of `services` (those of them that are MySQL services whose
/// TLS ends at the relay), as an agent that serves them has just registered: a new agent may
/// front another database server.
pub(crate) fn prefetch_greetings(shared: &Arc<Shared>, services: &[String]) {
    let config = shared.config();
    for name in services {
        let Some(svc) = config.services.get(name) else {
            continue;
        };
        if svc.protocol != Protocol::Mysql
            || svc.tls_termination != TlsTermination::Relay
            || svc.listen.is_none()
        {
            continue;
        }
        let shared2 = shared.clone();
        let name = name.clone();
        let fetch = async move {
            let config = shared2.config();
            let Some(svc) = config.services.get(&name) else {
                return;
            };
            let refreshed = shared2
                .greetings
                .refresh(&name, || fetch_greeting(&shared2, svc))
                .await;
            if let Err(r) = refreshed {
                debug!(reason = %r.message, "greeting template not fetched; clients will fetch it");
            }
        };
        let span = info_span!("greeting", service = %svc.name);
        shared.tasks.spawn(fetch.instrument(span));
    }
}

/// End to end: the agent greets, ends TLS and authorises; the relay carries bytes.
async fn end_to_end(
    shared: &Arc<Shared>,
    svc: &Service,
    front: &Front<'_>,
    mut tcp: TcpStream,
    accepted: Instant,
) {
    let deadline = Deadlines::from_accept(
        accepted,
        shared.config().first_packet_timeout,
        shared.config().handshake_timeout,
    )
    .handshake;
    let opened = forward::open(shared, svc, None, front.peer, StreamMode::MysqlE2e);
    let reached = match tokio::time::timeout_at(deadline, opened).await {
        Ok(Ok(r)) => r,
        Ok(Err(r)) => {
            front.refused(None, &r);
            return server::refuse(&mut tcp, 0, &r).await;
        }
        Err(_) => {
            let r = Refusal::new(
                Code::NoAgent,
                format!(
                    "service {:?} is unavailable: the agent did not answer in time",
                    svc.name
                ),
            );
            front.refused(None, &r);
            return server::refuse(&mut tcp, 0, &r).await;
        }
    };
    tracing::Span::current().record("conn_id", reached.conn_id);
    tracing::Span::current().record("agent", &reached.agent);
    // The identity and the client's TLS are known only at the agent, which records its own
    // open and close too.
    let tunnel = reached
        .record(front.origin, &svc.name, None, None)
        .open(front.events);
    let Reached {
        mut stream,
        permit: _permit,
        ..
    } = reached;
    let (up, down, failure) = match splice::splice(&mut tcp, &mut stream).await {
        Ok(t) => (t.a_to_b, t.b_to_a, None),
        Err(e) => {
            stream.fail();
            tcp.fail();
            (
                e.transferred.a_to_b,
                e.transferred.b_to_a,
                Some(e.to_string()),
            )
        }
    };
    tunnel.closed(front.events, up, down, failure);
}

/// Whether MySQL connections of `identity` to `svc` that arrive already authenticated (`connect`
/// streams, the TLS-first listener) must log in through the relay, so the user policy and the
/// client attribute apply to them as well.
pub(crate) fn needs_inspection(shared: &Shared, svc: &Service, identity: &Identity) -> bool {
    svc.protocol == Protocol::Mysql
        && shared.access.service(&svc.name).is_some_and(|access| {
            Access::rules(svc, &access, Default::default()).needs_inspection(identity)
        })
}

/// Serves an authorised client whose MySQL runs in plaintext inside an encrypted tunnel
/// (`connect` or the TLS-first listener), applying the service's MySQL policy.
pub(crate) async fn serve_inspected<C: Conn>(
    shared: &Shared,
    svc: &Service,
    origin: Origin,
    identity: &Identity,
    client_tls: Option<&'static str>,
    client: C,
    reached: Reached,
) {
    let tunnel = reached.record(origin, &svc.name, Some(identity), client_tls);
    let Reached {
        stream,
        client_addr: peer,
        permit: _permit,
        ..
    } = reached;
    let Some(access) = shared.access.service(&svc.name) else {
        return;
    };
    let front = Front {
        rules: Access::rules(svc, &access, shared.config().handshake_timeout),
        events: &shared.events,
        origin,
        peer,
    };
    server::serve_inspected(&front, identity, tunnel, client, stream).await;
}
