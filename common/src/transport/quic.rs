//! QUIC (quinn) endpoints: TLS 1.3 with client certificates, ALPN `postern/1`.
//!
//! quinn sends no keep-alives by default; agents sit behind NAT, so both ends send one every
//! [`Liveness::keep_alive`] and give up on a silent peer after the idle timeout. The application
//! heartbeat on the control stream is what detects a dead agent promptly; the idle timeout is the
//! backstop for sessions without a control stream (`connect` clients, which therefore dial with
//! [`Liveness::CONNECT`]).
//!
//! # Stateless resets
//!
//! A QUIC endpoint that receives a packet for a connection it does not know answers with a
//! *stateless reset*, which ends that connection at once on the other side, but only if the
//! reset carries the token the endpoint handed out for it, computed from a secret key. quinn
//! draws that key at random per process (and the key it checks connection IDs with, so that it
//! would not even recognise the old IDs as its own), so a relay restarted on the same address
//! could not reset the sessions of its previous life: their clients waited for the idle timeout.
//! The relay's keys are therefore derived from its own private key (HKDF-SHA256), which is the
//! same after a restart: old sessions end as soon as they next send something.
//!
//! # Refusals
//!
//! Every handshake gets its own TLS config whose verifier notes why it refused a certificate
//! ([`tls::Note`]): quinn reports a TLS failure only as an alert code, and the note carries the
//! rest (which CA issued the certificate, which one was expected).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;

use super::{CloseReason, ConnectError, Failure, Inner, Liveness, Session, TransportError};
use crate::tls::{self, ClientTls, Material, Note, RefusedBy, ServerTls, TlsError, TlsFailure};

/// How many streams a peer may have open at once on one session.
pub const MAX_STREAMS: u32 = 16_384;

/// Per-connection receive window: what all streams of one session may hold unread together.
pub const RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// The HKDF `info` for the stateless-reset key; a new value gives every relay a new key.
const RESET_KEY_INFO: &[u8] = b"postern quic stateless reset key v1";
/// The HKDF `info` for the key connection IDs are checked with.
const CID_KEY_INFO: &[u8] = b"postern quic connection id key v1";

/// Transport parameters shared by both ends.
fn transport(liveness: Liveness) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(liveness.keep_alive));
    t.max_idle_timeout(IdleTimeout::try_from(liveness.idle_timeout).ok());
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Per-stream and per-connection windows: large enough for a fast bulk transfer on a LAN or
    // loopback, bounded so that a stalled reader costs at most this much memory.
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(RECEIVE_WINDOW));
    t.send_window(u64::from(RECEIVE_WINDOW));
    t
}

/// The endpoint settings of a relay: a stateless-reset key, and the key that connection IDs are
/// checked with, both derived from its private key, so that they stay the same across restarts
/// (see the module docs). Both matter: an endpoint answers a packet for an unknown connection
/// only if its connection ID passes the check, and the peer accepts the reset only if it carries
/// the token for that ID.
pub fn endpoint_config(material: &Material) -> EndpointConfig {
    use ring::hkdf;

    /// An HKDF output of `0` bytes.
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    let secret = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(material.key.secret_der());
    let reset: ring::hmac::Key = secret
        .expand(&[RESET_KEY_INFO], ring::hmac::HMAC_SHA256)
        // Only fails for an output longer than 255 hashes; these are one hash and 8 bytes.
        .expect("hkdf output of one hash length")
        .into();
    let mut cid_key = [0u8; 8];
    secret
        .expand(&[CID_KEY_INFO], Len(cid_key.len()))
        .and_then(|okm| okm.fill(&mut cid_key))
        .expect("hkdf output of 8 bytes");
    let cid_key = u64::from_be_bytes(cid_key);
    let mut cfg = EndpointConfig::new(Arc::new(reset));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// A relay's QUIC endpoint, accepting agents and clients.
#[derive(Clone, Debug)]
pub struct Server {
    endpoint: Endpoint,
    /// The transport settings and the TLS of new handshakes; [`Server::renew`] replaces the
    /// TLS (a renewed certificate) for every clone at once.
    current: Arc<std::sync::RwLock<(quinn::ServerConfig, ServerTls)>>,
}

/// A server endpoint on `addr` that accepts agents and clients; a peer silent for
/// `idle_timeout` is gone.
pub fn server(
    addr: SocketAddr,
    material: &Material,
    idle_timeout: Duration,
) -> Result<Server, EndpointError> {
    let tls = ServerTls::link(material)?;
    let config = server_config(&tls, idle_timeout)?;
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| EndpointError::Bind(addr, e))?;
    let endpoint = Endpoint::new(
        endpoint_config(material),
        Some(config.clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| EndpointError::Bind(addr, e))?;
    Ok(Server {
        endpoint,
        current: Arc::new(std::sync::RwLock::new((config, tls))),
    })
}

fn server_config(
    tls: &ServerTls,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto = QuicServerConfig::try_from(tls.config(None)?)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport(Liveness::new(
        Liveness::AGENT.keep_alive,
        idle_timeout,
    ))));
    Ok(cfg)
}

