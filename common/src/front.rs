//! The MySQL front end for stock MySQL and MariaDB clients with mutual TLS, the same code
//! wherever TLS ends: at the relay (`tls_termination: relay`) or at the agent
//! (`tls_termination: agent`, end to end, so the relay only carries ciphertext).
//!
//! MySQL negotiates TLS in-band: the server greets in plaintext, the client asks for TLS with a
//! 32-byte SSLRequest, and the TLS handshake runs on the same connection. So the front end needs
//! the backend's greeting before the client's TLS handshake shows who the client is. The caller
//! has a client connection and a backend connection (at the relay, a stream to the agent; at
//! the agent, the TCP connection to the database) and calls [`serve_tls`], which:
//!
//! 1. Reads the backend's greeting and sends it on with CLIENT_SSL set and compression cleared.
//! 2. Requires the client's SSLRequest; a plaintext handshake response gets ERR "TLS with a
//!    client certificate is required".
//! 3. Runs the TLS handshake. A certificate that does not chain to the Postern CA, has expired
//!    or is revoked fails the handshake; the client cannot read an ERR then, so this side logs
//!    why.
//! 4. Reads the handshake response over TLS, then refuses (ERR over TLS) a client that sent no
//!    certificate, an identity not in the service's `clients`, or a MySQL user outside
//!    `allowed_users`. With `client_attribute`, sets the connection attribute `postern_client`.
//! 5. Relays the authentication exchange with [`AuthRelay`]; the backend leg is plaintext, so it
//!    carries one packet (the SSLRequest) fewer and sequence ids are renumbered.
//! 6. Splices bytes. With a user policy or `client_attribute`, the client's commands pass a
//!    [`CommandWatch`]: a `COM_CHANGE_USER` to a user outside the policy is refused and the
//!    connection closed, and an allowed one gets `postern_client` set again (the new session's
//!    attributes are the ones in that command, so a client could otherwise forge them).
//!
//! Steps 1 to 4 run under the caller's deadline (`handshake_timeout` from the accepted
//! connection): a client that stalls after the greeting or during TLS is dropped and logged.
//! Each packet of step 5 gets `handshake_timeout` again.
//!
//! Before the client is authorised, the only bytes that flow go from the backend to the client:
//! its greeting, which is what the database shows anyone who can reach its port. No byte from
//! the client reaches the backend until the TLS handshake has verified its certificate and the
//! identity has passed the service's checks.
//!
//! [`serve_inspected`] runs steps 1, 4, 5 and 6 without TLS for clients that arrive already
//! authenticated inside an encrypted tunnel (`connect` streams, the relay's TLS-first listener).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::mysql::{
    self, AuthOutcome, AuthRelay, ChangeUser, ClientFirst, Command, CommandWatch, ErrPacket,
    Greeting, HandshakeResponse, Legs, MysqlError, Packet, PacketReader, Scan, Turn,
};
use crate::pki::Identity;
use crate::policy::{Acl, AllowedUsers, Users};
use crate::protocol::Code;
use crate::transport::Stream;
use crate::{net, splice, tls};

/// The connection attribute that names the client identity (`postern://client/NAME`) to the
/// database, with `client_attribute: true`.
pub const CLIENT_ATTRIBUTE: &str = "postern_client";

/// How long a refusal may take to write before the connection is dropped anyway.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::protocol::Refusal;

/// The rules of one service, wherever they come from (the relay's config, or the policy the
/// relay sent the agent).
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The service name, for messages.
    pub service: &'a str,
    /// Who may connect.
    pub clients: &'a Acl,
    /// Which MySQL users each client may log in as.
    pub allowed_users: &'a AllowedUsers,
    /// Whether sessions get the connection attribute `postern_client`.
    pub client_attribute: bool,
    /// The deadline for each packet of the login exchange.
    pub handshake_timeout: Duration,
}

