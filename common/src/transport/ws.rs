//! The WebSocket transport: multiplexed streams over a WebSocket, for networks where only
//! HTTP(S) gets out (corporate proxies) or in (Cloud Foundry's router carries HTTP/1.1 WebSocket,
//! not UDP).
//!
//! Layers, outside in:
//!
//! ```text
//! TCP ─ [HTTP CONNECT proxy] ─ [outer TLS, wss only] ─ WebSocket (binary messages)
//!     ─ inner mutual TLS 1.3 (ALPN postern/1, the same as QUIC's) ─ yamux ─ streams
//! ```
//!
//! The outer TLS is whatever the network offers (it usually ends at a router or load balancer),
//! so it only keeps the path private. Authentication is the inner TLS, end to end between agent
//! and relay with the Postern CA, exactly as on QUIC: no router in between can impersonate
//! either side. After its handshake the relay sends [`READY`], so that `connect` only succeeds once
//! the relay has accepted our certificate (TLS 1.3 lets a client finish its handshake before the
//! server has checked the client certificate).
//!
//! Both ends send a WebSocket Ping every [`Liveness::keep_alive`] (by default every
//! [`DEFAULT_PING_INTERVAL`]) and give up on a peer that has been silent for
//! [`Liveness::idle_timeout`] (by default two intervals). This keeps idle connections alive
//! through proxies and load balancers and detects dead peers for sessions without an application
//! heartbeat.
//!
//! A session closed with a reason sends it as the WebSocket Close reason, so the peer's
//! [`Session::closed`] says why.
//!
//! tungstenite does the HTTP upgrade; the frames after it are read and written here (`frame`):
//! tungstenite's frame reader zero-fills its whole read buffer before every read, which was
//! most of what a small query cost.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;
use tracing::Instrument;

use super::addr::{RelayUrl, Scheme, authority};
use super::mux::{self, Link};
use super::proxy::{self, Proxy, ProxyError};
use super::{CloseReason, ConnectError, Failure, Inner, Liveness, Session, TransportError};
use crate::tls::{self, ClientTls, Material, Note, ServerTls, TlsFailure};

mod frame;

#[cfg(feature = "fuzzing")]
pub use frame::fuzz_frames;

pub use frame::FrameError;
use frame::{Decoder, Item, Role};

/// The relay's WebSocket path unless the URL names another.
pub use super::addr::DEFAULT_PATH;

/// How often each end pings; a peer silent for two intervals is dead.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);

/// How long `connect` may take from TCP connect to the relay's ready marker.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many streams one session may have open at once, both directions together (as on QUIC);
/// opening more waits until one ends.
pub const MAX_STREAMS: usize = mux::MAX_STREAMS;

/// How much memory all stream windows of one session may grow by beyond yamux's fixed initial
/// 256 KiB per stream. A stream whose reader stops holds at most those 256 KiB.
pub const EXTRA_WINDOW: usize = mux::EXTRA_WINDOW;

/// How much data one session may hold that no reader has taken yet; past it, the session stops
/// reading from the peer until readers catch up (as QUIC's connection window does).
pub const MAX_UNREAD: usize = mux::MAX_UNREAD;

/// How many streams the peer may open that have not been accepted yet; more are reset.
pub const ACCEPT_BACKLOG: usize = mux::ACCEPT_BACKLOG;

/// How long the relay waits for a client's inner TLS handshake after the upgrade.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the relay sends inside the inner TLS once it has accepted the client's identity, before
/// any yamux frame: "postern yamux, version 1".
pub const READY: &[u8; 8] = b"PSTNYMX1";

/// Bytes gathered into one WebSocket message: yamux writes 12-byte headers and 16 KiB bodies,
/// and TLS records of up to 16 KiB; one message per write would multiply the framing cost.
const MESSAGE_SIZE: usize = 64 * 1024;

/// How long a closing WebSocket waits for the peer's Close before it drops the connection.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);

/// The largest WebSocket frame, and message, accepted from a peer. Ours are at most
/// [`MESSAGE_SIZE`]; much larger ones are refused.
const MAX_MESSAGE: usize = 1024 * 1024;

/// How much is read from the connection at once; also the bound on what a session holds of
/// the peer's bytes before they go to the reader.
const READ_BUFFER: usize = 64 * 1024;

/// Reads start only with at least this much room left in the read buffer; with less, the
/// undecoded rest (under a control frame's size) moves to the front.
const MIN_READ: usize = 4 * 1024;

/// Room kept in front of the gathered bytes for the header of the frame they become.
const HEADROOM: usize = frame::MAX_HEADER;

/// The Close code we send: RFC 6455's normal closure.
const CLOSE_NORMAL: u16 = 1000;

