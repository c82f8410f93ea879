//! Serving one client connection: [`serve_tls`] for clients that negotiate TLS in-band with a
//! greeting of this side's own, [`serve_inspected`] for clients that arrive authenticated
//! inside an encrypted tunnel. Both end in the same login and command phase ([`Login`]).

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::gate::Admission;
use super::greetings::Greetings;
use super::ids::ConnIds;
use super::io::{Conn, Failure, Leg, Rewind, Side};
use super::login::{Kills, Login, fail};
use super::{CLIENT_ATTRIBUTE, Deadlines, Front, Rules};
use crate::events::Tunnel;
use crate::mysql::{
    self, AuthRelay, ClientFirst, Greeting, Handover, HandshakeResponse, Legs, MysqlError,
    Negotiated, Packet,
};
use crate::pki::Identity;
use crate::protocol::{Code, Refusal};
use crate::tls;

/// How long a refusal may take to write before the connection is dropped anyway.
pub(super) const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend connection the caller's dialler opened for an authorised client.
#[derive(Debug)]
pub struct Dialled<B> {
    /// The connection: it carries the backend's greeting first.
    pub io: B,
    /// What this end knows of the connection, for its events and audit record: the id the
    /// relay and the agent both log, the agent (at the relay) or the backend (at the agent) it
    /// goes through, the node, the transport. The front end adds the client's identity and the
    /// key exchange group of its TLS.
    pub record: Tunnel,
    /// The database server the connection reached: connection ids (and so `KILL`s) are per
    /// server.
    pub node: String,
    /// A connection slot of the service, held for the life of the connection.
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a front end that greets clients itself needs besides the rules.
pub struct Greeter<'a> {
    /// TLS with client certificates required.
    pub acceptor: &'a TlsAcceptor,
    /// The templates, refreshed from the backend's greeting after each login.
    pub greetings: &'a Greetings,
    /// This process's connection ids.
    pub ids: &'a ConnIds,
    /// The service's template.
    pub template: Greeting,
    /// The connection's deadlines, counted from accept.
    pub deadlines: Deadlines,
}

