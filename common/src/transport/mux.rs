//! Streams multiplexed with yamux over one authenticated byte stream (the inner TLS session of a
//! WebSocket), presented as a [`Session`](super::Session) and [`Stream`](super::Stream)s.
//!
//! yamux is poll-based: one driver task per connection polls
//! [`yamux::Connection::poll_next_inbound`], which also moves every outbound frame; new outbound
//! streams are asked for over a channel and made with `poll_new_outbound`; inbound streams go to
//! [`Handle::accept`] over another channel.
//!
//! # Clean end versus reset
//!
//! yamux on its own cannot say "failed": a stream reset by the peer reads as a clean end of
//! stream, and a stream dropped after the peer's half-close sends FIN, not RST. Our contract is
//! stricter (every byte in order, or a loud failure), so a [`Tap`] sits between yamux and the
//! byte stream. It reads the 12-byte yamux frame headers going by, without touching payloads:
//!
//! * inbound, it records per stream whether the peer's FIN or RST came first, so a read that
//!   yamux ends is a clean EOF only after a FIN, and an error otherwise (reset, or session lost);
//! * outbound, it inserts our own RST frames between frames when a stream is aborted or dropped
//!   without a clean shutdown, ahead of whatever yamux sends for it on drop; a stream that did
//!   finish its writes but stops reading is reset only after its FIN has gone out, so the peer
//!   still reads everything and only its further writes fail.
//!
//! # Memory
//!
//! yamux gives every stream a fixed initial window of 256 KiB that the peer may fill without
//! waiting for us, so with thousands of streams the windows alone would allow gigabytes of unread
//! data (and a connection window of `streams × 256 KiB`, which yamux insists on). Two bounds keep
//! a session's memory close to a QUIC session's 32 MiB receive window:
//!
//! * **Unread data, session-wide: [`MAX_UNREAD`].** The tap counts the payload of every data
//!   frame it hands to yamux for a live stream, and each stream counts what its reader takes out;
//!   a stream that goes away gives back what it left unread. While the session holds
//!   [`MAX_UNREAD`] or more, the tap stops reading the byte stream underneath, so the peer is
//!   held back by TCP (and the WebSocket) instead of by our memory; the first read that brings the
//!   count back under the bound resumes it. This is QUIC's connection-level flow control in
//!   effect: readers that stop hold the whole session's budget, and once they hold all of it the
//!   other streams wait too. With 256 KiB per stream that takes 128 stalled streams (QUIC, with
//!   4 MiB stream windows, stalls after 8). While the tap holds back, the peer's silence does not
//!   count against it (the WebSocket layer suspends its liveness check).
//! * **Streams not yet accepted: [`ACCEPT_BACKLOG`].** Inbound streams wait in a bounded queue
//!   for [`Handle::accept`]; one that arrives while the queue is full is reset at once. The stream
//!   count is bounded by [`MAX_STREAMS`] anyway; the backlog keeps a peer from parking thousands
//!   of streams that nobody asked for.
//!
//! A reader that stops therefore stalls its own stream after 256 KiB, and the session after
//! [`MAX_UNREAD`] in all; windows grow past 256 KiB only while readers keep up, and that growth
//! is capped at [`EXTRA_WINDOW`] for the whole connection.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tracing::Instrument;

use super::{CloseReason, Failure, TransportError};

/// How many streams one session may have open at once (both directions together). Opening
/// more waits until one ends, as QUIC does.
pub(super) const MAX_STREAMS: usize = 16_384;

/// yamux's own stream limit sits this far above ours: yamux counts a dropped stream until its
/// driver has sent the stream's last frame, and it ends the whole connection when its limit is
/// passed.
const STREAM_HEADROOM: usize = 1_024;

/// How far all stream windows together may grow beyond yamux's initial 256 KiB per stream.
pub(super) const EXTRA_WINDOW: usize = 32 * 1024 * 1024;

/// How much data the peer may have sent that no reader has taken yet, over all streams of a
/// session, before the session stops reading from the peer (see the module docs).
pub(super) const MAX_UNREAD: usize = 32 * 1024 * 1024;

/// How many streams the peer may have opened that [`Handle::accept`] has not taken yet; more are
/// reset.
pub(super) const ACCEPT_BACKLOG: usize = 1024;

/// How long a locally closed session may take to say goodbye before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// yamux frame header size and flags (see the yamux specification).
const HEADER_LEN: usize = 12;
const TYPE_DATA: u8 = 0;
const FLAG_SYN: u16 = 1;
const FLAG_FIN: u16 = 4;
const FLAG_RST: u16 = 8;