/// How the agent (or a `connect` client) reaches a relay over WebSocket.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `ws://` or `wss://host[:port][/path]` (the path defaults to [`DEFAULT_PATH`]).
    pub url: RelayUrl,
    /// The name on the relay's certificate, checked by the inner TLS.
    pub server_name: String,
    /// The SNI and certificate name for the outer TLS (wss); default: the URL's host.
    pub sni: Option<String>,
    /// The `Host` header; default: the URL's host (and port, if not the default one).
    pub host_header: Option<String>,
    /// Extra request headers, e.g. `X-Cf-App-Instance: GUID:INDEX`.
    pub headers: Vec<(String, String)>,
    /// CAs for the outer TLS; default: the Postern CA roots of the [`Material`].
    pub outer_roots: Option<Arc<RootCertStore>>,
    /// An HTTP CONNECT proxy to go through.
    pub proxy: Option<Proxy>,
    /// How often to Ping, and how long a silent relay may take before the session ends.
    pub liveness: Liveness,
    /// Bound on the whole connect, up to the relay's ready marker.
    pub connect_timeout: Duration,
    /// Told of each stage the connect passes, to show where a connection breaks.
    pub progress: Option<Progress>,
}

/// A stage of [`connect`] that went through ([`ConnectOptions::progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reached {
    /// TCP is connected to `remote`: the relay (or the router before it), or the proxy.
    Tcp {
        /// The address connected to.
        remote: SocketAddr,
    },
    /// The proxy opened the CONNECT tunnel.
    Proxy,
    /// The outer TLS handshake (`wss://`) is done: the server's certificate was verified.
    OuterTls {
        /// Who the server's certificate is for.
        subject: Option<String>,
        /// Who issued it.
        issuer: Option<String>,
    },
    /// The HTTP server switched to the WebSocket protocol (`101`).
    Upgraded,
}

/// Where [`connect`] reports the stages it passes.
#[derive(Clone)]
pub struct Progress(Arc<dyn Fn(Reached) + Send + Sync>);

impl Progress {
    /// Calls `f` with each stage passed.
    pub fn new(f: impl Fn(Reached) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

impl ConnectOptions {
    /// Options with defaults for `url`, verifying the relay's inner certificate as `server_name`.
    pub fn new(url: RelayUrl, server_name: impl Into<String>) -> Self {
        Self {
            url,
            server_name: server_name.into(),
            sni: None,
            host_header: None,
            headers: Vec::new(),
            outer_roots: None,
            proxy: None,
            liveness: Liveness::pings(DEFAULT_PING_INTERVAL),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            progress: None,
        }
    }
}

/// How the relay runs accepted WebSocket sessions.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// How often to Ping, and how long a silent client may take before the session ends.
    pub liveness: Liveness,
    /// Bound on the inner TLS handshake after the upgrade.
    pub handshake_timeout: Duration,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        Self {
            liveness: Liveness::pings(DEFAULT_PING_INTERVAL),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// tungstenite's limits for the upgrade handshakes; the frames after it are ours
/// ([`frame`]), with the same limits.
fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// A connection that has switched to the WebSocket protocol, with whatever was read past the
/// HTTP upgrade: the frames that follow belong to the session.
pub struct Upgraded<S> {
    io: S,
    role: Role,
    /// Bytes read past the end of the HTTP head, the first of the peer's frames.
    tail: Bytes,
}

impl<S> Upgraded<S> {
    /// The server side of a connection that an HTTP stack (hyper, axum) upgraded: it hands over
    /// the bytes it read ahead through the stream itself.
    pub fn server(io: S) -> Self {
        Self {
            io,
            role: Role::Server,
            tail: Bytes::new(),
        }
    }
}

impl<S> std::fmt::Debug for Upgraded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded")
            .field("role", &self.role)
            .field("tail", &self.tail.len())
            .finish()
    }
}

/// Dials a relay over WebSocket and returns an authenticated session.
///
/// Fails unless the relay completed the inner mutual TLS handshake *and* accepted our identity.
/// An HTTP answer other than `101` is a [`TransportError::Rejected`] (a Cloud Foundry router
/// answers `400` with `X-Cf-Routererror: unknown_route` for an instance that does not exist).
pub async fn connect(
    opts: &ConnectOptions,
    material: &Material,
) -> Result<Session, TransportError> {
    let addr = opts.url.to_string();
    if opts.url.scheme == Scheme::Quic {
        return Err(TransportError::Connect {
            addr,
            source: ConnectError::NotWebsocket,
        });
    }
    let span = tracing::debug_span!("ws_connect", relay = %addr);
    match tokio::time::timeout(opts.connect_timeout, dial(opts, material).instrument(span)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Connect {
            addr,
            source: ConnectError::TimedOut(opts.connect_timeout),
        }),
    }
}