/// Serves a client that negotiates TLS in-band (see the [module doc](super)): greets it with a
/// copy of the service's greeting, takes it through TLS and the service's checks while it
/// holds its place in the handshake gate (`admission`), and only then calls `dial` to reach the
/// backend, hands the client the backend's scramble, and relays the login.
pub async fn serve_tls<C, B, D, F>(
    front: &Front<'_>,
    greeter: Greeter<'_>,
    admission: Admission<'_>,
    client: C,
    dial: D,
) where
    C: Conn,
    B: Conn,
    D: FnOnce(Identity) -> F,
    F: Future<Output = Result<Dialled<B>, Refusal>>,
{
    let issued = greeter.ids.issue();
    let Some(offered) = greet_as(&greeter.template, issued.id()) else {
        let r = unavailable(front, "its greeting cannot be copied".into());
        front.refused(None, &r);
        let mut client = client;
        return refuse(&mut client, 0, &r).await;
    };
    let mut admission = admission;
    let authorised = tokio::select! {
        a = authenticate(front, &greeter, &offered, client) => a,
        () = admission.evicted() => {
            let r = Refusal::new(
                Code::TooManyConnections,
                format!(
                    "dropped during the handshake: too many connections to service {:?} were in \
                     their handshake (max_handshakes), and this one had waited longest",
                    front.rules.service
                ),
            );
            front.refused(None, &r);
            return;
        }
    };
    // Authorised or refused: either way no longer in the gate.
    drop(admission);
    let Some(Authorised {
        mut client,
        identity,
        response,
        response_seq,
    }) = authorised
    else {
        return;
    };
    tracing::Span::current().record("client", tracing::field::display(&identity));
    // Until the switch, the client waits for the answer to its response.
    let seq = response_seq.wrapping_add(1);

    // 5. The backend, now that the client may use it.
    let Dialled {
        io,
        record: mut tunnel,
        node,
        slot: _slot,
    } = match dial(identity.clone()).await {
        Ok(d) => d,
        Err(r) => {
            front.refused(Some(&identity), &r);
            return refuse(&mut client.io, seq, &r).await;
        }
    };
    let conn_id = tunnel.conn_id;
    tracing::Span::current().record("conn_id", conn_id);
    tunnel.client_addr = tunnel.client_addr.or(front.peer);
    tunnel.client_tls = client
        .io
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| tls::kx::group_name(g.name()));
    let mut backend = Leg::new(io, Side::Backend);
    let Some(greeting) = backend_greeting(front, &identity, &mut client, &mut backend, seq).await
    else {
        return;
    };
    greeter
        .greetings
        .store(front.rules.service, greeting.clone());
    let negotiated = Negotiated::between(
        &offered,
        response.capabilities,
        response.mariadb_capabilities(),
    );
    if let Some(missing) = negotiated.missing_in(&greeting) {
        let r = unavailable(
            front,
            format!(
                "the database has changed since this client was greeted (it no longer offers \
                 {missing}, which the client chose): connect again"
            ),
        );
        front.refused(Some(&identity), &r);
        backend.io.fail();
        return refuse(&mut client.io, seq, &r).await;
    }
    issued.bind(&identity.uri(), &node, greeting.connection_id());

    // 6. The backend's scramble for the client, whose answer logs it in to the backend.
    let mut response = response.for_backend(&offered, &greeting);
    tag(&front.rules, &identity, &mut response, &greeting);
    let legs = Legs {
        client_tls: true,
        backend_tls: false,
    };
    let capabilities = response.capabilities;
    debug!(user = %String::from_utf8_lossy(&response.username), "client authorised; logging in to the backend");
    let (handover, switch) = match Handover::start(legs, response_seq, response, &greeting) {
        Ok(h) => h,
        Err(e) => {
            let r = Refusal::new(Code::BadRequest, format!("cannot log in: {e}"));
            front.refused(Some(&identity), &r);
            backend.io.fail();
            return refuse(&mut client.io, seq, &r).await;
        }
    };
    let answer = async {
        client.write(&switch).await?;
        within(
            after(front.rules.handshake_timeout),
            "the client's answer to the database's scramble",
            client.read(),
        )
        .await
    };
    let started = answer.await.and_then(|answer| {
        handover
            .finish(&answer)
            .map_err(|source| Failure::Protocol {
                side: Side::Client,
                source,
            })
    });
    let (relay, to_backend) = match started {
        Ok(s) => s,
        Err(e) => {
            record(front, Some(&identity), &e);
            return fail(client.io, backend.io);
        }
    };
    // 7. The rest of the login, then the command phase.
    let login = Login {
        front,
        identity: &identity,
        record: tunnel,
        capabilities,
        kills: Some(Kills {
            ids: greeter.ids,
            node: &node,
        }),
    };
    login.run(client, backend, relay, to_backend).await;
    drop(issued);
}

/// Serves an authorised client whose MySQL runs in plaintext inside an encrypted tunnel
/// (`connect` or the TLS-first listener), applying the service's MySQL policy: the backend's
/// own greeting goes to the client, and its login passes the user policy and gets the identity
/// attribute.
pub async fn serve_inspected<C: Conn, B: Conn>(
    front: &Front<'_>,
    identity: &Identity,
    tunnel: Tunnel,
    client: C,
    backend: B,
) {
    let deadline = after(front.rules.handshake_timeout);
    let mut client = Leg::new(client, Side::Client);
    let mut backend = Leg::new(backend, Side::Backend);
    let Some(greeting) = backend_greeting(front, identity, &mut client, &mut backend, 0).await
    else {
        return;
    };
    let mut out = BytesMut::new();
    mysql::encode(0, &greeting.for_client(false), &mut out);
    if let Err(e) = client.write(&out).await {
        record(front, Some(identity), &e);
        return fail(client.io, backend.io);
    }
    let packet = match within(deadline, "the handshake response", client.read()).await {
        Ok(p) => p,
        Err(e) => {
            record(front, Some(identity), &e);
            return fail(client.io, backend.io);
        }
    };
    let checked = packet
        .expect_seq(1)
        .and_then(|()| ClientFirst::parse(&packet.payload))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("bad handshake response: {e}")))
        .and_then(|first| match first {
            ClientFirst::Response(mut response) => {
                front.rules.check_user(identity, &response.username)?;
                tag(&front.rules, identity, &mut response, &greeting);
                Ok(response)
            }
            ClientFirst::SslRequest(_) => Err(Refusal::new(
                Code::BadRequest,
                format!(
                    "service {:?} applies a MySQL user policy, so TLS inside the tunnel is not \
                     offered (the tunnel is already encrypted): connect without TLS",
                    front.rules.service
                ),
            )),
        });
    let response = match checked {
        Ok(r) => r,
        Err(r) => {
            front.refused(Some(identity), &r);
            backend.io.fail();
            return refuse(&mut client.io, packet.next_seq(), &r).await;
        }
    };
    debug!(user = %String::from_utf8_lossy(&response.username), "mysql login inspected");
    let legs = Legs {
        client_tls: false,
        backend_tls: false,
    };
    let (relay, to_backend) = AuthRelay::start(legs, packet.seq, &response);
    let login = Login {
        front,
        identity,
        record: tunnel,
        capabilities: response.capabilities & greeting.capabilities(),
        kills: None,
    };
    login.run(client, backend, relay, to_backend).await;
}