impl Policy<'_> {
    /// Whether a client that arrives already authenticated must log in through the front end
    /// ([`serve_inspected`]) so that the user policy and the client attribute apply to it.
    pub fn needs_inspection(&self, identity: &Identity) -> bool {
        self.client_attribute || self.allowed_users.for_client(identity.name()) != Users::Any
    }
}

/// Whether `client` may use the service.
pub fn authorise(policy: &Policy<'_>, client: &Identity) -> Result<(), Refusal> {
    if policy.clients.allows(client) {
        Ok(())
    } else {
        Err(Refusal::new(
            Code::NotAuthorized,
            format!(
                "{client} is not allowed to use service {:?}",
                policy.service
            ),
        ))
    }
}

/// A connection the front end can serve on either side.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the connection end as a failure (a reset), so the peer does not mistake a broken
    /// connection for a finished one.
    fn fail(&mut self);
}

impl Conn for TcpStream {
    fn fail(&mut self) {
        net::reset_on_close(self);
    }
}

impl Conn for Stream {
    fn fail(&mut self) {
        self.abort();
    }
}

impl<S: Conn> Conn for Rewind<S> {
    fn fail(&mut self) {
        self.inner.fail();
    }
}

impl<S: Conn> Conn for tokio_rustls::server::TlsStream<S> {
    fn fail(&mut self) {
        self.get_mut().0.fail();
    }
}

/// What the logs say about one connection.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    /// The id both the relay and the agent log.
    pub conn_id: u64,
    /// The backend address, for logs.
    pub backend: &'a str,
}

/// Serves a client that negotiates TLS in-band (steps 1 to 6 of the module doc), with the
/// backend connection already open. Steps 1 to 4 must finish by `deadline`; `slot` (a handshake
/// slot) is dropped once the client is admitted or refused.
pub async fn serve_tls<C: Conn, B: Conn, S: Send>(
    policy: &Policy<'_>,
    meta: Meta<'_>,
    client: C,
    backend: B,
    acceptor: &TlsAcceptor,
    deadline: Instant,
    slot: S,
) {
    let mut client = Leg::new(client, Side::Client);
    let mut backend = Leg::new(backend, Side::Backend);

    // 1. The greeting, with TLS offered.
    let Some(greeting) = greet(deadline, policy, &mut client, &mut backend, true).await else {
        return;
    };

    // 2. The SSLRequest.
    let first = match within(deadline, "the SSL request", client.read()).await {
        Ok(p) => p,
        Err(e) => {
            e.log();
            backend.io.fail();
            return;
        }
    };
    let plaintext = match first
        .expect_seq(1)
        .and_then(|()| ClientFirst::parse(&first.payload))
    {
        Ok(ClientFirst::SslRequest(_)) => None,
        Ok(ClientFirst::Response(_)) => Some(Refusal::new(
            Code::NotAuthorized,
            format!(
                "TLS with a client certificate is required to use service {:?}: connect with \
                 TLS (ssl-mode VERIFY_IDENTITY) and a client certificate",
                policy.service
            ),
        )),
        Err(e) => Some(Refusal::new(
            Code::BadRequest,
            format!("unexpected first packet: {e}"),
        )),
    };
    if let Some(r) = plaintext {
        backend.io.fail();
        return refuse(&mut client.io, first.next_seq(), &r).await;
    }

    // 3. TLS on the same connection; bytes read past the SSLRequest are the ClientHello's start.
    let Leg {
        io: raw,
        buf: ahead,
        ..
    } = client;
    let tls = match tokio::time::timeout_at(
        deadline,
        tls::accept(acceptor, Rewind::new(ahead, raw)),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            warn!(reason = %tls::describe_handshake_error(&e), "refused client: tls handshake failed");
            backend.io.fail();
            return;
        }
        Err(_) => {
            Failure::Timeout("the TLS handshake").log();
            backend.io.fail();
            return;
        }
    };
    let mut client = Leg::new(tls, Side::Client);

    // 4. The handshake response, then who the client is and what it may do.
    let packet = match within(deadline, "the handshake response", client.read()).await {
        Ok(p) => p,
        Err(e) => {
            e.log();
            backend.io.fail();
            return;
        }
    };
    let reply_seq = packet.next_seq();
    let checked = packet
        .expect_seq(2)
        .and_then(|()| HandshakeResponse::parse(&packet.payload))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("bad handshake response: {e}")))
        .and_then(|response| {
            let identity = client_identity(&client.io, policy)?;
            authorise(policy, &identity)?;
            Ok((identity, response))
        });
    let (identity, mut response) = match checked {
        Ok(c) => c,
        Err(r) => {
            backend.io.fail();
            return refuse(&mut client.io, reply_seq, &r).await;
        }
    };
    tracing::Span::current().record("client", tracing::field::display(&identity));
    if let Err(r) = admit(policy, &identity, &mut response, &greeting) {
        backend.io.fail();
        return refuse(&mut client.io, reply_seq, &r).await;
    }
    drop(slot);
    info!(
        conn_id = meta.conn_id,
        backend = %meta.backend,
        user = %String::from_utf8_lossy(&response.username),
        "client connected"
    );

    // 5 and 6.
    let legs = Legs {
        client_tls: true,
        backend_tls: false,
    };
    let login = Login {
        policy,
        identity: &identity,
        conn_id: meta.conn_id,
        server_capabilities: greeting.capabilities(),
    };
    login
        .run(client, backend, legs, packet.seq, &response)
        .await;
}