/// Runs the relay side of a session on an upgraded WebSocket (from hyper/axum via
/// [`Upgraded::server`], or from [`upgrade`]): inner TLS with a required client certificate, the
/// client's identity, then the multiplexer. `remote` is the client's address as the relay knows
/// it.
pub async fn accept<S>(
    ws: Upgraded<S>,
    remote: SocketAddr,
    material: &Material,
) -> Result<Session, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept_with(ws, remote, material, &AcceptOptions::default()).await
}

/// [`accept`] with explicit options.
pub async fn accept_with<S>(
    ws: Upgraded<S>,
    remote: SocketAddr,
    material: &Material,
    opts: &AcceptOptions,
) -> Result<Session, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |source| TransportError::Connect {
        addr: remote.to_string(),
        source,
    };
    let link = Link::new();
    let io = WsIo::new(ws, opts.liveness, link.clone());
    let note = Note::new();
    let cfg = ServerTls::link(material)
        .and_then(|t| t.config(Some(note.clone())))
        .map_err(|e| fail(ConnectError::Config(e)))?;
    let handshake = TlsAcceptor::from(Arc::new(cfg)).accept(io).into_fallible();
    let mut stream = match tokio::time::timeout(opts.handshake_timeout, handshake).await {
        Err(_) => return Err(fail(ConnectError::TimedOut(opts.handshake_timeout))),
        Ok(Err((e, mut io))) => {
            let e = tls::with_note(e, note.take());
            let source = match TlsFailure::from_io(&e) {
                Some(f) => {
                    io.refuse(&format!("tls handshake failed: {f}")).await;
                    ConnectError::tls(f)
                }
                None => {
                    io.refuse("tls handshake failed").await;
                    ConnectError::TlsIo(e)
                }
            };
            return Err(fail(source));
        }
        Ok(Ok(s)) => s,
    };
    let peer = match tls::peer_identity(stream.get_ref().1.peer_certificates()) {
        Ok(p) => p,
        Err(e) => {
            stream
                .get_mut()
                .0
                .refuse("certificate has no postern identity")
                .await;
            return Err(e.into());
        }
    };
    stream
        .write_all(READY)
        .await
        .map_err(|e| fail(ConnectError::Io(e)))?;
    stream
        .flush()
        .await
        .map_err(|e| fail(ConnectError::Io(e)))?;
    let key_exchange = stream.get_ref().1.negotiated_key_exchange_group();
    let span = tracing::info_span!("ws_session", remote = %remote, peer = %peer);
    Ok(Session {
        inner: Inner::Mux(mux::start(stream, yamux::Mode::Server, link, span)),
        peer: Some(peer),
        remote,
        key_exchange: key_exchange.map(|g| g.name()),
    })
}

/// The server side of the WebSocket handshake on an accepted connection (plain TCP, or TLS
/// already accepted on it), answering `404` unless the request is for `path`. For tests and for
/// relays without an HTTP stack; the relay proper upgrades through its HTTP router.
pub async fn upgrade<S>(stream: S, path: &str) -> Result<Upgraded<S>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fail = |e| TransportError::Connect {
        addr: "websocket client".into(),
        source: ConnectError::Upgrade(e),
    };
    let want = path.to_owned();
    // The refusal type is tungstenite's callback contract, large or not.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, resp: Response| {
        if req.uri().path() == want {
            Ok(resp)
        } else {
            let mut refusal = ErrorResponse::new(Some("not found\n".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        Recorded::new(stream),
        check,
        Some(websocket_config()),
    )
    .await
    .map_err(fail)?;
    ws.into_inner().upgraded(Role::Server).map_err(fail)
}

/// The client side of the WebSocket handshake on `stream`, with tungstenite.
async fn client_upgrade<R, S>(request: R, stream: S) -> Result<Upgraded<S>, tungstenite::Error>
where
    R: IntoClientRequest + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        Recorded::new(stream),
        Some(websocket_config()),
    )
    .await?;
    ws.into_inner().upgraded(Role::Client)
}

/// A stream that keeps a copy of what tungstenite reads during the upgrade, so that the bytes
/// it read past the HTTP head (and would keep in its own frame reader) go to ours.
struct Recorded<S> {
    io: S,
    seen: Vec<u8>,
}

