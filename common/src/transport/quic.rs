//! QUIC (quinn) endpoints: TLS 1.3 with client certificates, ALPN `postern/1`.
//!
//! quinn sends no keep-alives by default; agents sit behind NAT, so both ends send one every
//! [`KEEP_ALIVE`] and give up on a silent peer after the idle timeout. The application
//! heartbeat on the control stream is what detects a dead agent promptly; the idle timeout is the
//! backstop for sessions without a control stream (`connect` clients).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;

use super::{Inner, Session, TransportError};
use crate::tls::{self, Material, TlsError};

/// How often an idle QUIC connection sends a keep-alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// How many streams a peer may have open at once on one session.
pub const MAX_STREAMS: u32 = 16_384;

/// Transport parameters shared by both ends.
fn transport(idle_timeout: Duration) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(IdleTimeout::try_from(idle_timeout).ok());
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Per-stream and per-connection windows: large enough for a fast bulk transfer on a LAN or
    // loopback, bounded so that a stalled reader costs at most this much memory.
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t
}

/// A server endpoint that accepts agents and clients.
pub fn server(
    addr: SocketAddr,
    material: &Material,
    idle_timeout: Duration,
) -> Result<Endpoint, EndpointError> {
    let tls = tls::link_server(material)?;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport(idle_timeout)));
    Endpoint::server(cfg, addr).map_err(|e| EndpointError::Bind(addr, e))
}

/// A client endpoint bound to an ephemeral UDP port of the right address family.
pub fn client(
    for_addr: SocketAddr,
    material: &Material,
    idle_timeout: Duration,
) -> Result<Endpoint, EndpointError> {
    let bind: SocketAddr = if for_addr.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let tls = tls::link_client(material)?;
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport(idle_timeout)));
    let mut ep = Endpoint::client(bind).map_err(|e| EndpointError::Bind(bind, e))?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Dials `addr`, verifying the server as `server_name`.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Session, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let host = server_name.trim_start_matches('[').trim_end_matches(']');
    let conn = endpoint
        .connect(addr, host)
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(describe(&e)))?;
    // The server was verified by name; it carries no postern identity.
    Ok(Session {
        remote: conn.remote_address(),
        inner: Inner::Quic(conn),
        peer: None,
    })
}

/// Completes an incoming connection and reads the peer's identity.
pub async fn accept(incoming: quinn::Incoming) -> Result<Session, TransportError> {
    let addr = incoming.remote_address();
    let conn = incoming.await.map_err(|e| TransportError::Connect {
        addr: addr.to_string(),
        reason: describe(&e),
    })?;
    from_connection(conn)
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
        inner: Inner::Quic(conn),
        peer: Some(peer),
    })
}

/// Errors creating an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS material was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC crypto config could not be built.
    #[error("quic config: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("bind udp {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

pub(super) fn closed(e: ConnectionError) -> TransportError {
    TransportError::Closed(describe(&e))
}

/// Says why a QUIC connection ended, in words an operator can act on.
pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            if reason.is_empty() {
                "closed by peer".into()
            } else {
                format!("closed by peer: {reason}")
            }
        }
        ConnectionError::ConnectionClosed(c) => {
            // TLS alerts arrive as crypto errors (0x100 + alert code).
            let code = u64::from(c.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = rustls::AlertDescription::from((code - 0x100) as u8);
                format!("peer refused the TLS handshake: {alert:?}")
            } else {
                format!("closed by peer: {c}")
            }
        }
        ConnectionError::TransportError(t) => humanize(&format!("tls/quic error: {t}")),
        ConnectionError::TimedOut => "timed out: no answer from peer".into(),
        ConnectionError::LocallyClosed => "closed locally".into(),
        ConnectionError::Reset => "reset by peer".into(),
        other => other.to_string(),
    }
}

/// Rewrites rustls' certificate error names into words an operator understands.
pub fn humanize(reason: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        (
            "UnknownIssuer",
            "certificate is not signed by the postern CA (unknown issuer)",
        ),
        (
            "BadSignature",
            "certificate signature does not verify (signed by another CA?)",
        ),
        ("ExpiredContext", "certificate has expired"),
        ("Expired", "certificate has expired"),
        ("NotValidYet", "certificate is not valid yet"),
        (
            "NotValidForName",
            "certificate is not valid for the name dialled",
        ),
        ("Revoked", "certificate has been revoked"),
        (
            "peer sent no certificates",
            "client presented no certificate",
        ),
    ];
    for (from, to) in WORDS {
        if let Some(i) = reason.find(from) {
            // Keep the prefix (where it failed), replace the detail.
            let head = reason[..i].trim_end_matches([' ', ':']);
            return format!("{head}: {to}");
        }
    }
    reason.to_owned()
}