/// Tells a refused client why with an ERR packet at sequence id `seq`, and closes. The caller
/// records the refusal (in the events sink).
pub async fn refuse<W: AsyncWrite + Unpin>(io: &mut W, seq: u8, r: &Refusal) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        let _ = io
            .write_all(&mysql::refusal_at(seq, r.code, &r.message))
            .await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// A client that passed TLS and the service's checks, with its handshake response.
struct Authorised<C> {
    client: Leg<tokio_rustls::server::TlsStream<Rewind<C>>>,
    identity: Identity,
    response: HandshakeResponse,
    response_seq: u8,
}

/// Steps 1 to 4: the greeting `offered`, the SSLRequest, TLS, the handshake response and the
/// service's checks, all with no backend connection. `None` when the client was refused (it
/// has been told, where it can read it, and the refusal recorded) or went away.
async fn authenticate<C: Conn>(
    front: &Front<'_>,
    greeter: &Greeter<'_>,
    offered: &Greeting,
    client: C,
) -> Option<Authorised<C>> {
    let deadlines = greeter.deadlines;
    let mut client = Leg::new(client, Side::Client);

    // 1. The greeting, with TLS offered.
    let mut out = BytesMut::new();
    mysql::encode(0, offered.payload(), &mut out);
    let sent = within(
        deadlines.handshake,
        "the greeting to be sent",
        client.write(&out),
    );
    if let Err(e) = sent.await {
        record(front, None, &e);
        client.io.fail();
        return None;
    }

    // 2. The SSLRequest, soon.
    let first = match within(deadlines.first_packet, "the SSL request", client.read()).await {
        Ok(p) => p,
        Err(e) => {
            record(front, None, &e);
            client.io.fail();
            return None;
        }
    };
    let plaintext = match first
        .expect_seq(1)
        .and_then(|()| ClientFirst::parse(&first.payload))
    {
        Ok(ClientFirst::SslRequest(_)) => None,
        Ok(ClientFirst::Response(_)) => Some(tls_required(&front.rules)),
        Err(e) => Some(Refusal::new(
            Code::BadRequest,
            format!("unexpected first packet: {e}"),
        )),
    };
    if let Some(r) = plaintext {
        front.refused(None, &r);
        refuse(&mut client.io, first.next_seq(), &r).await;
        return None;
    }

    // 3. TLS on the same connection; bytes read past the SSLRequest are the ClientHello's start.
    let Leg {
        io: raw,
        buf: ahead,
        ..
    } = client;
    let accept = tls::accept(greeter.acceptor, Rewind::new(ahead, raw));
    let tls = match tokio::time::timeout_at(deadlines.handshake, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let r = Refusal::new(
                Code::NotAuthorized,
                format!(
                    "tls handshake failed: {}",
                    tls::describe_handshake_error(&e)
                ),
            );
            front.refused(None, &r);
            return None;
        }
        Err(_) => {
            record(front, None, &Failure::Timeout("the TLS handshake"));
            return None;
        }
    };
    let mut client = Leg::new(tls, Side::Client);

    // 4. The handshake response, then who the client is and what it may do.
    let packet = match within(deadlines.handshake, "the handshake response", client.read()).await {
        Ok(p) => p,
        Err(e) => {
            record(front, None, &e);
            client.io.fail();
            return None;
        }
    };
    let reply_seq = packet.next_seq();
    let mut identity = None;
    let checked = packet
        .expect_seq(2)
        .and_then(|()| HandshakeResponse::parse(&packet.payload))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("bad handshake response: {e}")))
        .and_then(|response| {
            let id = identity.insert(client_identity(&client.io, &front.rules)?);
            front.rules.authorise(id)?;
            front.rules.check_user(id, &response.username)?;
            Ok(response)
        });
    match (checked, identity) {
        (Ok(response), Some(identity)) => Some(Authorised {
            client,
            identity,
            response,
            response_seq: packet.seq,
        }),
        (Err(r), identity) => {
            front.refused(identity.as_ref(), &r);
            refuse(&mut client.io, reply_seq, &r).await;
            None
        }
        (Ok(_), None) => None,
    }
}