impl Server {
    /// The endpoint: accept connections from it, close it, ask its address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// New handshakes use `material` (a renewed certificate, another CA); connections already
    /// up keep theirs. The endpoint's stateless-reset and connection-ID keys stay those of the
    /// key it started with until the process restarts: changing them under live connections
    /// would make the endpoint drop their packets.
    pub fn renew(&self, material: &Material) -> Result<(), EndpointError> {
        let tls = ServerTls::link(material)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut config = current.0.clone();
        config.crypto = Arc::new(QuicServerConfig::try_from(tls.config(None)?)?);
        self.endpoint.set_server_config(Some(config.clone()));
        *current = (config, tls);
        Ok(())
    }

    /// Completes an incoming connection and reads the peer's identity.
    pub async fn accept(&self, incoming: quinn::Incoming) -> Result<Session, TransportError> {
        let addr = incoming.remote_address();
        let fail = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let note = Note::new();
        let (mut cfg, tls) = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let tls = tls
            .config(Some(note.clone()))
            .map_err(|e| fail(ConnectError::Config(e)))?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| fail(ConnectError::QuicConfig(e)))?;
        cfg.crypto = Arc::new(crypto);
        let conn = match incoming.accept_with(Arc::new(cfg)) {
            Ok(connecting) => connecting.await,
            Err(e) => Err(e),
        }
        .map_err(|e| fail(handshake_error(&e, &note, None)))?;
        from_connection(conn)
    }
}

/// A dialling endpoint: an agent's or a `connect` client's.
#[derive(Clone, Debug)]
pub struct Client {
    endpoint: Endpoint,
    tls: ClientTls,
    transport: Arc<TransportConfig>,
}

/// A client endpoint bound to an ephemeral UDP port of the right address family for `for_addr`,
/// noticing a dead peer as `liveness` says.
pub fn client(
    for_addr: SocketAddr,
    material: &Material,
    liveness: Liveness,
) -> Result<Client, EndpointError> {
    let bind = if for_addr.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let tls = ClientTls::link(material)?;
    let transport = Arc::new(transport(liveness));
    let mut endpoint = Endpoint::client(bind).map_err(|e| EndpointError::Bind(bind, e))?;
    // For raw quinn use of the endpoint (tests that play a misbehaving peer).
    let mut default =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls.config(None))?));
    default.transport_config(transport.clone());
    endpoint.set_default_client_config(default);
    Ok(Client {
        endpoint,
        tls,
        transport,
    })
}

impl Client {
    /// The endpoint (its default config is the link's, without notes).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Dials `addr`, verifying the server as `server_name`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Session, TransportError> {
        let fail = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let note = Note::new();
        let crypto = QuicClientConfig::try_from(self.tls.config(Some(note.clone())))
            .map_err(|e| fail(ConnectError::QuicConfig(e)))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(self.transport.clone());
        let host = server_name.trim_start_matches('[').trim_end_matches(']');
        let conn = self
            .endpoint
            .connect_with(cfg, addr, host)
            .map_err(|e| fail(ConnectError::Quic(e)))?
            .await
            .map_err(|e| fail(handshake_error(&e, &note, Some(&self.tls))))?;
        // The server was verified by name; it carries no postern identity.
        Ok(Session {
            remote: conn.remote_address(),
            key_exchange: key_exchange(&conn),
            inner: Inner::Quic(conn, Arc::new(QuicState::dialled(&self.tls))),
            peer: None,
        })
    }
}

