//! The front end's I/O: the connections it serves ([`Conn`]), one side of the connection phase
//! ([`Leg`]), a connection with bytes read ahead ([`Rewind`]) and a client reader that passes
//! commands through a [`CommandWatch`] ([`Watched`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::mysql::{Command, CommandWatch, MysqlError, Packet, PacketReader, Scan};
use crate::net;
use crate::protocol::{Code, Refusal};
use crate::transport::Stream;

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

impl<S: Conn + ?Sized> Conn for &mut S {
    fn fail(&mut self) {
        (**self).fail();
    }
}

/// Which side of a connection something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
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
pub(super) enum Failure {
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
    /// Which side caused it; `None` for a timeout (the client's, since only it is waited for
    /// under the handshake deadlines).
    pub(super) fn side(&self) -> Option<Side> {
        match self {
            Self::Timeout(_) => None,
            Self::Closed(side) | Self::Io { side, .. } | Self::Protocol { side, .. } => Some(*side),
        }
    }

    /// The refusal this is, for the events sink, when the client caused it (it timed out or
    /// broke the protocol); a client that went away is no refusal, and a backend failure is
    /// not the client's doing.
    pub(super) fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Timeout(_)
            | Self::Protocol {
                side: Side::Client, ..
            } => Some(Refusal::new(Code::BadRequest, self.to_string())),
            _ => None,
        }
    }
}

/// One side of a connection during the connection phase: its I/O and the bytes read ahead.
pub(super) struct Leg<S> {
    pub(super) io: S,
    reader: PacketReader,
    pub(super) buf: BytesMut,
    side: Side,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg<S> {
    pub(super) fn new(io: S, side: Side) -> Self {
        Self {
            io,
            reader: PacketReader::default(),
            buf: BytesMut::new(),
            side,
        }
    }

    /// Reads one packet.
    pub(super) async fn read(&mut self) -> Result<Packet, Failure> {
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
    pub(super) async fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
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
            if self.ahead.is_empty() {
                // Gives the allocation back: the connection may now be idle for hours.
                self.ahead = BytesMut::new();
            }
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

/// Judges one command packet (`packet`: the whole packet, header included): `Ok(None)` lets it
/// pass unchanged, `Ok(Some(bytes))` replaces it, `Err` refuses it.
pub(super) type Judgement = Result<Option<BytesMut>, Refusal>;

/// How much is read at a time into the watch's own buffer, which only ever holds the start of
/// a packet it must see more of (a header, the first bytes of a query, a held command).
const HELD_READ: usize = 512;

/// A client connection whose reads pass through a [`CommandWatch`]: a command that `judge`
/// refuses never comes out (the read fails instead and `refused` says why), and one it rewrites
/// comes out rewritten.
///
/// Bytes are read straight into the caller's buffer and scanned where they land, so a
/// connection that is watched costs a look at each packet header (and the first bytes of each
/// query) and no copy; only the start of a packet the watch must see more of is kept aside, and
/// an idle connection holds no buffer.
pub(super) struct Watched<S, J> {
    inner: S,
    watch: CommandWatch,
    /// Bytes read from the client that could not be handed on yet.
    held: BytesMut,
    /// Bytes ready to hand on (a replaced command, or held bytes that may now pass).
    ready: BytesMut,
    eof: bool,
    judge: J,
    pub(super) refused: Option<Refusal>,
}

impl<S, J> Watched<S, J> {
    pub(super) fn new(inner: S, watch: CommandWatch, ahead: BytesMut, judge: J) -> Self {
        Self {
            inner,
            watch,
            held: ahead,
            ready: BytesMut::new(),
            eof: false,
            judge,
            refused: None,
        }
    }
}

/// What scanning bytes found.
enum Found {
    /// All of them may pass.
    Passable,
    /// The first `at` may pass; what follows is handled.
    Stop(usize),
}

impl<S, J> Watched<S, J>
where
    J: Fn(&Command, &[u8]) -> Judgement,
{
    /// Scans `bytes` (which start at a point the watch has reached) and decides what passes:
    /// bytes that must wait or are replaced go to `held` and `ready`.
    fn scan(&mut self, bytes: &[u8]) -> Found {
        let mut pos = 0;
        while pos < bytes.len() {
            match self.watch.scan(&bytes[pos..]) {
                Ok(Scan::Pass(n)) => pos += n,
                Ok(Scan::Judge { command, len }) => {
                    let packet = &bytes[pos..pos + len];
                    match (self.judge)(&command, packet) {
                        Ok(None) => pos += len,
                        Ok(Some(rewritten)) => {
                            self.ready = rewritten;
                            self.held.extend_from_slice(&bytes[pos + len..]);
                            return Found::Stop(pos);
                        }
                        Err(r) => {
                            self.refused = Some(r);
                            return Found::Stop(pos);
                        }
                    }
                }
                Ok(Scan::NeedMore) => {
                    self.held.extend_from_slice(&bytes[pos..]);
                    return Found::Stop(pos);
                }
                Err(e) => {
                    self.refused = Some(Refusal::new(
                        Code::BadRequest,
                        format!("unreadable command: {e}"),
                    ));
                    return Found::Stop(pos);
                }
            }
        }
        Found::Passable
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
                if this.ready.is_empty() {
                    this.ready = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.refused.is_some() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "command refused by policy",
                )));
            }
            if !this.held.is_empty() || this.eof {
                if this.held.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // Bytes kept aside: scan them again, now that more may have arrived. What may
                // pass goes out first, then a replaced command; the rest stays held.
                let mut held = std::mem::take(&mut this.held);
                let at = match this.scan(&held) {
                    Found::Passable => held.len(),
                    Found::Stop(at) => at,
                };
                held.truncate(at);
                let replaced = std::mem::take(&mut this.ready);
                held.extend_from_slice(&replaced);
                this.ready = held;
                if this.ready.is_empty() && this.refused.is_none() {
                    if this.eof {
                        // The client ended mid-packet: the server sees the end too.
                        this.held = BytesMut::new();
                        return Poll::Ready(Ok(()));
                    }
                    this.held.reserve(HELD_READ);
                    let n = ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut this.inner),
                        cx,
                        &mut this.held
                    ))?;
                    if n == 0 {
                        this.eof = true;
                    }
                }
                continue;
            }
            // Nothing kept aside: read straight into the caller's buffer and scan it there.
            let start = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            let end = out.filled().len();
            if end == start {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
            match this.scan(&out.filled()[start..end]) {
                Found::Passable => return Poll::Ready(Ok(())),
                Found::Stop(at) => {
                    out.set_filled(start + at);
                    if at > 0 {
                        return Poll::Ready(Ok(()));
                    }
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