/// Serves an authorised client whose MySQL runs in plaintext inside an encrypted tunnel
/// (`connect` or the TLS-first listener), applying the service's MySQL policy.
pub async fn serve_inspected<C: Conn, B: Conn>(
    policy: &Policy<'_>,
    identity: &Identity,
    conn_id: u64,
    client: C,
    backend: B,
) {
    let deadline = Instant::now() + policy.handshake_timeout;
    let mut client = Leg::new(client, Side::Client);
    let mut backend = Leg::new(backend, Side::Backend);
    let Some(greeting) = greet(deadline, policy, &mut client, &mut backend, false).await else {
        return;
    };
    let packet = match within(deadline, "the handshake response", client.read()).await {
        Ok(p) => p,
        Err(e) => {
            e.log();
            backend.io.fail();
            client.io.fail();
            return;
        }
    };
    let checked = packet
        .expect_seq(1)
        .and_then(|()| ClientFirst::parse(&packet.payload))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("bad handshake response: {e}")))
        .and_then(|first| match first {
            ClientFirst::Response(mut response) => {
                admit(policy, identity, &mut response, &greeting)?;
                Ok(response)
            }
            ClientFirst::SslRequest(_) => Err(Refusal::new(
                Code::BadRequest,
                format!(
                    "service {:?} applies a MySQL user policy, so TLS inside the tunnel is not \
                     offered (the tunnel is already encrypted): connect without TLS",
                    policy.service
                ),
            )),
        });
    let response = match checked {
        Ok(r) => r,
        Err(r) => {
            backend.io.fail();
            return refuse(&mut client.io, packet.next_seq(), &r).await;
        }
    };
    debug!(user = %String::from_utf8_lossy(&response.username), "mysql login inspected");
    let legs = Legs {
        client_tls: false,
        backend_tls: false,
    };
    let login = Login {
        policy,
        identity,
        conn_id,
        server_capabilities: greeting.capabilities(),
    };
    login
        .run(client, backend, legs, packet.seq, &response)
        .await;
}