impl<S> Recorded<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            seen: Vec::new(),
        }
    }

    /// Splits off what came after the HTTP head, found as tungstenite found it (httparse, with
    /// as many headers as tungstenite allows).
    fn upgraded(self, role: Role) -> Result<Upgraded<S>, tungstenite::Error> {
        let mut headers = [httparse::EMPTY_HEADER; 124];
        let parsed = match role {
            Role::Client => httparse::Response::new(&mut headers).parse(&self.seen),
            Role::Server => httparse::Request::new(&mut headers).parse(&self.seen),
        };
        match parsed {
            Ok(httparse::Status::Complete(head)) => Ok(Upgraded {
                io: self.io,
                role,
                tail: Bytes::copy_from_slice(&self.seen[head..]),
            }),
            Ok(httparse::Status::Partial) => Err(tungstenite::Error::Protocol(
                ProtocolError::HandshakeIncomplete,
            )),
            Err(e) => Err(tungstenite::Error::Protocol(ProtocolError::HttparseError(
                e,
            ))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.seen.extend_from_slice(&buf.filled()[start..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

async fn dial(opts: &ConnectOptions, material: &Material) -> Result<Session, TransportError> {
    let url = &opts.url;
    let addr = url.to_string();
    let fail = |source| TransportError::Connect {
        addr: addr.clone(),
        source,
    };
    let reached = |stage| {
        if let Some(p) = &opts.progress {
            (p.0)(stage);
        }
    };

    let (host, port) = match &opts.proxy {
        Some(p) => (p.host.as_str(), p.port),
        None => (url.host.as_str(), url.port),
    };
    let mut tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| match &opts.proxy {
            Some(p) => TransportError::Proxy(ProxyError::Io {
                proxy: p.to_string(),
                source: e,
            }),
            None => fail(ConnectError::Io(e)),
        })?;
    crate::net::tune(&tcp);
    let remote = tcp.peer_addr().map_err(|e| fail(ConnectError::Io(e)))?;
    reached(Reached::Tcp { remote });
    if let Some(p) = &opts.proxy {
        proxy::tunnel(&mut tcp, p, &url.host, url.port).await?;
        tracing::debug!(proxy = %p, "proxy tunnel open");
        reached(Reached::Proxy);
    }

    let outer = if url.scheme == Scheme::Wss {
        let cfg = outer_client(opts, material)
            .map_err(|e| fail(ConnectError::Config(tls::TlsError::Rustls(e))))?;
        let sni = opts.sni.as_deref().unwrap_or(&url.host);
        let name = tls::server_name(sni).map_err(|e| fail(ConnectError::Config(e)))?;
        let stream = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            // Not described as a link failure: the outer CA need not be the Postern CA.
            .map_err(|e| fail(ConnectError::OuterTls(e)))?;
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first());
        reached(Reached::OuterTls {
            subject: leaf.and_then(crate::pki::subject_name),
            issuer: leaf.and_then(crate::pki::issuer_name),
        });
        Either::Right(stream)
    } else {
        Either::Left(tcp)
    };

    let request = upgrade_request(opts).map_err(|e| fail(ConnectError::Request(e)))?;
    let ws = client_upgrade(request, outer)
        .await
        .map_err(|e| upgrade_error(&addr, e))?;
    tracing::debug!("websocket open");
    reached(Reached::Upgraded);

    let link = Link::new();
    let io = WsIo::new(ws, opts.liveness, link.clone());
    let client_tls = ClientTls::link(material).map_err(|e| fail(ConnectError::Config(e)))?;
    let note = Note::new();
    let cfg = client_tls.config(Some(note.clone()));
    let name = tls::server_name(&opts.server_name).map_err(|e| fail(ConnectError::Config(e)))?;
    let mut stream = match TlsConnector::from(Arc::new(cfg))
        .connect(name, io)
        .into_fallible()
        .await
    {
        Ok(s) => s,
        Err((e, mut io)) => {
            io.refuse("tls handshake failed").await;
            let e = tls::with_note(e, note.take());
            return Err(fail(match TlsFailure::from_io(&e) {
                Some(f) => ConnectError::tls(client_tls.explain(f)),
                None => ConnectError::TlsIo(e),
            }));
        }
    };
    let mut marker = [0u8; READY.len()];
    if let Err(e) = stream.read_exact(&mut marker).await {
        // TLS 1.3 lets us finish our handshake before the relay has checked our certificate: a
        // refusal arrives here, as an alert (the same one QUIC carries), or as the relay's Close.
        let why = match TlsFailure::from_io(&e) {
            Some(f) => CloseReason::Tls(client_tls.explain(f)),
            None => match link.peer_reason() {
                Some(r) => CloseReason::Peer(r),
                None => CloseReason::Failed(Failure::Io(Arc::new(e))),
            },
        };
        return Err(fail(ConnectError::Refused(why)));
    }
    if &marker != READY {
        stream.get_mut().0.refuse("unexpected answer").await;
        return Err(fail(ConnectError::NotPostern));
    }
    let key_exchange = stream.get_ref().1.negotiated_key_exchange_group();
    let span = tracing::info_span!("ws_session", relay = %addr, remote = %remote);
    Ok(Session {
        inner: Inner::Mux(mux::start(stream, yamux::Mode::Client, link, span)),
        peer: None,
        remote,
        key_exchange: key_exchange.map(|g| g.name()),
    })
}

/// The outer TLS client: HTTP/1.1 only (a WebSocket upgrade cannot run over h2 here), the
/// configured CAs or else the Postern CA, no client certificate (that is the inner TLS's job).
fn outer_client(
    opts: &ConnectOptions,
    material: &Material,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let roots = opts
        .outer_roots
        .clone()
        .unwrap_or_else(|| material.roots.clone());
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Headers the WebSocket handshake sets itself.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
];

/// An upgrade request that cannot be made from the [`ConnectOptions`].
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The URL does not make a WebSocket request.
    #[error("invalid websocket url {uri}: {source}")]
    Url {
        /// The URL.
        uri: String,
        /// Why not.
        #[source]
        source: tungstenite::Error,
    },
    /// A header the handshake sets itself.
    #[error("header {0:?} is set by the websocket handshake (use host_header for Host)")]
    Reserved(String),
    /// A header name that HTTP does not allow.
    #[error("invalid header name {0:?}")]
    Name(String),
    /// A header value that HTTP does not allow.
    #[error("invalid value for header {0}")]
    Value(String),
}

fn upgrade_request(opts: &ConnectOptions) -> Result<Request, RequestError> {
    let url = &opts.url;
    let scheme = match url.scheme {
        Scheme::Wss => Scheme::Wss,
        _ => Scheme::Ws,
    };
    let host_port = if Some(url.port) == scheme.default_port() {
        if url.host.contains(':') {
            format!("[{}]", url.host)
        } else {
            url.host.clone()
        }
    } else {
        authority(&url.host, url.port)
    };
    let path = if url.path.is_empty() {
        DEFAULT_PATH
    } else {
        &url.path
    };
    let uri = format!("{}://{host_port}{path}", scheme.as_str());
    let mut request = uri
        .as_str()
        .into_client_request()
        .map_err(|source| RequestError::Url {
            uri: uri.clone(),
            source,
        })?;
    let headers = request.headers_mut();
    if let Some(h) = &opts.host_header {
        let value = HeaderValue::from_str(h).map_err(|_| RequestError::Value("host".into()))?;
        headers.insert(header::HOST, value);
    }
    for (name, value) in &opts.headers {
        let name_lc = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&name_lc.as_str()) {
            return Err(RequestError::Reserved(name.clone()));
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| RequestError::Name(name.clone()))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| RequestError::Value(name.as_str().to_owned()))?;
        headers.append(name, value);
    }
    Ok(request)
}