/// Why a handshake ended without a session: a refusal the verifier noted, a refusal by the peer
/// (completed with what we know of our own certificate), or how the connection ended.
fn handshake_error(e: &ConnectionError, note: &Note, ours: Option<&ClientTls>) -> ConnectError {
    let reason = match (e, note.take()) {
        (ConnectionError::TransportError(_), Some(noted)) => CloseReason::Tls(noted),
        _ => close_reason(e, &QuicState::default()),
    };
    match reason {
        CloseReason::Tls(f) => ConnectError::tls(match ours {
            Some(tls) => tls.explain(f),
            None => f,
        }),
        r @ CloseReason::Peer(_) => ConnectError::Refused(r),
        other => ConnectError::Closed(other),
    }
}

fn from_connection(conn: quinn::Connection) -> Result<Session, TransportError> {
    let chain = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
    let peer = match tls::peer_identity(chain.as_deref().map(|v| v.as_slice())) {
        Ok(p) => p,
        Err(e) => {
            conn.close(VarInt::from_u32(2), b"certificate has no postern identity");
            return Err(e.into());
        }
    };
    Ok(Session {
        remote: conn.remote_address(),
        key_exchange: key_exchange(&conn),
        inner: Inner::Quic(conn, Arc::default()),
        peer: Some(peer),
    })
}

/// The key exchange group of an established connection's handshake. quinn hands it out in its
/// handshake data only with its `__rustls-post-quantum-test` feature (which adds that field and
/// nothing else; see the workspace's Cargo.toml).
fn key_exchange(conn: &quinn::Connection) -> Option<rustls::NamedGroup> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .map(|d| d.negotiated_key_exchange_group)
}

/// Errors creating an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS material was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC crypto config could not be built.
    #[error("quic config: {0}")]
    Config(#[from] NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error("bind udp {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// What a QUIC session remembers beside quinn's connection.
#[derive(Debug, Default)]
pub(super) struct QuicState {
    /// The reason we gave when we closed it: quinn reports only "locally closed".
    local: OnceLock<String>,
    /// The CA that issued our certificate (dialling side), for a refusal that names it.
    ours: Option<String>,
}

impl QuicState {
    fn dialled(tls: &ClientTls) -> Self {
        Self {
            local: OnceLock::new(),
            ours: tls.issuer().map(str::to_owned),
        }
    }

    /// Remembers why we closed the session (the first reason counts).
    pub(super) fn closing(&self, reason: &str) {
        let _ = self.local.set(reason.to_owned());
    }
}

/// Why a QUIC connection ended.
pub(super) fn close_reason(e: &ConnectionError, state: &QuicState) -> CloseReason {
    let reason = match e {
        ConnectionError::ApplicationClosed(c) => {
            CloseReason::Peer(String::from_utf8_lossy(&c.reason).into_owned())
        }
        // TLS alerts arrive as crypto errors (0x100 + alert code).
        ConnectionError::ConnectionClosed(c) => {
            match TlsFailure::from_quic_code(u64::from(c.error_code), RefusedBy::Peer) {
                Some(f) => CloseReason::Tls(f),
                None => CloseReason::Peer(c.to_string()),
            }
        }
        ConnectionError::TransportError(t) => {
            match TlsFailure::from_quic_code(u64::from(t.code), RefusedBy::Us) {
                Some(f) => CloseReason::Tls(f),
                None => CloseReason::Failed(Failure::Quic(Arc::new(e.clone()))),
            }
        }
        ConnectionError::TimedOut => CloseReason::TimedOut { silent: None },
        ConnectionError::LocallyClosed => {
            CloseReason::Local(state.local.get().cloned().unwrap_or_default())
        }
        ConnectionError::Reset => CloseReason::Reset,
        ConnectionError::VersionMismatch | ConnectionError::CidsExhausted => {
            CloseReason::Failed(Failure::Quic(Arc::new(e.clone())))
        }
    };
    match reason {
        CloseReason::Tls(f) => CloseReason::Tls(f.with_our_issuer(state.ours.as_deref())),
        other => other,
    }
}
