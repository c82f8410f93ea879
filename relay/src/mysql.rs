//! The relay's MySQL-native listener: stock MySQL and MariaDB clients and drivers connect
//! straight to the relay with TLS and a client certificate, as to a MySQL server that requires
//! X.509.
//!
//! For each connection on a service's `listen` address, the relay takes a handshake slot and a
//! connection slot, and opens a stream to an agent that serves the service; refusals up to here
//! (too many connections, no agent, the backend is down) are ERR packets at sequence id 0,
//! from the relay, in plaintext. Then, by the service's `tls_termination`:
//!
//! * `relay`: the stream is marked pre-authorisation, the agent connects it to the database, and
//!   the relay runs the MySQL front end ([`postern_common::front::serve_tls`]: greeting,
//!   SSLRequest, TLS, policy, login, command watch) with the stream as the backend.
//! * `agent` (end to end): the stream is opened in [`StreamMode::MysqlE2e`], the agent runs the
//!   same front end with its service certificate and the policy this relay sent it
//!   ([`crate::agents`]), and the relay only splices bytes: it never parses, decrypts or keeps
//!   anything the client sends. The handshake deadline is enforced at the agent.
//!
//! Everything up to the client's handshake response runs under one deadline
//! (`handshake_timeout`), and at most `max_handshakes` connections per service are in it at
//! once; more wait for a slot, for up to twice `handshake_timeout`. In end-to-end mode the
//! agent applies both (the relay's slot covers only finding the agent).
//!
//! # Why opening the backend connection before authorisation is safe
//!
//! Before the client is authorised, the only bytes that flow go from the backend to the client:
//! its greeting (server version, connection id, capability flags, a random scramble). That is
//! what the database shows anyone who can reach its port, and it grants nothing. No byte from the
//! client reaches the backend until the TLS handshake has verified its certificate and the
//! identity has passed the service's checks; a refused client's stream is aborted, and the
//! database sees a connection that closed before any login. An unauthenticated client costs the
//! backend one connection for at most the handshake deadline, and holds one of the service's
//! `max_connections` slots and one of its `max_handshakes` slots (connections not yet
//! authorised) while it does, so unauthenticated clients cannot take every database connection.
//!
//! # Clients that arrive already authenticated
//!
//! `connect` streams and the TLS-first listener carry the client's MySQL in plaintext inside the
//! tunnel. When the service has a user policy or `client_attribute` ([`needs_inspection`]),
//! [`serve_inspected`] applies the same policy to them without TLS inside.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use postern_common::front::{self, Conn, Meta};
use postern_common::pki::Identity;
use postern_common::protocol::{Code, StreamMode};
use postern_common::splice;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::Shared;
use crate::config::{Protocol, Service, TlsTermination};
use crate::forward::{self, Reached, Refusal};

pub use postern_common::front::Rewind;

/// The connection attribute that names the client identity (`postern://client/NAME`) to the
/// database, with `client_attribute: true`.
pub const CLIENT_ATTRIBUTE: &str = "postern_client";