fn upgrade_error(addr: &str, e: tungstenite::Error) -> TransportError {
    match e {
        tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| {
                    let text = String::from_utf8_lossy(b);
                    let text = text.trim();
                    match text.char_indices().nth(200) {
                        Some((i, _)) => format!("{}...", &text[..i]),
                        None => text.to_owned(),
                    }
                })
                .unwrap_or_default();
            TransportError::Rejected {
                addr: addr.to_owned(),
                status: response.status().as_u16(),
                router_error: response
                    .headers()
                    .get("x-cf-routererror")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body,
            }
        }
        other => TransportError::Connect {
            addr: addr.to_owned(),
            source: ConnectError::Upgrade(other),
        },
    }
}

/// A WebSocket as a byte stream: binary messages in, writes gathered into binary messages out.
/// Also runs the Ping liveness check and the close handshake that carries a session's reason.
pub(super) struct WsIo<S> {
    io: S,
    role: Role,
    decoder: Decoder,
    /// Read from the connection, not decoded yet.
    input: BytesMut,
    /// Written bytes gathered into the next Binary message, after [`HEADROOM`] bytes kept for
    /// its frame header.
    write: Vec<u8>,
    /// Whole frames on their way to the connection; `out[sent..]` is still to go.
    out: Vec<u8>,
    sent: usize,
    /// The payload of the latest Ping not answered yet (RFC 6455 lets the latest stand for all).
    pong: Option<Bytes>,
    /// Our Close is queued: no frame may follow it.
    close_sent: bool,
    /// The peer sent Close or the connection ended.
    eof: bool,
    link: Arc<Link>,
    live: Live,
    state: CloseState,
}

