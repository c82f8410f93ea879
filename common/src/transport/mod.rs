//! Transports between agents, `connect` clients and the relay.
//!
//! Everything above this module is written against two types: a [`Session`] (one authenticated
//! connection to a peer, which opens and accepts streams) and a [`Stream`] (one bidirectional
//! byte stream with half-close). Whether the session runs over QUIC ([`quic`]) or over yamux
//! inside a WebSocket ([`ws`]) is invisible above this line.
//!
//! A stream that is dropped without a clean [`AsyncWriteExt::shutdown`] is *reset*, so the peer
//! sees an error rather than a clean end: every byte arrives in order, or the stream fails loudly.
//! `common/tests/stream_contract.rs` checks this contract on both transports with the same tests.
//!
//! Errors are typed: a session ends with a [`CloseReason`] (closed by us or by the peer with a
//! reason, a TLS refusal, a timeout, a reset, a failure with its source), a connection attempt
//! fails with a [`ConnectError`]; their `Display` is what an operator reads. How fast a session
//! notices a dead peer is its [`Liveness`]. Relay URLs live in [`addr`].
//!
//! [`AsyncWriteExt::shutdown`]: tokio::io::AsyncWriteExt::shutdown

pub mod addr;
mod mux;
pub mod proxy;

/// See [`crate::fuzzing`].
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing {
    pub use super::mux::fuzz_headers as yamux_headers;
    pub use super::proxy::fuzz_answer as connect_answer;
    pub use super::ws::fuzz_frames as websocket_frames;
}
pub mod quic;
pub mod ws;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pki::Identity;
use crate::tls::{TlsError, TlsFailure};

/// Which transport a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// Multiplexed streams over a WebSocket.
    Websocket,
}

impl TransportKind {
    /// The name in logs, records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Websocket => "websocket",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a session notices that its peer is gone: how often an idle session sends something
/// (a QUIC keep-alive, a WebSocket Ping) and how long the peer may stay silent before the session
/// ends.
///
/// Agents keep the relaxed defaults: their control stream's heartbeat finds a dead relay within
/// two heartbeats anyway. A `connect` session has no heartbeat, so it uses [`Liveness::CONNECT`]
/// to notice a dead relay within about three seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often an idle session sends a keep-alive.
    pub keep_alive: Duration,
    /// How long the peer may be silent before the session ends.
    pub idle_timeout: Duration,
}

impl Liveness {
    /// Agents over QUIC: a keep-alive every 5 s (NAT bindings), a peer silent for 30 s is gone.
    pub const AGENT: Self = Self::new(Duration::from_secs(5), Duration::from_secs(30));
    /// `connect` sessions: a keep-alive every second, a relay silent for 2 s is gone. QUIC
    /// restarts its idle timer when it sends the first keep-alive after the peer fell silent, so
    /// a dead relay is noticed within keep-alive plus idle timeout: 3 s.
    pub const CONNECT: Self = Self::new(Duration::from_secs(1), Duration::from_secs(2));

    /// Keep-alive every `keep_alive`, give up after `idle_timeout` of silence.
    pub const fn new(keep_alive: Duration, idle_timeout: Duration) -> Self {
        Self {
            keep_alive,
            idle_timeout,
        }
    }

    /// A Ping every `interval`, give up after two intervals of silence (the WebSocket default).
    pub fn pings(interval: Duration) -> Self {
        Self::new(interval, interval.saturating_mul(2))
    }
}