fn config() -> yamux::Config {
    let streams = MAX_STREAMS + STREAM_HEADROOM;
    let mut cfg = yamux::Config::default();
    // The window must be set first: yamux asserts window >= streams * 256 KiB at each call.
    cfg.set_max_connection_receive_window(Some(
        streams * yamux::DEFAULT_CREDIT as usize + EXTRA_WINDOW,
    ));
    cfg.set_max_num_streams(streams);
    cfg
}

/// Close requests and end reasons shared by a session's driver, its handles and the byte layer
/// underneath (the WebSocket adapter), which carries the reason to the peer.
#[derive(Default)]
pub(super) struct Link {
    close_requested: AtomicBool,
    /// The tap holds back reads (too much unread data): the peer's silence is our doing.
    paused: AtomicBool,
    state: Mutex<LinkState>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct LinkState {
    /// Why we closed.
    local: Option<String>,
    /// Why the peer closed (it said so).
    peer: Option<String>,
    /// What broke, when nobody closed.
    failure: Option<CloseReason>,
}

/// How the driver ended, besides a clean end of the connection.
enum DriveError {
    /// A local close took longer than [`CLOSE_GRACE`].
    CloseTimeout,
    /// yamux failed.
    Mux(yamux::ConnectionError),
}

impl Link {
    pub(super) fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for the session to close; the first reason is the one that counts.
    pub(super) fn request_close(&self, reason: &str) {
        {
            let mut st = self.lock();
            if st.local.is_none() {
                st.local = Some(reason.to_owned());
            }
        }
        self.close_requested.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub(super) fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    pub(super) fn local_reason(&self) -> Option<String> {
        self.lock().local.clone()
    }

    pub(super) fn set_peer_reason(&self, reason: String) {
        self.lock().peer.get_or_insert(reason);
    }

    pub(super) fn peer_reason(&self) -> Option<String> {
        self.lock().peer.clone()
    }

    pub(super) fn set_failure(&self, failure: CloseReason) {
        self.lock().failure.get_or_insert(failure);
    }

    /// Whether the tap is holding back reads, so the peer cannot be heard.
    pub(super) fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    fn wake(&self) {
        self.waker.wake();
    }

    /// Why the session ended.
    fn end_reason(&self, result: Result<(), DriveError>) -> CloseReason {
        let st = self.lock();
        if let Some(r) = &st.local {
            return CloseReason::Local(r.clone());
        }
        match (&st.peer, &st.failure, result) {
            (Some(r), _, _) => CloseReason::Peer(r.clone()),
            (None, Some(f), _) => f.clone(),
            (None, None, Ok(())) => CloseReason::Peer(String::new()),
            (None, None, Err(DriveError::CloseTimeout)) => CloseReason::Local(String::new()),
            (None, None, Err(DriveError::Mux(e))) => CloseReason::Failed(Failure::Mux(Arc::new(e))),
        }
    }
}

/// A running multiplexed session. Cheap to clone; all clones are the same session.
#[derive(Clone)]
pub(super) struct Handle(Arc<Shared>);

/// Owned by the session's handles and by its streams: while any of them lives the session stays
/// open; when the last one goes, the driver closes it.
struct Shared {
    core: Arc<Core>,
    opens: mpsc::UnboundedSender<OpenReply>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<MuxStream>>,
}

type OpenReply = oneshot::Sender<Result<MuxStream, CloseReason>>;

/// State shared by the driver, the tap and the streams (never by the channels' contents, so
/// that queued streams do not keep their own session alive).
struct Core {
    link: Arc<Link>,
    streams: Mutex<Streams>,
    /// Set when `Streams::inject` is not empty, so the tap checks without locking.
    inject_pending: AtomicBool,
    /// Live [`MuxStream`]s, for [`MAX_STREAMS`].
    live: AtomicUsize,
    /// Payload the peer sent to live streams that their readers have not taken (see the module
    /// docs).
    unread: AtomicUsize,
    closed: watch::Sender<Option<CloseReason>>,
}

#[derive(Default)]
struct Streams {
    map: HashMap<u32, Entry>,
    /// Streams to reset at the next frame boundary.
    inject: Vec<u32>,
}

#[derive(Default)]
struct Entry {
    peer: PeerEnd,
    /// The peer reset the stream, before or after its FIN: our writes fail.
    reset: bool,
    /// Our FIN has been written.
    fin_sent: bool,
    /// The stream is gone; reset it once its FIN has been written.
    reset_after_fin: bool,
    /// Payload that arrived for the stream while it had a reader (counted in `Core::unread`).
    arrived: usize,
    /// The stream's reader is gone: what arrives from now on is dropped by yamux, not counted.
    unread_released: bool,
}

/// How the peer's side of a stream ended, in the order its frames arrived.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum PeerEnd {
    #[default]
    Open,
    /// FIN came first: a clean end, whatever follows.
    Fin,
    /// RST came first: a failure.
    Reset,
}

/// Starts the driver task for a connection over `io` and returns its handle.
pub(super) fn start<T>(io: T, mode: yamux::Mode, link: Arc<Link>, span: tracing::Span) -> Handle
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let core = Arc::new(Core {
        link,
        streams: Mutex::default(),
        inject_pending: AtomicBool::new(false),
        live: AtomicUsize::new(0),
        unread: AtomicUsize::new(0),
        closed: watch::Sender::new(None),
    });
    // Boxed: yamux moves its whole connection state out and back on every poll, and the byte
    // stream underneath (a TLS session with its buffers) would be copied each time.
    let tap = Box::new(Tap::new(io, core.clone()));
    let conn = yamux::Connection::new(tap.compat(), config(), mode);
    let (opens, opens_rx) = mpsc::unbounded_channel();
    let (inbound_tx, inbound) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(drive(conn, core.clone(), opens_rx, inbound_tx).instrument(span));
    Handle(Arc::new(Shared {
        core,
        opens,
        inbound: tokio::sync::Mutex::new(inbound),
    }))
}