struct Live {
    /// When the next check is due; it wakes the task that polled the connection last.
    tick: Pin<Box<Sleep>>,
    period: Duration,
    /// The waker the tick holds (see [`WsIo::poll_live`]).
    waker: Option<Waker>,
    every: Liveness,
    last_seen: Instant,
    last_ping: Instant,
    ping_due: bool,
    dead: bool,
}

enum CloseState {
    Open,
    Closing {
        step: CloseStep,
        deadline: Pin<Box<Sleep>>,
    },
    Closed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CloseStep {
    /// Send what was written before closing (a graceful shutdown, e.g. a TLS alert).
    Flush,
    Send,
    FlushClose,
    /// Read until the peer's Close or end of connection.
    Drain,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    fn new(ws: Upgraded<S>, liveness: Liveness, link: Arc<Link>) -> Self {
        let every = Liveness::new(
            liveness.keep_alive.max(Duration::from_millis(10)),
            liveness.idle_timeout.max(Duration::from_millis(20)),
        );
        // Checked four times per keep-alive (or idle timeout, if shorter): a dead peer is noticed
        // within a quarter of that after the idle timeout.
        let period = every.keep_alive.min(every.idle_timeout) / 4;
        let now = Instant::now();
        let max = MAX_MESSAGE as u64;
        Self {
            io: ws.io,
            role: ws.role,
            decoder: Decoder::new(ws.role, max, max),
            input: BytesMut::from(&ws.tail[..]),
            write: vec![0; HEADROOM],
            out: Vec::new(),
            sent: 0,
            pong: None,
            close_sent: false,
            eof: false,
            link,
            live: Live {
                tick: Box::pin(tokio::time::sleep_until(now + period)),
                period,
                waker: None,
                every,
                last_seen: now,
                last_ping: now,
                ping_due: false,
                dead: false,
            },
            state: CloseState::Open,
        }
    }

    /// Refuses the peer: sends what is buffered (a TLS alert), then Close with `reason`.
    async fn refuse(&mut self, reason: &str) {
        tracing::debug!(reason, "refusing websocket peer");
        self.link.request_close(reason);
        self.begin_close(true);
        poll_fn(|cx| self.poll_closing(cx)).await;
    }

    fn begin_close(&mut self, flush_first: bool) {
        if matches!(self.state, CloseState::Open) {
            self.state = CloseState::Closing {
                step: if flush_first {
                    CloseStep::Flush
                } else {
                    CloseStep::Send
                },
                deadline: Box::pin(tokio::time::sleep(CLOSE_DRAIN)),
            };
        }
    }

    /// Drives the close handshake; `Ready` once the WebSocket is closed (or gave up).
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let CloseState::Closing { step, deadline } = &mut self.state else {
            return Poll::Ready(());
        };
        if deadline.as_mut().poll(cx).is_ready() {
            self.state = CloseState::Closed;
            return Poll::Ready(());
        }
        let mut step = *step;
        let done = loop {
            let failed = match step {
                CloseStep::Flush => {
                    if self.close_sent || !self.has_written() {
                        step = CloseStep::Send;
                        false
                    } else {
                        match self.poll_drain(cx) {
                            Poll::Pending => break false,
                            Poll::Ready(r) => {
                                self.seal();
                                step = CloseStep::Send;
                                r.is_err()
                            }
                        }
                    }
                }
                CloseStep::Send => {
                    // An abrupt close: whatever was not sent yet no longer matters (frames
                    // already queued are whole and go first).
                    self.write.truncate(HEADROOM);
                    self.pong = None;
                    self.live.ping_due = false;
                    if !self.close_sent {
                        let reason = self.link.local_reason().unwrap_or_default();
                        let payload =
                            frame::close_frame_payload(CLOSE_NORMAL, &truncate(&reason, 120));
                        self.send_control(frame::CLOSE, &payload);
                    }
                    step = CloseStep::FlushClose;
                    false
                }
                CloseStep::FlushClose => {
                    let r = match self.poll_drain(cx) {
                        Poll::Pending => break false,
                        Poll::Ready(Ok(())) => match Pin::new(&mut self.io).poll_flush(cx) {
                            Poll::Pending => break false,
                            Poll::Ready(r) => r,
                        },
                        Poll::Ready(Err(e)) => Err(e),
                    };
                    step = CloseStep::Drain;
                    r.is_err()
                }
                CloseStep::Drain => match self.poll_drain_peer(cx) {
                    Poll::Pending => break false,
                    Poll::Ready(()) => true,
                },
            };
            if failed {
                break true;
            }
        };
        if done {
            self.state = CloseState::Closed;
            return Poll::Ready(());
        }
        if let CloseState::Closing { step: s, .. } = &mut self.state {
            *s = step;
        }
        Poll::Pending
    }