/// Tells a refused client why with an ERR packet at sequence id `seq`, and closes.
pub async fn refuse<W: AsyncWrite + Unpin>(io: &mut W, seq: u8, r: &Refusal) {
    warn!(code = %r.code, reason = %r.message, "refused client");
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        let _ = io
            .write_all(&mysql::refusal_at(seq, r.code, &r.message))
            .await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// Reads the backend's greeting and sends it to the client, offering TLS when `tls`.
///
/// `None` when the connection cannot go on; the client has been told why and the backend
/// stream aborted.
async fn greet<C: AsyncRead + AsyncWrite + Unpin, B: Conn>(
    deadline: Instant,
    policy: &Policy<'_>,
    client: &mut Leg<C>,
    backend: &mut Leg<B>,
    tls: bool,
) -> Option<Greeting> {
    let unavailable = |why: String| {
        Refusal::new(
            Code::BackendUnavailable,
            format!("service {:?} is unavailable: {why}", policy.service),
        )
    };
    let packet = match within(deadline, "the server greeting", backend.read()).await {
        Ok(p) => p,
        Err(e) => {
            backend.io.fail();
            refuse(
                &mut client.io,
                0,
                &unavailable(format!("no greeting from the database ({e})")),
            )
            .await;
            return None;
        }
    };
    let greeting = match Greeting::parse(packet.payload.clone()) {
        Ok(g) => g,
        Err(MysqlError::Refused(err)) => {
            // The database refused the connection itself (too many connections, host blocked):
            // its own error is the most precise answer.
            warn!(reason = %err, "refused client: the database refused the connection");
            let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                let _ = client.io.write_all(&packet.encode_with_seq(0)).await;
                let _ = client.io.shutdown().await;
            })
            .await;
            backend.io.fail();
            return None;
        }
        Err(e) => {
            backend.io.fail();
            let r = unavailable(format!("the database sent an unusable greeting ({e})"));
            refuse(&mut client.io, 0, &r).await;
            return None;
        }
    };
    let mut out = BytesMut::new();
    mysql::encode(0, &greeting.for_client(tls), &mut out);
    if let Err(e) = client.write(&out).await {
        e.log();
        backend.io.fail();
        return None;
    }
    Some(greeting)
}

/// Checks the MySQL user against the policy and tags the response with the client identity.
fn admit(
    policy: &Policy<'_>,
    identity: &Identity,
    response: &mut HandshakeResponse,
    greeting: &Greeting,
) -> Result<(), Refusal> {
    check_user(policy, identity, &response.username)?;
    if policy.client_attribute
        && !response.set_attribute(CLIENT_ATTRIBUTE, identity.uri(), greeting.capabilities())
    {
        debug!("the database takes no connection attributes: postern_client not set");
    }
    Ok(())
}

/// Whether `identity` may log in to the service as MySQL user `user`.
fn check_user(policy: &Policy<'_>, identity: &Identity, user: &[u8]) -> Result<(), Refusal> {
    if policy
        .allowed_users
        .for_client(identity.name())
        .allows(user)
    {
        return Ok(());
    }
    Err(Refusal::new(
        Code::NotAuthorized,
        format!(
            "{identity} may not log in to service {:?} as MySQL user {:?}",
            policy.service,
            String::from_utf8_lossy(user)
        ),
    ))
}