/// The refusal of a client that went on without TLS, naming the option for common drivers.
fn tls_required(rules: &Rules<'_>) -> Refusal {
    Refusal::new(
        Code::NotAuthorized,
        format!(
            "TLS with a client certificate is required to use service {:?}: enable TLS in the \
             client (mariadb/mysql --ssl-mode=VERIFY_IDENTITY or --ssl-verify-server-cert, JDBC \
             sslMode=verify-full or useSsl=true, Go tls=<config name>, Python ssl=..., Node \
             ssl: {{...}}) and give it a client certificate",
            rules.service
        ),
    )
}

/// Reads the backend's greeting. `None` when the connection cannot go on: the client has been
/// told why (at sequence id `seq`), the refusal recorded and the backend connection failed.
async fn backend_greeting<C: Conn, B: Conn>(
    front: &Front<'_>,
    identity: &Identity,
    client: &mut Leg<C>,
    backend: &mut Leg<B>,
    seq: u8,
) -> Option<Greeting> {
    let deadline = after(front.rules.handshake_timeout);
    let refusal = match within(deadline, "the server greeting", backend.read()).await {
        Ok(packet) => match Greeting::parse(packet.payload.clone()) {
            Ok(g) => return Some(g),
            Err(MysqlError::Refused(err)) => {
                // The database refused the connection itself (too many connections, host
                // blocked): its own error is the most precise answer.
                let r = Refusal::new(
                    Code::BackendUnavailable,
                    format!("the database refused the connection: {err}"),
                );
                front.refused(Some(identity), &r);
                let to_client = Packet {
                    seq,
                    payload: packet.payload,
                };
                let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                    let _ = client.io.write_all(&to_client.encode_with_seq(seq)).await;
                    let _ = client.io.shutdown().await;
                })
                .await;
                backend.io.fail();
                return None;
            }
            Err(e) => unavailable(
                front,
                format!("the database sent an unusable greeting ({e})"),
            ),
        },
        Err(e) => {
            warn!(reason = %e, "no greeting from the database");
            unavailable(front, format!("no greeting from the database ({e})"))
        }
    };
    front.refused(Some(identity), &refusal);
    backend.io.fail();
    refuse(&mut client.io, seq, &refusal).await;
    None
}

fn unavailable(front: &Front<'_>, why: String) -> Refusal {
    Refusal::new(
        Code::BackendUnavailable,
        format!("service {:?} is unavailable: {why}", front.rules.service),
    )
}

/// A copy of `template` with connection id `id`, a fresh scramble and TLS offered.
fn greet_as(template: &Greeting, id: u32) -> Option<Greeting> {
    let mut rng = rand::rng();
    // Printable, as servers make them: some clients treat the scramble as a C string.
    let scramble: Vec<u8> = (0..template.scramble().len())
        .map(|_| rng.random_range(b'!'..=b'~'))
        .collect();
    let copy = template.reissue(id, &scramble)?;
    Greeting::parse(copy.for_client(true)).ok()
}