impl Handle {
    /// Opens a stream. The peer learns of it with the first byte written (or the shutdown).
    pub(super) async fn open(&self) -> Result<MuxStream, TransportError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let (tx, rx) = oneshot::channel();
        self.0.opens.send(tx).map_err(|_| self.closed_error())?;
        match rx.await {
            Ok(Ok(mut stream)) => {
                stream.session = Some(self.0.clone());
                Ok(stream)
            }
            Ok(Err(reason)) => Err(TransportError::Closed(reason)),
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Waits for a stream opened by the peer.
    pub(super) async fn accept(&self) -> Result<MuxStream, TransportError> {
        let mut inbound = self.0.inbound.lock().await;
        match inbound.recv().await {
            Some(mut stream) => {
                stream.session = Some(self.0.clone());
                Ok(stream)
            }
            None => Err(self.closed_error()),
        }
    }

    /// Closes the session at once; open streams fail. The peer is told `reason`.
    pub(super) fn close(&self, reason: &str) {
        self.0.core.link.request_close(reason);
    }

    /// Waits until the session has ended, and says why.
    pub(super) async fn closed(&self) -> CloseReason {
        let mut rx = self.0.core.closed.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The driver is gone without a word: it only ends after saying why, so this is a
            // local end.
            Err(_) => None,
        };
        reason.unwrap_or_else(|| self.local_end())
    }

    /// Why the session ended, or `None` while it runs (a requested close counts as ended).
    pub(super) fn close_reason(&self) -> Option<CloseReason> {
        self.0
            .core
            .closed_reason()
            .or_else(|| self.0.core.link.local_reason().map(CloseReason::Local))
    }

    fn local_end(&self) -> CloseReason {
        CloseReason::Local(self.0.core.link.local_reason().unwrap_or_default())
    }

    pub(super) fn is_closed(&self) -> bool {
        self.0.core.link.close_requested() || self.0.core.closed.borrow().is_some()
    }

    /// The address of the shared state: unique among live sessions, like quinn's stable id.
    pub(super) fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// Streams the tap still follows, live streams, and unread bytes (tests: nothing may
    /// outlive its stream).
    #[cfg(test)]
    pub(super) fn tracked(&self) -> (usize, usize, usize) {
        (
            self.0.core.lock().map.len(),
            self.0.core.live.load(Ordering::Acquire),
            self.0.core.unread.load(Ordering::Acquire),
        )
    }

    fn closed_error(&self) -> TransportError {
        TransportError::Closed(self.close_reason().unwrap_or_else(|| self.local_end()))
    }
}