/// The identity in the client's verified certificate.
fn client_identity<S>(
    conn: &tokio_rustls::server::TlsStream<S>,
    policy: &Policy<'_>,
) -> Result<Identity, Refusal> {
    let certs = conn.get_ref().1.peer_certificates();
    if certs.is_none_or(|c| c.is_empty()) {
        return Err(Refusal::new(
            Code::NotAuthorized,
            format!(
                "a client certificate is required to use service {:?}, and the client sent none \
                 (set ssl-cert and ssl-key)",
                policy.service
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

/// Runs `step` until `deadline`.
async fn within<T>(
    deadline: Instant,
    step: &'static str,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .unwrap_or(Err(Failure::Timeout(step)))
}

/// The login and the command phase of one authorised client.
struct Login<'a> {
    policy: &'a Policy<'a>,
    identity: &'a Identity,
    conn_id: u64,
    /// The backend's capabilities, from its greeting.
    server_capabilities: u32,
}

impl Login<'_> {
    /// Relays the authentication exchange that starts with `response` (sequence id
    /// `response_seq` on the client leg), then splices bytes until either side ends.
    async fn run<C: Conn, B: Conn>(
        self,
        mut client: Leg<C>,
        mut backend: Leg<B>,
        legs: Legs,
        response_seq: u8,
        response: &HandshakeResponse,
    ) {
        let timeout = self.policy.handshake_timeout;
        let (mut relay, to_backend) = AuthRelay::start(legs, response_seq, response);
        if let Err(e) = backend.write(&to_backend).await {
            e.log();
            return fail(client.io, backend.io);
        }
        loop {
            match relay.turn() {
                Turn::Done(AuthOutcome::Accepted) => break,
                Turn::Done(AuthOutcome::Denied) => {
                    // The database's ERR went to the client; it closes the connection itself.
                    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, client.io.shutdown()).await;
                    return;
                }
                Turn::Backend => {
                    let step = within(
                        Instant::now() + timeout,
                        "the database's login answer",
                        backend.read(),
                    );
                    let packet = match step.await {
                        Ok(p) => p,
                        Err(e) => {
                            e.log();
                            return fail(client.io, backend.io);
                        }
                    };
                    let out = match relay.from_backend(&packet) {
                        Ok(out) => out,
                        Err(e) => {
                            let r = Refusal::new(Code::NotAuthorized, format!("login failed: {e}"));
                            backend.io.fail();
                            return refuse(&mut client.io, relay.client_seq(), &r).await;
                        }
                    };
                    if relay.turn() == Turn::Done(AuthOutcome::Denied)
                        && let Some(err) = ErrPacket::parse(&packet.payload)
                    {
                        info!(reason = %err, "the database refused the login");
                    }
                    if let Err(e) = client.write(&out).await {
                        e.log();
                        return fail(client.io, backend.io);
                    }
                }
                Turn::Client => {
                    let step = within(
                        Instant::now() + timeout,
                        "the client's login answer",
                        client.read(),
                    );
                    let out = match step.await.and_then(|p| {
                        relay.from_client(&p).map_err(|source| Failure::Protocol {
                            side: Side::Client,
                            source,
                        })
                    }) {
                        Ok(out) => out,
                        Err(e) => {
                            e.log();
                            return fail(client.io, backend.io);
                        }
                    };
                    if let Err(e) = backend.write(&out).await {
                        e.log();
                        return fail(client.io, backend.io);
                    }
                }
            }
        }
        debug!(plugin = %String::from_utf8_lossy(relay.plugin()), "logged in");
        // What the server takes the client to speak, for reading its later COM_CHANGE_USER.
        let capabilities = response.capabilities & self.server_capabilities;
        self.splice(client, backend, capabilities).await;
    }

    /// The command phase: bytes pass unchanged, or through a [`Watched`] reader when the
    /// client's MySQL users are limited or its sessions are tagged, so a `COM_CHANGE_USER` is
    /// checked against the policy and keeps the tag.
    async fn splice<C: Conn, B: Conn>(self, client: Leg<C>, backend: Leg<B>, capabilities: u32) {
        let Leg {
            io: mut client_io,
            buf: client_ahead,
            ..
        } = client;
        let Leg {
            io: mut backend_io,
            buf: backend_ahead,
            ..
        } = backend;
        if !backend_ahead.is_empty() && client_io.write_all(&backend_ahead).await.is_err() {
            return fail(client_io, backend_io);
        }
        let users = self.policy.allowed_users.for_client(self.identity.name());
        let result = if users == Users::Any && !self.policy.client_attribute {
            if !client_ahead.is_empty() && backend_io.write_all(&client_ahead).await.is_err() {
                return fail(client_io, backend_io);
            }
            splice::splice(&mut client_io, &mut backend_io).await
        } else {
            let judge = |command: &Command, packet: &[u8]| {
                judge_command(self.policy, self.identity, capabilities, command, packet)
            };
            let mut watched = Watched::new(&mut client_io, client_ahead, judge);
            let result = splice::splice(&mut watched, &mut backend_io).await;
            if let Some(r) = watched.refused.take() {
                // A command was refused: its answer (sequence id 1) is the refusal.
                backend_io.fail();
                return refuse(&mut client_io, 1, &r).await;
            }
            result
        };
        match result {
            Ok(t) => debug!(
                conn_id = self.conn_id,
                up = t.a_to_b,
                down = t.b_to_a,
                "client disconnected"
            ),
            Err(e) => {
                debug!(conn_id = self.conn_id, error = %e, "connection failed");
                fail(client_io, backend_io);
            }
        }
    }
}

/// The policy for commands after the login: a `COM_CHANGE_USER` must name a user the client may
/// log in as, and with `client_attribute` it gets the client's identity as its attribute too
/// (the new session's attributes are the ones in that command).
fn judge_command(
    policy: &Policy<'_>,
    identity: &Identity,
    capabilities: u32,
    command: &Command,
    packet: &[u8],
) -> Judgement {
    let Command::ChangeUser { username } = command else {
        return Ok(None);
    };
    check_user(policy, identity, username)?;
    if !policy.client_attribute {
        return Ok(None);
    }
    let payload = packet.get(4..).unwrap_or_default();
    let mut change = ChangeUser::parse(payload, capabilities)
        .map_err(|e| Refusal::new(Code::BadRequest, format!("unreadable COM_CHANGE_USER: {e}")))?;
    change.set_attribute(CLIENT_ATTRIBUTE, identity.uri(), capabilities);
    let mut out = BytesMut::new();
    mysql::encode(0, &change.encode(capabilities), &mut out);
    Ok(Some(out))
}

/// Ends both sides of a connection as failures.
fn fail<C: Conn, B: Conn>(mut client: C, mut backend: B) {
    backend.fail();
    client.fail();
}

/// Which side of a connection something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Backend => "backend",
        })
    }
}

