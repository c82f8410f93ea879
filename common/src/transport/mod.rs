//! Transports between agents, `connect` clients and the relay.
//!
//! Everything above this module is written against two types: a [`Session`] (one authenticated
//! connection to a peer, which opens and accepts streams) and a [`Stream`] (one bidirectional
//! byte stream with half-close). Whether the session runs over QUIC ([`quic`]) or over yamux
//! inside a WebSocket ([`ws`]) is invisible above this line.
//!
//! A stream that is dropped without a clean [`AsyncWriteExt::shutdown`] is *reset*, so the peer
//! sees an error rather than a clean end: every byte arrives in order, or the stream fails loudly.
//!
//! [`AsyncWriteExt::shutdown`]: tokio::io::AsyncWriteExt::shutdown

mod mux;
pub mod proxy;
pub mod quic;
pub mod ws;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pki::Identity;

/// Which transport a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// Multiplexed streams over a WebSocket.
    Websocket,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
            Self::Websocket => "websocket",
        })
    }
}

/// Errors opening or accepting streams.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The session is closed; the string says why.
    #[error("session closed: {0}")]
    Closed(String),
    /// Connecting to the peer failed.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// Where we tried to go.
        addr: String,
        /// What went wrong.
        reason: String,
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

/// One authenticated connection to a peer. Cheap to clone; all clones are the same session.
#[derive(Clone)]
pub struct Session {
    inner: Inner,
    /// The client's identity, on the accepting side; `None` on the dialling side, where the
    /// server was verified by name.
    peer: Option<Identity>,
    remote: SocketAddr,
}

#[derive(Clone)]
enum Inner {
    Quic(quinn::Connection),
    Mux(mux::Handle),
}

impl Session {
    /// Opens a new stream to the peer.
    pub async fn open(&self) -> Result<Stream, TransportError> {
        match &self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(quic::closed)?;
                Ok(Stream::quic(send, recv))
            }
            Inner::Mux(m) => Ok(Stream::mux(m.open().await?)),
        }
    }

    /// Waits for the peer to open a stream. An error means the session is over.
    pub async fn accept(&self) -> Result<Stream, TransportError> {
        match &self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.accept_bi().await.map_err(quic::closed)?;
                Ok(Stream::quic(send, recv))
            }
            Inner::Mux(m) => Ok(Stream::mux(m.accept().await?)),
        }
    }

    /// Closes the session at once; open streams fail.
    pub fn close(&self, reason: &str) {
        match &self.inner {
            Inner::Quic(c) => c.close(quinn::VarInt::from_u32(1), reason.as_bytes()),
            Inner::Mux(m) => m.close(reason),
        }
    }

    /// Waits until the session is closed, and says why.
    pub async fn closed(&self) -> String {
        match &self.inner {
            Inner::Quic(c) => quic::describe(&c.closed().await),
            Inner::Mux(m) => m.closed().await,
        }
    }

    /// Whether the session is already closed.
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            Inner::Quic(c) => c.close_reason().is_some(),
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

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        match &self.inner {
            Inner::Quic(_) => TransportKind::Quic,
            Inner::Mux(_) => TransportKind::Websocket,
        }
    }

    /// A number that identifies this session within the process.
    pub fn id(&self) -> usize {
        match &self.inner {
            Inner::Quic(c) => c.stable_id(),
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