    /// Reads and drops what the peer sends until its Close or the end of the connection.
    fn poll_drain_peer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut scratch = [0u8; 1024];
        loop {
            if self.eof {
                return Poll::Ready(());
            }
            let mut sink = ReadBuf::new(&mut scratch);
            match self.decoder.decode(&mut self.input, &mut sink) {
                Ok(Some(Item::Close(_))) | Err(_) => return Poll::Ready(()),
                Ok(Some(_)) => {}
                Ok(None) => match ready!(self.poll_fill(cx)) {
                    Ok(0) | Err(_) => return Poll::Ready(()),
                    Ok(_) => {}
                },
            }
        }
    }

    /// Sends a Ping when one is due and fails once the peer has been silent too long.
    fn poll_live(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.live.dead {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "peer timed out"));
        }
        // Called on every read, write and flush, so the timer is polled only when it fired or
        // another task polls us: polling it each time cost more than the rest of a small read.
        let same_task = self
            .live
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !same_task {
            self.live.waker = Some(cx.waker().clone());
        }
        // After a reset the loop polls the timer once more, which registers the waker again.
        let check = !same_task || self.live.tick.is_elapsed();
        while check && self.live.tick.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let period = self.live.period;
            self.live.tick.as_mut().reset(now + period);
            if self.link.paused() {
                // We are not reading (too much unread data): what the peer sent waits unread, so
                // its silence is ours.
                self.live.last_seen = now;
            }
            let silent = now.saturating_duration_since(self.live.last_seen);
            if silent >= self.live.every.idle_timeout {
                self.live.dead = true;
                tracing::debug!(
                    silent_ms = silent.as_millis() as u64,
                    "websocket peer is silent"
                );
                let why = CloseReason::TimedOut {
                    silent: Some(silent),
                };
                let e = io::Error::new(io::ErrorKind::TimedOut, why.to_string());
                self.link.set_failure(why);
                return Err(e);
            }
            if now.saturating_duration_since(self.live.last_ping) >= self.live.every.keep_alive {
                self.live.ping_due = true;
                self.live.last_ping = now;
            }
        }
        if self.live.ping_due || self.pong.is_some() {
            // Errors show up on the next read or write.
            if let Poll::Ready(Ok(())) = self.poll_drain(cx) {
                let _ = Pin::new(&mut self.io).poll_flush(cx);
            }
        }
        Ok(())
    }

    fn has_written(&self) -> bool {
        self.write.len() > HEADROOM
    }

    /// Writes the queued frames out, then the Pong and Ping that are due; `Ready(Ok)` once all
    /// went to the connection (not flushed).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.sent < self.out.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))
                    .map_err(|e| self.io_error(e))?;
                if n == 0 {
                    return Poll::Ready(Err(self.io_error(io::ErrorKind::WriteZero.into())));
                }
                self.sent += n;
                continue;
            }
            self.out.clear();
            self.sent = 0;
            if let Some(payload) = self.pong.take() {
                self.send_control(frame::PONG, &payload);
            } else if self.live.ping_due {
                self.live.ping_due = false;
                self.send_control(frame::PING, &[]);
            } else {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Queues a control frame after the frames already queued (none once our Close is).
    fn send_control(&mut self, opcode: u8, payload: &[u8]) {
        if self.close_sent {
            return;
        }
        self.close_sent = opcode == frame::CLOSE;
        frame::control(self.role, opcode, payload, &mut self.out);
    }

    /// Makes the gathered bytes one Binary frame and queues it; only once the queue is empty.
    fn seal(&mut self) {
        if !self.has_written() || self.close_sent || self.sent < self.out.len() {
            return;
        }
        let len = self.write.len() - HEADROOM;
        let mask = frame::new_mask(self.role);
        let (head, n) = frame::header(frame::BINARY, len, mask);
        let start = HEADROOM - n;
        self.write[start..HEADROOM].copy_from_slice(&head[..n]);
        if let Some(m) = mask {
            frame::apply_mask(&mut self.write[HEADROOM..], m, 0);
        }
        std::mem::swap(&mut self.write, &mut self.out);
        self.sent = start;
        self.write.clear();
        self.write.resize(HEADROOM, 0);
    }

    /// Sends the gathered bytes as one Binary message (once what is queued has gone).
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if self.close_sent {
            return Poll::Ready(Err(closed_error()));
        }
        self.seal();
        // Start sending now; what does not go out yet goes with the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more of the peer's bytes into `input`, never zero-filling the buffer first.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.input.capacity() - self.input.len() < MIN_READ {
            // What is left is under a control frame's size (the decoder took all it could), so
            // this moves it to the front of the same allocation.
            self.input
                .reserve(READ_BUFFER.saturating_sub(self.input.len()).max(MIN_READ));
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.input
        ))?;
        self.live.last_seen = Instant::now();
        Poll::Ready(Ok(n))
    }

    fn io_error(&self, e: io::Error) -> io::Error {
        let e = Arc::new(e);
        self.link
            .set_failure(CloseReason::Failed(Failure::Io(e.clone())));
        io::Error::new(e.kind(), Failure::Io(e))
    }

    fn frame_error(&self, e: FrameError) -> io::Error {
        let failure = match e {
            FrameError::Text => Failure::TextMessage,
            other => Failure::WebSocket(other),
        };
        self.link.set_failure(CloseReason::Failed(failure.clone()));
        io::Error::new(io::ErrorKind::InvalidData, failure)
    }

    /// Starts closing if the session asked for it; `Some` while closing or closed.
    fn poll_close_request(&mut self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        if matches!(self.state, CloseState::Open) {
            if !self.link.close_requested() {
                return None;
            }
            self.begin_close(false);
        }
        Some(self.poll_closing(cx))
    }
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
}