async fn drive<T>(
    mut conn: yamux::Connection<Compat<Box<Tap<T>>>>,
    core: Arc<Core>,
    mut opens: mpsc::UnboundedReceiver<OpenReply>,
    inbound: mpsc::Sender<MuxStream>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut waiting: VecDeque<OpenReply> = VecDeque::new();
    let mut handles_alive = true;
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let result: Result<(), DriveError> = poll_fn(|cx| {
        core.link.register(cx.waker());
        while handles_alive {
            match opens.poll_recv(cx) {
                Poll::Ready(Some(reply)) => waiting.push_back(reply),
                Poll::Ready(None) => {
                    handles_alive = false;
                    core.link.request_close("session dropped");
                }
                Poll::Pending => break,
            }
        }
        if core.link.close_requested() {
            let d = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            let closing = CloseReason::Local(core.link.local_reason().unwrap_or_default());
            for reply in waiting.drain(..) {
                let _ = reply.send(Err(closing.clone()));
            }
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(DriveError::CloseTimeout));
            }
        }
        while let Some(reply) = waiting.front() {
            if reply.is_closed() {
                waiting.pop_front();
                continue;
            }
            // A full session makes opens wait (a dropped stream wakes us), as QUIC does: asking
            // yamux past its limit would end the whole connection.
            if core.live.load(Ordering::Acquire) >= MAX_STREAMS {
                break;
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    let stream = MuxStream::new(stream, &core, true);
                    if let Some(reply) = waiting.pop_front() {
                        // A caller that gave up drops the stream, which resets it.
                        let _ = reply.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(e)) => {
                    let failed = CloseReason::Failed(Failure::Mux(Arc::new(e)));
                    for reply in waiting.drain(..) {
                        let _ = reply.send(Err(failed.clone()));
                    }
                    break;
                }
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    let stream = MuxStream::new(stream, &core, false);
                    // Dropping a stream resets it: when nobody is left to accept, or too many
                    // wait to be accepted already.
                    if let Err(mpsc::error::TrySendError::Full(stream)) = inbound.try_send(stream) {
                        tracing::debug!(
                            stream = stream.id,
                            backlog = ACCEPT_BACKLOG,
                            "inbound stream reset: too many streams wait to be accepted"
                        );
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(DriveError::Mux(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    let reason = core.link.end_reason(result);
    tracing::debug!(reason = %reason, "websocket session ended");
    core.closed.send_replace(Some(reason.clone()));
    for reply in waiting {
        let _ = reply.send(Err(reason.clone()));
    }
    drop(inbound);
    drop(opens);
    drop(conn);
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closed_reason(&self) -> Option<CloseReason> {
        self.closed.borrow().clone()
    }

    /// Whether the tap should stop reading from the peer.
    fn over_budget(&self) -> bool {
        self.unread.load(Ordering::Acquire) >= MAX_UNREAD && !self.link.close_requested()
    }

    /// Payload arrived for live streams: `(stream, bytes)` pieces.
    fn on_payload(&self, pieces: &[(u32, usize)]) {
        let mut added = 0;
        let mut st = self.lock();
        for &(id, n) in pieces {
            if let Some(e) = st.map.get_mut(&id)
                && !e.unread_released
            {
                e.arrived += n;
                added += n;
            }
        }
        drop(st);
        self.unread.fetch_add(added, Ordering::AcqRel);
    }

    /// `n` unread bytes were read or given up; resumes reading from the peer when that brings the
    /// session back under [`MAX_UNREAD`].
    fn consumed(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self
            .unread
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or_default();
        if before >= MAX_UNREAD && before.saturating_sub(n) < MAX_UNREAD {
            self.link.wake();
        }
    }

    fn peer_end(&self, id: u32) -> Option<PeerEnd> {
        self.lock().map.get(&id).map(|e| e.peer)
    }

    fn was_reset(&self, id: u32) -> bool {
        self.lock().map.get(&id).is_some_and(|e| e.reset)
    }

    /// Notes a frame header read from the peer, before yamux sees the frame.
    fn on_inbound(&self, h: Header) {
        if h.stream == 0 || h.flags & (FLAG_SYN | FLAG_FIN | FLAG_RST) == 0 {
            return;
        }
        let mut st = self.lock();
        // yamux ignores a SYN that carries RST (it makes no stream), so no entry either: an entry
        // must only exist for a stream that a `MuxStream` will own and release.
        if h.flags & FLAG_SYN != 0 && h.flags & FLAG_RST == 0 {
            st.map.entry(h.stream).or_default();
        }
        if let Some(e) = st.map.get_mut(&h.stream) {
            if h.flags & FLAG_RST != 0 {
                e.reset = true;
            }
            if e.peer == PeerEnd::Open {
                if h.flags & FLAG_RST != 0 {
                    e.peer = PeerEnd::Reset;
                } else if h.flags & FLAG_FIN != 0 {
                    e.peer = PeerEnd::Fin;
                }
            }
        }
    }

    /// Notes a frame header we wrote; a FIN may release a deferred reset.
    fn on_outbound(&self, h: Header) {
        if h.stream == 0 || h.flags & FLAG_FIN == 0 {
            return;
        }
        let mut st = self.lock();
        let Some(e) = st.map.get_mut(&h.stream) else {
            return;
        };
        e.fin_sent = true;
        if e.reset_after_fin {
            st.map.remove(&h.stream);
            st.inject.push(h.stream);
            self.inject_pending.store(true, Ordering::Release);
        }
    }

    fn take_injections(&self) -> Vec<u32> {
        self.inject_pending.store(false, Ordering::Release);
        std::mem::take(&mut self.lock().inject)
    }

    /// A stream is gone (dropped or aborted) after its reader took `read` bytes: give back what
    /// it left unread, and decide whether the peer must see a reset.
    fn release(&self, id: u32, write_finished: bool, read: usize) {
        let mut st = self.lock();
        let Some(e) = st.map.get_mut(&id) else {
            return;
        };
        if !e.unread_released {
            e.unread_released = true;
            let left = e.arrived.saturating_sub(read);
            self.consumed(left);
        }
        let reset = match (write_finished, e.peer) {
            // The peer already failed the stream; nothing to tell it.
            (_, PeerEnd::Reset) => false,
            // We did not finish: the peer must not mistake this for a clean end.
            (false, _) => true,
            // Both directions ended cleanly (or the peer wrote its last byte).
            (true, PeerEnd::Fin) => false,
            // We finished, the peer may still be writing: fail its writes, but only after our
            // FIN, so that it still reads all we sent.
            (true, PeerEnd::Open) => {
                if !e.fin_sent {
                    e.reset_after_fin = true;
                    return;
                }
                true
            }
        };
        st.map.remove(&id);
        if reset {
            st.inject.push(id);
            self.inject_pending.store(true, Ordering::Release);
            drop(st);
            self.link.wake();
        }
    }
}

/// One multiplexed stream; see the module docs for how it ends.
pub(crate) struct MuxStream {
    /// `None` once aborted.
    inner: Option<Compat<yamux::Stream>>,
    id: u32,
    core: Arc<Core>,
    /// Keeps the session open while the stream is in use (set when handed out).
    session: Option<Arc<Shared>>,
    /// An outbound stream the peer has not heard of yet (yamux announces on the first frame).
    announce: bool,
    write_finished: bool,
    released: bool,
    /// Bytes the reader has taken, for the session's unread count.
    read: usize,
}

impl MuxStream {
    fn new(stream: yamux::Stream, core: &Arc<Core>, outbound: bool) -> Self {
        let id = stream.id().val();
        core.lock().map.entry(id).or_default();
        core.live.fetch_add(1, Ordering::AcqRel);
        Self {
            inner: Some(stream.compat()),
            id,
            core: core.clone(),
            session: None,
            announce: outbound,
            write_finished: false,
            released: false,
            read: 0,
        }
    }

    /// Fails the stream: the peer's reads fail unless we had finished writing (then it still
    /// reads all we sent, as with QUIC), and its writes fail.
    pub(crate) fn abort(&mut self) {
        if !self.released {
            self.released = true;
            self.core.release(self.id, self.write_finished, self.read);
        }
        self.inner = None;
    }

    /// The error for a stream that yamux ended without a FIN from the peer, or that can no
    /// longer be written.
    fn failure(&self) -> io::Error {
        if self.core.was_reset(self.id) {
            io::Error::new(io::ErrorKind::ConnectionReset, "stream reset by peer")
        } else {
            match self.core.closed_reason() {
                Some(r) => {
                    io::Error::new(io::ErrorKind::ConnectionAborted, TransportError::Closed(r))
                }
                None => io::Error::new(io::ErrorKind::ConnectionAborted, "session lost"),
            }
        }
    }

    fn parts(&mut self) -> io::Result<Pin<&mut Compat<yamux::Stream>>> {
        self.inner
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionAborted, "stream aborted"))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        if !self.released {
            self.core.release(self.id, self.write_finished, self.read);
        }
        // The yamux stream drops after this, so its own FIN or RST queues behind our reset.
        if self.core.live.fetch_sub(1, Ordering::AcqRel) >= MAX_STREAMS {
            // An open may be waiting for room.
            self.core.link.wake();
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if ready!(this.parts()?.poll_read(cx, buf)).is_err() {
            return Poll::Ready(Err(this.failure()));
        }
        let n = buf.filled().len() - before;
        if n == 0 && this.core.peer_end(this.id) != Some(PeerEnd::Fin) {
            return Poll::Ready(Err(this.failure()));
        }
        this.read += n;
        this.core.consumed(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match ready!(this.parts()?.poll_write(cx, buf)) {
            Ok(n) => {
                // Any frame yamux sends, even an empty one, carries the SYN.
                this.announce = false;
                Poll::Ready(Ok(n))
            }
            Err(_) => Poll::Ready(Err(this.failure())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(this.parts()?.poll_flush(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(this.failure())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_finished {
            return Poll::Ready(Ok(()));
        }
        if this.announce {
            // yamux would send a bare FIN for a stream the peer never saw, which the peer
            // ignores; an empty data frame announces the stream first.
            if ready!(this.parts()?.poll_write(cx, &[])).is_err() {
                return Poll::Ready(Err(this.failure()));
            }
            this.announce = false;
        }
        // yamux reports success for a stream the peer has reset; we report the reset.
        if ready!(this.parts()?.poll_shutdown(cx)).is_err() || this.core.was_reset(this.id) {
            return Poll::Ready(Err(this.failure()));
        }
        this.write_finished = true;
        Poll::Ready(Ok(()))
    }
}

/// A yamux frame header, as far as the tap cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u8,
    flags: u16,
    stream: u32,
    length: u32,
}

impl Header {
    fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            kind: b[1],
            flags: u16::from_be_bytes([b[2], b[3]]),
            stream: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    fn reset(stream: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[1] = TYPE_DATA;
        b[2..4].copy_from_slice(&FLAG_RST.to_be_bytes());
        b[4..8].copy_from_slice(&stream.to_be_bytes());
        b
    }
}

/// Follows frame boundaries in a yamux byte stream, whatever the chunking. Pure: never fails,
/// whatever the bytes (yamux itself rejects a bad stream).
#[derive(Debug, Default)]
struct FrameScan {
    header: [u8; HEADER_LEN],
    have: usize,
    /// Payload bytes of the current data frame still to skip.
    body: u32,
    /// The stream the current payload belongs to.
    body_stream: u32,
}

impl FrameScan {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.body == 0
    }

    fn scan(&mut self, bytes: &[u8], on_header: impl FnMut(Header)) {
        self.scan_payload(bytes, on_header, |_, _| {});
    }

    /// [`scan`](Self::scan), also telling `on_payload` how many payload bytes went by for which
    /// stream.
    fn scan_payload(
        &mut self,
        mut bytes: &[u8],
        mut on_header: impl FnMut(Header),
        mut on_payload: impl FnMut(u32, usize),
    ) {
        while !bytes.is_empty() {
            if self.body > 0 {
                let k = bytes.len().min(self.body as usize);
                bytes = &bytes[k..];
                self.body -= k as u32;
                on_payload(self.body_stream, k);
                continue;
            }
            let k = bytes.len().min(HEADER_LEN - self.have);
            self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
            self.have += k;
            bytes = &bytes[k..];
            if self.have == HEADER_LEN {
                self.have = 0;
                let h = Header::parse(&self.header);
                // Only data frames carry a payload; in the others `length` is a value.
                if h.kind == TYPE_DATA {
                    self.body = h.length;
                    self.body_stream = h.stream;
                }
                on_header(h);
            }
        }
    }
}

/// The frame headers (kind, flags, stream, length) and the payload bytes per stream that the
/// scanner finds in `bytes` delivered in pieces that end at `cuts` (sorted offsets).
#[cfg(feature = "fuzzing")]
#[allow(clippy::type_complexity)] // plain tuples, for a fuzz target to compare
pub fn fuzz_headers(bytes: &[u8], cuts: &[usize]) -> (Vec<(u8, u16, u32, u32)>, Vec<(u32, usize)>) {
    let mut scan = FrameScan::default();
    let (mut headers, mut payload) = (Vec::new(), Vec::<(u32, usize)>::new());
    let mut from = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let end = end.clamp(from, bytes.len());
        scan.scan_payload(
            &bytes[from..end],
            |h| headers.push((h.kind, h.flags, h.stream, h.length)),
            |stream, n| match payload.last_mut() {
                // Runs of one stream's payload are merged: chunking must not show.
                Some((s, total)) if *s == stream => *total += n,
                _ => payload.push((stream, n)),
            },
        );
        from = end;
    }
    (headers, payload)
}

/// Sits under yamux: watches frame headers both ways and injects resets (see module docs).
struct Tap<T> {
    io: T,
    core: Arc<Core>,
    inbound: FrameScan,
    outbound: FrameScan,
    inject: Vec<u8>,
    injected: usize,
    /// Payload pieces seen in one read (kept to reuse its allocation).
    payload: Vec<(u32, usize)>,
}

impl<T: AsyncWrite + Unpin> Tap<T> {
    fn new(io: T, core: Arc<Core>) -> Self {
        Self {
            io,
            core,
            inbound: FrameScan::default(),
            outbound: FrameScan::default(),
            inject: Vec::new(),
            injected: 0,
            payload: Vec::new(),
        }
    }

    /// Writes pending resets, only ever between two of yamux's frames.
    fn poll_inject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.injected < self.inject.len() {
                let n =
                    ready!(Pin::new(&mut self.io).poll_write(cx, &self.inject[self.injected..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.injected += n;
            }
            self.inject.clear();
            self.injected = 0;
            if !self.outbound.at_boundary() || !self.core.inject_pending.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            let ids = self.core.take_injections();
            if ids.is_empty() {
                return Poll::Ready(Ok(()));
            }
            for id in ids {
                tracing::trace!(stream = id, "resetting stream");
                self.inject.extend_from_slice(&Header::reset(id));
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let core = &this.core;
        // Too much unread: leave the peer's bytes where they are (see the module docs). A read
        // that brings the count down wakes the driver, whose waker this is.
        if core.over_budget() {
            core.link.register(cx.waker());
            core.link.paused.store(true, Ordering::Release);
            if core.over_budget() {
                return Poll::Pending;
            }
        }
        core.link.paused.store(false, Ordering::Release);
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let payload = &mut this.payload;
        this.inbound.scan_payload(
            &buf.filled()[before..],
            |h| core.on_inbound(h),
            |stream, n| match payload.last_mut() {
                Some((s, k)) if *s == stream => *k += n,
                _ => payload.push((stream, n)),
            },
        );
        if !payload.is_empty() {
            core.on_payload(payload);
            payload.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_inject(cx))?;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        let core = &this.core;
        this.outbound.scan(&buf[..n], |h| core.on_outbound(h));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // yamux flushes on every turn of its driver, so resets queued by a stream that was
        // dropped while the connection was idle go out here.
        this.core.link.register(cx.waker());
        ready!(this.poll_inject(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_inject(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u16, stream: u32, body: &[u8]) -> Vec<u8> {
        let mut v = vec![0, kind];
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn scan_finds_headers_across_any_chunking() {
        let mut bytes = frame(TYPE_DATA, FLAG_SYN, 1, &[7u8; 40]);
        // A window update's length is a credit, not a payload.
        let mut wu = frame(1, 0, 1, &[]);
        wu[8..12].copy_from_slice(&262_144u32.to_be_bytes());
        bytes.extend(wu);
        bytes.extend(frame(TYPE_DATA, FLAG_FIN, 1, b"last"));
        bytes.extend(frame(2, 0, 0, &[]));
        let expect = |b: &[u8]| {
            let mut s = FrameScan::default();
            let mut got = Vec::new();
            s.scan(b, |h| got.push((h.kind, h.flags, h.stream)));
            (got, s.at_boundary())
        };
        let (whole, boundary) = expect(&bytes);
        assert_eq!(
            whole,
            vec![
                (TYPE_DATA, FLAG_SYN, 1),
                (1, 0, 1),
                (TYPE_DATA, FLAG_FIN, 1),
                (2, 0, 0)
            ]
        );
        assert!(boundary);
        for step in 1..20 {
            let mut s = FrameScan::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(step) {
                s.scan(chunk, |h| got.push((h.kind, h.flags, h.stream)));
            }
            assert_eq!(got, whole, "chunks of {step}");
        }
        let mut s = FrameScan::default();
        s.scan(&bytes[..5], |_| {});
        assert!(!s.at_boundary());
        s.scan(&bytes[5..20], |_| {});
        assert!(!s.at_boundary(), "inside a payload");
    }

    #[test]
    fn reset_frames_encode_as_yamux_expects() {
        let b = Header::reset(0x0102_0304);
        assert_eq!(b, [0, 0, 0, 8, 1, 2, 3, 4, 0, 0, 0, 0]);
        let h = Header::parse(&b);
        assert_eq!(
            (h.kind, h.flags, h.stream, h.length),
            (0, FLAG_RST, 0x0102_0304, 0)
        );
    }

    #[test]
    fn the_config_is_accepted_by_yamux() {
        // yamux asserts on inconsistent limits; this would panic.
        let _ = config();
    }

    /// A session over one end of an in-memory pipe, and the other end for a raw peer that writes
    /// yamux frames as it likes (not as a well-behaved yamux would).
    fn raw_peer() -> (Handle, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let handle = start(
            ours,
            yamux::Mode::Server,
            Link::new(),
            tracing::Span::none(),
        );
        (handle, theirs)
    }

    /// Reads frames from the raw peer's end, collecting the streams reset.
    fn collect_resets(
        mut r: tokio::io::ReadHalf<tokio::io::DuplexStream>,
        resets: Arc<Mutex<Vec<u32>>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut scan = FrameScan::default();
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                scan.scan(&buf[..n], |h| {
                    if h.flags & FLAG_RST != 0 {
                        resets.lock().unwrap().push(h.stream);
                    }
                });
            }
        })
    }

    #[tokio::test]
    async fn streams_past_the_accept_backlog_are_reset() {
        use tokio::io::AsyncWriteExt;
        let (session, peer) = raw_peer();
        let (r, mut w) = tokio::io::split(peer);
        let resets = Arc::new(Mutex::new(Vec::new()));
        let reader = collect_resets(r, resets.clone());
        let extra = 10;
        let ids: Vec<u32> = (0..(ACCEPT_BACKLOG + extra) as u32)
            .map(|i| 2 * i + 1)
            .collect();
        for id in &ids {
            w.write_all(&frame(TYPE_DATA, FLAG_SYN, *id, b"x"))
                .await
                .unwrap();
        }
        w.flush().await.unwrap();
        // The streams nobody had room for are reset...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let reset = || {
            // Ours first, then yamux's own for the dropped stream.
            let mut r = resets.lock().unwrap().clone();
            r.dedup();
            r
        };
        while reset().len() < extra {
            assert!(tokio::time::Instant::now() < deadline, "no resets");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(reset(), ids[ACCEPT_BACKLOG..]);
        // ...and the first ones wait to be accepted, intact.
        for id in &ids[..ACCEPT_BACKLOG] {
            let mut s = session.accept().await.unwrap();
            assert_eq!(s.id, *id);
            let mut x = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut x)
                .await
                .unwrap();
            assert_eq!(&x, b"x");
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(100), session.accept())
                .await
                .is_err()
        );
        session.close("done");
        reader.abort();
    }

    #[tokio::test]
    async fn a_peer_is_held_back_once_the_session_holds_max_unread() {
        use tokio::io::AsyncWriteExt;
        let (session, peer) = raw_peer();
        let (r, mut w) = tokio::io::split(peer);
        let reader = collect_resets(r, Arc::default());
        // 400 streams, each filling the 256 KiB it may send unasked: 100 MiB that nobody reads.
        let written = Arc::new(AtomicUsize::new(0));
        let progress = written.clone();
        let writer = tokio::spawn(async move {
            let chunk = vec![5u8; 16 * 1024];
            for round in 0..16 {
                for i in 0..400u32 {
                    let flags = if round == 0 { FLAG_SYN } else { 0 };
                    let f = frame(TYPE_DATA, flags, 2 * i + 1, &chunk);
                    w.write_all(&f).await.unwrap();
                    progress.fetch_add(chunk.len(), Ordering::Relaxed);
                }
            }
            w
        });
        // Wait until the writer stops making progress.
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = written.load(Ordering::Relaxed);
            if now == last || writer.is_finished() {
                break;
            }
            last = now;
        }
        let held = session.tracked().2;
        let sent = written.load(Ordering::Relaxed);
        assert!(!writer.is_finished(), "the peer sent all of its 100 MiB");
        assert!(
            (MAX_UNREAD..MAX_UNREAD + 64 * 1024).contains(&held),
            "{held} bytes held"
        );
        // What the peer got rid of: what we hold, the pipe, and one frame.
        assert!(
            sent <= MAX_UNREAD + 128 * 1024,
            "the peer wrote {sent} bytes"
        );
        // Dropping the unread streams gives the budget back, and the peer goes on.
        let mut accepted = Vec::new();
        while let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(100), session.accept()).await
        {
            accepted.push(s);
        }
        drop(accepted);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while written.load(Ordering::Relaxed) == sent {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the peer stayed blocked"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        session.close("done");
        reader.abort();
        writer.abort();
    }

    proptest! {
        #[test]
        fn scan_never_panics_and_is_chunking_independent(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(1usize..64, 1..32),
        ) {
            let mut whole = Vec::new();
            FrameScan::default().scan(&bytes, |h| whole.push(h));
            let mut s = FrameScan::default();
            let mut got = Vec::new();
            let mut rest = &bytes[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let k = (*c).min(rest.len());
                s.scan(&rest[..k], |h| got.push(h));
                rest = &rest[k..];
            }
            prop_assert_eq!(got, whole);
        }
    }
}