/// Serves one connection accepted on a service's MySQL-native listener.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    service: String,
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
) {
    let Some(svc) = shared.config.services.get(&service) else {
        return;
    };
    // Until the client is authorised it holds a database connection: limit how many may. A
    // burst of clients waits for a slot (handshakes take milliseconds). Every slot taken when
    // this client arrived frees up within one handshake deadline; the wait allows two, so that
    // only slots that keep being taken refuse the client.
    let timeout = shared.config.handshake_timeout;
    let slot = match shared.handshakes.get(&service) {
        Some(slots) => tokio::time::timeout(2 * timeout, slots.clone().acquire_owned()).await,
        None => return,
    };
    let Ok(Ok(handshake)) = slot else {
        let r = Refusal::new(
            Code::TooManyConnections,
            format!(
                "too many connections to service {:?} in their handshake (limit {})",
                svc.name, svc.max_handshakes
            ),
        );
        return front::refuse(&mut tcp, 0, &r).await;
    };
    let deadline = Instant::now() + timeout;
    let mode = match svc.tls_termination {
        TlsTermination::Relay => StreamMode::Plain,
        TlsTermination::Agent => StreamMode::MysqlE2e,
    };

    // An agent and the backend, before anything is known about the client.
    let opened = forward::open(&shared, svc, None, peer, mode);
    let reached = match tokio::time::timeout_at(deadline, opened).await {
        Ok(Ok(r)) => r,
        Ok(Err(r)) => return front::refuse(&mut tcp, 0, &r).await,
        Err(_) => {
            let r = Refusal::new(
                Code::NoAgent,
                format!(
                    "service {:?} is unavailable: the agent did not answer in time",
                    svc.name
                ),
            );
            return front::refuse(&mut tcp, 0, &r).await;
        }
    };
    let Reached {
        stream,
        agent,
        backend,
        conn_id,
        _permit,
    } = reached;
    tracing::Span::current().record("conn_id", conn_id);
    tracing::Span::current().record("agent", &agent);

    if mode == StreamMode::MysqlE2e {
        // End to end: the agent runs the handshake under its own deadline; this relay's
        // handshake slot only covered finding the agent.
        drop(handshake);
        info!(conn_id, %agent, %backend, "client connected end to end: tls ends at the agent");
        return match shared.tap.get() {
            Some(tap) => splice_raw(conn_id, tcp, Tapped::new(stream, tap.clone())).await,
            None => splice_raw(conn_id, tcp, stream).await,
        };
    }

    let policy = svc.policy(timeout);
    let meta = Meta {
        conn_id,
        backend: &backend,
    };
    // The handshake slot goes back once the client is admitted or refused.
    match shared.tap.get() {
        Some(tap) => {
            let stream = Tapped::new(stream, tap.clone());
            front::serve_tls(&policy, meta, tcp, stream, &acceptor, deadline, handshake).await
        }
        None => front::serve_tls(&policy, meta, tcp, stream, &acceptor, deadline, handshake).await,
    }
}

/// Carries bytes unchanged between the client and the agent, until either side ends.
async fn splice_raw<S: Conn>(conn_id: u64, mut tcp: TcpStream, mut stream: S) {
    match splice::splice(&mut tcp, &mut stream).await {
        Ok(t) => debug!(
            conn_id,
            up = t.a_to_b,
            down = t.b_to_a,
            "client disconnected"
        ),
        Err(e) => {
            debug!(conn_id, error = %e, "connection failed");
            stream.fail();
            tcp.fail();
        }
    }
}

/// Everything the MySQL-native listeners wrote into agent streams, while a test asks for it
/// ([`crate::Handle::tap_agent_streams`]).
pub type Tap = Arc<Mutex<Vec<u8>>>;

/// A stream to the agent whose writes are also appended to a [`Tap`].
struct Tapped<S> {
    inner: S,
    tap: Tap,
}

impl<S> Tapped<S> {
    fn new(inner: S, tap: Tap) -> Self {
        Self { inner, tap }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.tap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Conn> Conn for Tapped<S> {
    fn fail(&mut self) {
        self.inner.fail();
    }
}

/// Whether MySQL connections of `identity` to `svc` that arrive already authenticated (`connect`
/// streams, the TLS-first listener) must log in through the relay, so the user policy and the
/// client attribute apply to them as well.
pub(crate) fn needs_inspection(svc: &Service, identity: &Identity) -> bool {
    svc.protocol == Protocol::Mysql && svc.policy(Default::default()).needs_inspection(identity)
}

/// Serves an authorised client whose MySQL runs in plaintext inside an encrypted tunnel
/// (`connect` or the TLS-first listener), applying the service's MySQL policy.
pub(crate) async fn serve_inspected<C: Conn>(
    shared: &Shared,
    svc: &Service,
    identity: &Identity,
    client: C,
    reached: Reached,
) {
    let Reached {
        stream,
        conn_id,
        _permit,
        ..
    } = reached;
    let policy = svc.policy(shared.config.handshake_timeout);
    front::serve_inspected(&policy, identity, conn_id, client, stream).await;
}