/// Why a connection ended during the connection phase.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// A step did not finish before its deadline.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A side closed its connection.
    #[error("the {0} closed the connection")]
    Closed(Side),
    /// Reading or writing a side failed.
    #[error("{side} connection failed: {source}")]
    Io {
        /// Which side.
        side: Side,
        /// Why.
        source: io::Error,
    },
    /// A side sent something the MySQL protocol does not allow here.
    #[error("the {side} broke the mysql protocol: {source}")]
    Protocol {
        /// Which side.
        side: Side,
        /// What was wrong.
        source: MysqlError,
    },
}

impl Failure {
    /// Logs the failure at the level it deserves: what an operator should see is a warning, a
    /// client going away is not.
    fn log(&self) {
        match self {
            Self::Timeout(step) => warn!(step, "refused client: handshake timed out"),
            Self::Closed(Side::Client)
            | Self::Io {
                side: Side::Client, ..
            } => debug!(reason = %self, "client went away during the handshake"),
            Self::Closed(Side::Backend)
            | Self::Io {
                side: Side::Backend,
                ..
            } => warn!(reason = %self, "backend connection failed during the handshake"),
            Self::Protocol { .. } => {
                warn!(reason = %self, "connection failed during the handshake")
            }
        }
    }
}

/// One side of a connection during the connection phase: its I/O and the bytes read ahead.
struct Leg<S> {
    io: S,
    reader: PacketReader,
    buf: BytesMut,
    side: Side,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg<S> {
    fn new(io: S, side: Side) -> Self {
        Self {
            io,
            reader: PacketReader::default(),
            buf: BytesMut::new(),
            side,
        }
    }

    /// Reads one packet.
    async fn read(&mut self) -> Result<Packet, Failure> {
        let side = self.side;
        loop {
            match self.reader.decode(&mut self.buf) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(source) => return Err(Failure::Protocol { side, source }),
            }
            self.buf.reserve(4096);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => return Err(Failure::Closed(side)),
                Ok(_) => {}
                Err(source) => return Err(Failure::Io { side, source }),
            }
        }
    }

    /// Writes bytes and flushes them.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let side = self.side;
        let io = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        io.await.map_err(|source| Failure::Io { side, source })
    }
}