/// Why a session ended. Its `Display` is the operator's wording ("closed by peer: ...").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloseReason {
    /// We closed it, for this reason.
    #[error("closed locally{}", with_reason(.0))]
    Local(String),
    /// The peer closed it, for this reason (empty if it gave none).
    #[error("closed by peer{}", with_reason(.0))]
    Peer(String),
    /// A TLS handshake failed: the peer refused ours, or we refused the peer's certificate.
    #[error(transparent)]
    Tls(TlsFailure),
    /// The peer was silent for too long.
    #[error("timed out: no answer from peer{}", .silent.map(|d| format!(" for {}ms", d.as_millis())).unwrap_or_default())]
    TimedOut {
        /// How long it had been silent, when known.
        silent: Option<Duration>,
    },
    /// The peer no longer knows the session (a QUIC stateless reset: it restarted).
    #[error("reset by peer (it restarted or lost the session)")]
    Reset,
    /// The connection under the session failed.
    #[error(transparent)]
    Failed(Failure),
}

fn with_reason(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// How the connection under a session failed, with the error that said so.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// The byte stream under a WebSocket session broke.
    #[error("connection lost: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The connection ended without a WebSocket Close.
    #[error("connection lost: closed without a websocket close")]
    Eof,
    /// The peer broke the WebSocket protocol.
    #[error("websocket error: {0}")]
    WebSocket(#[source] ws::FrameError),
    /// The peer sent a WebSocket text message, which is not our protocol.
    #[error("peer sent a websocket text message")]
    TextMessage,
    /// The stream multiplexer failed.
    #[error("connection failed: {0}")]
    Mux(#[source] Arc<yamux::ConnectionError>),
    /// The QUIC connection failed.
    #[error("connection failed: {0}")]
    Quic(#[source] Arc<quinn::ConnectionError>),
}

impl PartialEq for Failure {
    /// Failures compare by kind: the errors inside do not compare.
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Errors opening or accepting streams, and connecting sessions.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The session is closed.
    #[error("session closed: {0}")]
    Closed(#[source] CloseReason),
    /// Connecting to the peer (or accepting it) failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Where we tried to go (or who came).
        addr: String,
        /// What went wrong.
        #[source]
        source: ConnectError,
    },
    /// The peer's certificate carries no usable identity.
    #[error("peer identity: {0}")]
    Identity(#[from] crate::pki::PkiError),
    /// The HTTP server answered the WebSocket upgrade with something other than `101`.
    #[error("{addr} refused the websocket upgrade: http {status}{}{}",
        .router_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default(),
        if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Rejected {
        /// Where we tried to go.
        addr: String,
        /// The HTTP status.
        status: u16,
        /// Cloud Foundry's `X-Cf-Routererror` header (`unknown_route` for a missing instance).
        router_error: Option<String>,
        /// The start of the answer body.
        body: String,
    },
    /// The forward proxy could not be used.
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
}

impl TransportError {
    /// Why the session is closed, when that is the error.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match self {
            Self::Closed(r)
            | Self::Connect {
                source: ConnectError::Refused(r) | ConnectError::Closed(r),
                ..
            } => Some(r),
            _ => None,
        }
    }
}

impl ConnectError {
    /// A failed TLS handshake: ours when we refused the peer, a refusal when the peer refused us.
    pub fn tls(failure: TlsFailure) -> Self {
        match failure.by {
            crate::tls::RefusedBy::Us => Self::Tls(failure),
            crate::tls::RefusedBy::Peer => Self::Refused(CloseReason::Tls(failure)),
        }
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A socket operation failed (TCP connect, ...).
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The TLS handshake failed.
    #[error("tls handshake: {0}")]
    Tls(#[source] TlsFailure),
    /// The TLS handshake failed before it got to certificates.
    #[error("tls handshake: {0}")]
    TlsIo(#[source] io::Error),
    /// The outer TLS of a `wss://` connection failed (its CAs need not be the Postern CA's).
    #[error("outer tls: {0}")]
    OuterTls(#[source] io::Error),
    /// The TLS material or a server name is not usable.
    #[error("{0}")]
    Config(#[source] TlsError),
    /// The WebSocket upgrade failed (other than an HTTP refusal).
    #[error("websocket upgrade: {0}")]
    Upgrade(#[source] tokio_tungstenite::tungstenite::Error),
    /// The upgrade request cannot be made from the options.
    #[error(transparent)]
    Request(#[from] ws::RequestError),
    /// Not a WebSocket URL.
    #[error("not a websocket url: use ws:// or wss://")]
    NotWebsocket,
    /// The peer ended the session before accepting us.
    #[error("session refused: {0}")]
    Refused(#[source] CloseReason),
    /// The QUIC crypto config could not be built from the TLS config.
    #[error("quic config: {0}")]
    QuicConfig(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The answer after the TLS handshake was not a Postern relay's.
    #[error("unexpected answer after the tls handshake (not a postern relay?)")]
    NotPostern,
    /// No answer in time.
    #[error("timed out after {}ms", .0.as_millis())]
    TimedOut(Duration),
    /// quinn refused to start the connection.
    #[error("{0}")]
    Quic(#[source] quinn::ConnectError),
    /// The QUIC handshake ended without a session.
    #[error("{0}")]
    Closed(#[source] CloseReason),
}

/// One authenticated connection to a peer. Cheap to clone; all clones are the same session.
#[derive(Clone)]
pub struct Session {
    inner: Inner,
    /// The client's identity, on the accepting side; `None` on the dialling side, where the
    /// server was verified by name.
    peer: Option<Identity>,
    remote: SocketAddr,
    /// The key exchange group of the session's TLS handshake; `None` only for in-memory pairs.
    key_exchange: Option<rustls::NamedGroup>,
}

#[derive(Clone)]
enum Inner {
    Quic(quinn::Connection, Arc<quic::QuicState>),
    Mux(mux::Handle),
}

impl Session {
    /// The two ends of a session over an in-memory pipe (the WebSocket transport's multiplexer,
    /// without TLS or identities). For tests of the code above the transport, which can then
    /// run on a paused clock; it reports itself as a WebSocket session.
    pub fn memory_pair() -> (Self, Self) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let remote = SocketAddr::from(([127, 0, 0, 1], 0));
        let end = |io, mode, name: &'static str| Self {
            inner: Inner::Mux(mux::start(
                io,
                mode,
                mux::Link::new(),
                tracing::debug_span!("memory", end = name),
            )),
            peer: None,
            remote,
            key_exchange: None,
        };
        (
            end(a, yamux::Mode::Client, "client"),
            end(b, yamux::Mode::Server, "server"),
        )
    }

    /// Opens a new stream to the peer.
    pub async fn open(&self) -> Result<Stream, TransportError> {
        match &self.inner {
            Inner::Quic(c, local) => {
                let (send, recv) = c
                    .open_bi()
                    .await
                    .map_err(|e| TransportError::Closed(quic::close_reason(&e, local)))?;
                Ok(Stream::quic(send, recv))
            }
            Inner::Mux(m) => Ok(Stream::mux(m.open().await?)),
        }
    }

    /// Waits for the peer to open a stream. An error means the session is over.
    pub async fn accept(&self) -> Result<Stream, TransportError> {
        match &self.inner {
            Inner::Quic(c, local) => {
                let (send, recv) = c
                    .accept_bi()
                    .await
                    .map_err(|e| TransportError::Closed(quic::close_reason(&e, local)))?;
                Ok(Stream::quic(send, recv))
            }
            Inner::Mux(m) => Ok(Stream::mux(m.accept().await?)),
        }
    }

    /// Closes the session at once; open streams fail. The peer is told `reason`.
    pub fn close(&self, reason: &str) {
        match &self.inner {
            Inner::Quic(c, state) => {
                state.closing(reason);
                c.close(quinn::VarInt::from_u32(1), reason.as_bytes())
            }
            Inner::Mux(m) => m.close(reason),
        }
    }

    /// Waits until the session is closed, and says why.
    pub async fn closed(&self) -> CloseReason {
        match &self.inner {
            Inner::Quic(c, local) => quic::close_reason(&c.closed().await, local),
            Inner::Mux(m) => m.closed().await,
        }
    }

    /// Why the session is closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        match &self.inner {
            Inner::Quic(c, local) => c.close_reason().map(|e| quic::close_reason(&e, local)),
            Inner::Mux(m) => m.close_reason(),
        }
    }

    /// Whether the session is already closed.
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            Inner::Quic(c, _) => c.close_reason().is_some(),
            Inner::Mux(m) => m.is_closed(),
        }
    }

    /// The authenticated identity of the peer (accepting side only).
    pub fn peer(&self) -> Option<&Identity> {
        self.peer.as_ref()
    }

    /// The peer's network address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The name of the key exchange group the session's TLS handshake used (`X25519MLKEM768`
    /// between Postern peers, see [`crate::tls::kx`]), or `none` for an in-memory pair.
    pub fn key_exchange(&self) -> &'static str {
        self.key_exchange.map_or("none", crate::tls::kx::group_name)
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        match &self.inner {
            Inner::Quic(..) => TransportKind::Quic,
            Inner::Mux(_) => TransportKind::Websocket,
        }
    }

    /// A number that identifies this session within the process.
    pub fn id(&self) -> usize {
        match &self.inner {
            Inner::Quic(c, _) => c.stable_id(),
            Inner::Mux(m) => m.id(),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("remote", &self.remote)
            .field("kind", &self.kind())
            .field("key_exchange", &self.key_exchange())
            .finish()
    }
}

/// One bidirectional byte stream of a session.
pub struct Stream {
    inner: StreamInner,
}

enum StreamInner {
    Quic {
        send: quinn::SendStream,
        /// Set once the stream was finished cleanly; otherwise dropping it resets it.
        finished: bool,
        recv: quinn::RecvStream,
    },
    /// yamux streams are not split; [`mux::MuxStream`] resets on drop by itself.
    Mux(mux::MuxStream),
}

/// The application error code a reset stream carries.
const RESET_CODE: u32 = 1;

impl Stream {
    /// The transport of the session it belongs to.
    pub fn kind(&self) -> TransportKind {
        match self.inner {
            StreamInner::Quic { .. } => TransportKind::Quic,
            StreamInner::Mux(_) => TransportKind::Websocket,
        }
    }

    fn quic(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            inner: StreamInner::Quic {
                send,
                finished: false,
                recv,
            },
        }
    }

    fn mux(stream: mux::MuxStream) -> Self {
        Self {
            inner: StreamInner::Mux(stream),
        }
    }

    /// Fails the stream in both directions: the peer sees an error, not a clean end.
    pub fn abort(&mut self) {
        match &mut self.inner {
            StreamInner::Quic {
                send,
                finished,
                recv,
            } => {
                if !*finished {
                    let _ = send.reset(quinn::VarInt::from_u32(RESET_CODE));
                    *finished = true;
                }
                let _ = recv.stop(quinn::VarInt::from_u32(RESET_CODE));
            }
            StreamInner::Mux(m) => m.abort(),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let StreamInner::Quic {
            send,
            finished: false,
            ..
        } = &mut self.inner
        {
            let _ = send.reset(quinn::VarInt::from_u32(RESET_CODE));
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamInner::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            StreamInner::Mux(m) => Pin::new(m).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            StreamInner::Quic { send, .. } => {
                Pin::new(send).poll_write(cx, buf).map_err(io::Error::from)
            }
            StreamInner::Mux(m) => Pin::new(m).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamInner::Quic { send, .. } => Pin::new(send).poll_flush(cx),
            StreamInner::Mux(m) => Pin::new(m).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamInner::Quic { send, finished, .. } => {
                ready!(Pin::new(send).poll_shutdown(cx))?;
                *finished = true;
                Poll::Ready(Ok(()))
            }
            StreamInner::Mux(m) => Pin::new(m).poll_shutdown(cx),
        }
    }
}