/// Tags the response with the client identity, with `client_attribute`.
fn tag(
    rules: &Rules<'_>,
    identity: &Identity,
    response: &mut HandshakeResponse,
    greeting: &Greeting,
) {
    if rules.client_attribute
        && !response.set_attribute(CLIENT_ATTRIBUTE, identity.uri(), greeting.capabilities())
    {
        debug!("the database takes no connection attributes: postern_client not set");
    }
}

/// The identity in the client's verified certificate.
fn client_identity<S>(
    conn: &tokio_rustls::server::TlsStream<S>,
    rules: &Rules<'_>,
) -> Result<Identity, Refusal> {
    let certs = conn.get_ref().1.peer_certificates();
    if certs.is_none_or(|c| c.is_empty()) {
        return Err(Refusal::new(
            Code::NotAuthorized,
            format!(
                "a client certificate is required to use service {:?}, and the client sent none \
                 (set ssl-cert and ssl-key)",
                rules.service
            ),
        ));
    }
    match tls::peer_identity(certs) {
        Ok(id @ Identity::Client(_)) => Ok(id),
        Ok(other) => Err(Refusal::new(
            Code::NotAuthorized,
            format!("{other} is not a client identity"),
        )),
        Err(e) => Err(Refusal::new(Code::NotAuthorized, e.to_string())),
    }
}

/// Records a failure of the connection phase: the client's as a refusal, the backend's as a
/// warning, a client going away at debug level.
fn record(front: &Front<'_>, identity: Option<&Identity>, e: &Failure) {
    match (e.refusal(), e.side()) {
        (Some(r), _) => front.refused(identity, &r),
        (None, Some(Side::Backend)) => {
            warn!(reason = %e, "backend connection failed during the handshake")
        }
        _ => debug!(reason = %e, "client went away during the handshake"),
    }
}

/// Runs `step` until `deadline`.
pub(super) async fn within<T>(
    deadline: Instant,
    step: &'static str,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .unwrap_or(Err(Failure::Timeout(step)))
}

/// `timeout` from now (far in the future when that cannot be added).
fn after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::vectors::{self, payload};
    use tokio::io::{AsyncReadExt, duplex};

    #[test]
    fn a_copied_greeting_differs_from_the_template_in_id_scramble_and_tls_only() {
        let template = Greeting::parse(payload(vectors::GREETING).into()).unwrap();
        let g = greet_as(&template, 0x8000_0005).unwrap();
        assert_eq!(g.connection_id(), 0x8000_0005);
        assert_ne!(g.scramble(), template.scramble());
        assert_eq!(g.scramble().len(), 20);
        assert!(g.scramble().iter().all(|b| (b'!'..=b'~').contains(b)));
        assert_eq!(g.server_version(), template.server_version());
        assert_eq!(
            g.capabilities(),
            (template.capabilities() | mysql::CLIENT_SSL) & !mysql::CLIENT_COMPRESS
        );
        assert_eq!(g.mariadb_capabilities(), template.mariadb_capabilities());
        assert_eq!(
            (g.charset(), g.status()),
            (template.charset(), template.status())
        );
        assert_eq!(g.auth_plugin(), template.auth_plugin());
        assert_eq!(g.payload().len(), template.payload().len());
    }

    #[tokio::test]
    async fn rewind_reads_the_bytes_ahead_first() {
        let (mut a, b) = duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(BytesMut::from(&b"hello"[..]), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn the_plaintext_refusal_names_the_options_of_common_drivers() {
        let acl = crate::policy::Acl::Any;
        let users = crate::policy::AllowedUsers::Any;
        let rules = Rules {
            service: "orders",
            clients: &acl,
            allowed_users: &users,
            bindings: &Default::default(),
            client_attribute: false,
            handshake_timeout: Duration::from_secs(1),
        };
        let r = tls_required(&rules);
        assert!(
            r.message
                .starts_with("TLS with a client certificate is required to use service \"orders\"")
        );
        for option in [
            "--ssl-mode=VERIFY_IDENTITY",
            "sslMode=verify-full",
            "useSsl=true",
            "tls=",
        ] {
            assert!(r.message.contains(option), "{option}");
        }
        // It fits in one ERR packet with room to spare.
        assert!(mysql::refusal(r.code, &r.message).len() < 1024);
    }
}