fn truncate(s: &str, max: usize) -> String {
    match s
        .char_indices()
        .take_while(|(i, c)| i + c.len_utf8() <= max)
        .last()
    {
        Some((i, c)) => s[..i + c.len_utf8()].to_owned(),
        None => String::new(),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(p) = this.poll_close_request(cx) {
            ready!(p);
            return Poll::Ready(Ok(()));
        }
        this.poll_live(cx)?;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.decoder.decode(&mut this.input, buf) {
                Ok(Some(Item::Data(_))) => return Poll::Ready(Ok(())),
                Ok(Some(Item::Ping(payload))) => {
                    this.pong = Some(payload);
                    // Answered now if the connection takes it, else with the next write.
                    if let Poll::Ready(Ok(())) = this.poll_drain(cx) {
                        let _ = Pin::new(&mut this.io).poll_flush(cx);
                    }
                }
                Ok(Some(Item::Pong)) => {}
                Ok(Some(Item::Close(frame))) => {
                    // Answer the Close now, echoing its code; nobody may write after this.
                    let (code, reason) = match frame {
                        Some((code, reason)) => (code.to_be_bytes().to_vec(), reason),
                        None => (Vec::new(), String::new()),
                    };
                    tracing::debug!(reason = %reason, "peer closed the websocket");
                    this.link.set_peer_reason(reason);
                    this.eof = true;
                    this.write.truncate(HEADROOM);
                    this.pong = None;
                    this.live.ping_due = false;
                    this.send_control(frame::CLOSE, &code);
                    if let Poll::Ready(Ok(())) = this.poll_drain(cx) {
                        let _ = Pin::new(&mut this.io).poll_flush(cx);
                    }
                }
                Err(e) => return Poll::Ready(Err(this.frame_error(e))),
                Ok(None) => match ready!(this.poll_fill(cx)) {
                    Ok(0) => {
                        this.link.set_failure(CloseReason::Failed(Failure::Eof));
                        this.eof = true;
                    }
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Err(this.io_error(e))),
                },
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// Gathers every slice that fits. rustls hands over queued records as several slices in one
    /// write, and its last write before it gives up on a handshake is the only one: taking just
    /// the first slice would lose the alert that tells the peer why.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(p) = this.poll_close_request(cx) {
            ready!(p);
            return Poll::Ready(Err(closed_error()));
        }
        this.poll_live(cx)?;
        if this.close_sent {
            return Poll::Ready(Err(closed_error()));
        }
        if this.write.len() - HEADROOM >= MESSAGE_SIZE {
            ready!(this.poll_send_buffered(cx))?;
        }
        if this.write.capacity() < HEADROOM + MESSAGE_SIZE {
            this.write
                .reserve_exact(HEADROOM + MESSAGE_SIZE - this.write.len());
        }
        let mut n = 0;
        for buf in bufs {
            let k = buf.len().min(HEADROOM + MESSAGE_SIZE - this.write.len());
            this.write.extend_from_slice(&buf[..k]);
            n += k;
            if k < buf.len() {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(p) = this.poll_close_request(cx) {
            ready!(p);
            return Poll::Ready(Err(closed_error()));
        }
        this.poll_live(cx)?;
        if this.has_written() {
            ready!(this.poll_send_buffered(cx))?;
        }
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx)).map_err(|e| this.io_error(e))?;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.begin_close(true);
        ready!(this.poll_closing(cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