/// A connection whose first bytes were already read: they are read again before the rest.
///
/// The client's SSLRequest is read with a buffer, which may hold the start of the TLS
/// ClientHello when the client sent both at once; TLS must see those bytes first.
pub struct Rewind<S> {
    ahead: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, with `ahead` to be read first.
    pub fn new(ahead: BytesMut, inner: S) -> Self {
        Self { ahead, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client connection whose reads pass through a [`CommandWatch`]: a command that `judge`
/// refuses never comes out (the read fails instead and `refused` says why), and one it rewrites
/// comes out rewritten.
struct Watched<S, J> {
    inner: S,
    watch: CommandWatch,
    /// Bytes read from the client that the watch has not looked at.
    buf: BytesMut,
    /// Bytes that may be handed on.
    ready: BytesMut,
    eof: bool,
    judge: J,
    refused: Option<Refusal>,
}

/// Judges one command packet (`packet`: the whole packet, header included): `Ok(None)` lets it
/// pass unchanged, `Ok(Some(bytes))` replaces it, `Err` refuses it.
type Judgement = Result<Option<BytesMut>, Refusal>;

/// The size of one read from the client while watching.
const WATCH_READ: usize = 32 * 1024;

impl<S, J> Watched<S, J> {
    fn new(inner: S, ahead: BytesMut, judge: J) -> Self {
        Self {
            inner,
            watch: CommandWatch::default(),
            buf: ahead,
            ready: BytesMut::new(),
            eof: false,
            judge,
            refused: None,
        }
    }
}

impl<S, J> AsyncRead for Watched<S, J>
where
    S: AsyncRead + Unpin,
    J: Fn(&Command, &[u8]) -> Judgement + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.refused.is_some() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "command refused by policy",
                )));
            }
            match this.watch.scan(&this.buf) {
                Ok(Scan::Pass(n)) => this.ready = this.buf.split_to(n),
                Ok(Scan::Judge { command, len }) => {
                    let packet = this.buf.split_to(len);
                    match (this.judge)(&command, &packet) {
                        Ok(None) => this.ready = packet,
                        Ok(Some(rewritten)) => this.ready = rewritten,
                        Err(r) => this.refused = Some(r),
                    }
                }
                Ok(Scan::NeedMore) => {
                    if this.eof {
                        // The client ended, possibly mid-packet: the server sees the end too.
                        return Poll::Ready(Ok(()));
                    }
                    // Let go of the handed-on bytes first, so the buffer can be reused.
                    this.ready = BytesMut::new();
                    this.buf.reserve(WATCH_READ);
                    let n = ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut this.inner),
                        cx,
                        &mut this.buf
                    ))?;
                    if n == 0 {
                        this.eof = true;
                    }
                }
                Err(e) => {
                    this.refused = Some(Refusal::new(
                        Code::BadRequest,
                        format!("unreadable command: {e}"),
                    ));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin, J: Unpin> AsyncWrite for Watched<S, J> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn change_user(user: &[u8]) -> Vec<u8> {
        let mut p = vec![mysql::COM_CHANGE_USER];
        p.extend_from_slice(user);
        p.extend_from_slice(b"\0\x00\0");
        p
    }

    fn judge(command: &Command, _packet: &[u8]) -> Judgement {
        match command {
            Command::ChangeUser { username } if &username[..] != b"app" => {
                Err(Refusal::new(Code::NotAuthorized, "not app"))
            }
            _ => Ok(None),
        }
    }

    /// Sends `wire` through a [`Watched`] reader in small writes; returns what came out and the
    /// refusal that stopped it, if any.
    async fn watch(wire: Vec<u8>) -> (Vec<u8>, Option<Refusal>) {
        let (mut client, relay_side) = duplex(1024);
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(7) {
                if client.write_all(chunk).await.is_err() {
                    break;
                }
            }
            let _ = client.shutdown().await;
        });
        let mut watched = Watched::new(relay_side, BytesMut::new(), judge);
        let mut out = Vec::new();
        let mut chunk = [0u8; 100];
        loop {
            match watched.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
                    break;
                }
            }
        }
        let refused = watched.refused.take();
        drop(watched);
        let _ = writer.await;
        (out, refused)
    }

    #[tokio::test]
    async fn allowed_commands_pass_unchanged() {
        let mut wire = BytesMut::new();
        mysql::encode(0, b"\x03SELECT 1", &mut wire);
        mysql::encode(0, &change_user(b"app"), &mut wire);
        mysql::encode(0, &[mysql::COM_QUIT], &mut wire);
        let (out, refused) = watch(wire.to_vec()).await;
        assert_eq!(out, wire.to_vec());
        assert!(refused.is_none());
    }

    #[tokio::test]
    async fn a_refused_change_of_user_never_comes_out() {
        let mut wire = BytesMut::new();
        mysql::encode(0, b"\x03SELECT 1", &mut wire);
        let before = wire.len();
        mysql::encode(0, &change_user(b"root"), &mut wire);
        mysql::encode(0, b"\x03SELECT 2", &mut wire);
        let (out, refused) = watch(wire.to_vec()).await;
        assert_eq!(out, wire[..before].to_vec(), "only what came before it");
        assert_eq!(refused.map(|r| r.message).as_deref(), Some("not app"));
    }

    #[test]
    fn a_change_of_user_is_judged_and_keeps_the_identity_attribute() {
        let caps = mysql::CLIENT_PROTOCOL_41
            | mysql::CLIENT_SECURE_CONNECTION
            | mysql::CLIENT_PLUGIN_AUTH
            | mysql::CLIENT_CONNECT_ATTRS;
        let alice = Identity::Client("alice".into());
        let (acl, users) = (
            Acl::Any,
            AllowedUsers::Policy {
                clients: Default::default(),
                others: Some(Users::Only(["app".to_owned()].into())),
            },
        );
        let service = |client_attribute| Policy {
            service: "orders",
            clients: &acl,
            allowed_users: &users,
            client_attribute,
            handshake_timeout: Duration::from_secs(1),
        };
        let forged = ChangeUser {
            username: "app".into(),
            auth_response: vec![7; 20].into(),
            database: "shop".into(),
            charset: Some(45),
            auth_plugin: Some("mysql_native_password".into()),
            attributes: Some(vec![(
                "postern_client".into(),
                "postern://client/mallory".into(),
            )]),
            rest: Default::default(),
        };
        let mut packet = BytesMut::new();
        mysql::encode(0, &forged.encode(caps), &mut packet);
        let command = Command::ChangeUser {
            username: "app".into(),
        };
        // Without the attribute the packet passes as it is.
        assert!(matches!(
            judge_command(&service(false), &alice, caps, &command, &packet),
            Ok(None)
        ));
        let Ok(Some(out)) = judge_command(&service(true), &alice, caps, &command, &packet) else {
            panic!("rewritten");
        };
        assert_eq!(out[3], 0, "still a command");
        let again = ChangeUser::parse(&out[4..], caps).unwrap();
        assert_eq!(
            again.attributes.unwrap(),
            vec![("postern_client".into(), "postern://client/alice".into())]
        );
        assert_eq!(again.username, forged.username);
        assert_eq!(again.auth_response, forged.auth_response);
        // A user outside the policy is refused, whatever else the packet says.
        let root = Command::ChangeUser {
            username: "root".into(),
        };
        let refused = judge_command(&service(true), &alice, caps, &root, &packet).unwrap_err();
        assert!(
            refused.message.contains("as MySQL user \"root\""),
            "{}",
            refused.message
        );
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
}
