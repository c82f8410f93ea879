//! How fast a session notices that its peer is gone: a relay restarted on the same address
//! resets its old QUIC sessions at once (its stateless-reset key comes from its private key), and
//! a `connect` session (`Liveness::CONNECT`) notices a relay that vanished without a word within
//! about three seconds, over QUIC and over WebSocket, while a healthy idle one stays up.
//!
//! "Vanished" is a relay whose socket went silent: a UDP socket that stops sending and
//! receiving and frees its port (as a killed process does), or a TCP path that stops forwarding.

mod support;

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use postern_common::tls;
use postern_common::transport::{CloseReason, Liveness, Session, TransportKind, quic, ws};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use support::{pki, stream_pair, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The real socket's write-readiness poller, until the socket is killed.
type PollerSlot = Mutex<Option<Pin<Box<dyn UdpPoller>>>>;

/// A UDP socket that can be "killed": from then on it sends and receives nothing, and its port
/// is free (the real socket is closed), as when the process holding it is killed.
struct Killable {
    inner: Mutex<Option<Arc<dyn AsyncUdpSocket>>>,
    pollers: Mutex<Vec<Weak<PollerSlot>>>,
    addr: SocketAddr,
}

impl fmt::Debug for Killable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Killable")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Killable {
    fn bind(addr: SocketAddr) -> Arc<Self> {
        let socket = std::net::UdpSocket::bind(addr).unwrap();
        let addr = socket.local_addr().unwrap();
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket).unwrap();
        Arc::new(Self {
            inner: Mutex::new(Some(inner)),
            pollers: Mutex::default(),
            addr,
        })
    }

    fn kill(&self) {
        self.inner.lock().unwrap().take();
        for p in self.pollers.lock().unwrap().drain(..) {
            if let Some(p) = p.upgrade() {
                p.lock().unwrap().take();
            }
        }
    }

    fn alive(&self) -> Option<Arc<dyn AsyncUdpSocket>> {
        self.inner.lock().unwrap().clone()
    }
}

#[derive(Debug)]
struct KillablePoller(Arc<PollerSlot>);

impl UdpPoller for KillablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.lock().unwrap().as_mut() {
            Some(p) => p.as_mut().poll_writable(cx),
            // Dead: everything "sends" into the void.
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncUdpSocket for Killable {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        let inner = self.alive().map(|s| s.create_io_poller());
        let slot = Arc::new(Mutex::new(inner));
        self.pollers.lock().unwrap().push(Arc::downgrade(&slot));
        Box::pin(KillablePoller(slot))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match self.alive() {
            Some(s) => s.try_send(transmit),
            None => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        match self.alive() {
            Some(s) => s.poll_recv(cx, bufs, meta),
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A QUIC relay endpoint on a killable socket, keyed like the real relay's (see
/// `quic::endpoint_config`), and the sessions it accepts.
fn killable_relay(
    p: &support::Pki,
) -> (
    Arc<Killable>,
    tokio::sync::mpsc::UnboundedReceiver<quinn::Connection>,
) {
    let socket = Killable::bind("127.0.0.1:0".parse().unwrap());
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls::link_server(&p.relay).unwrap())
            .unwrap();
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quic::endpoint_config(&p.relay),
        Some(quinn::ServerConfig::with_crypto(Arc::new(crypto))),
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(c) = incoming.await {
                let _ = tx.send(c);
            }
        }
    });
    (socket, rx)
}

/// Starts a relay endpoint on `addr` once the killed socket has let go of it (the old endpoint's
/// driver may still hold it for a moment).
async fn restart_on(addr: SocketAddr, material: &tls::Material) -> quic::Server {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match quic::server(addr, material, Duration::from_secs(30)) {
            Ok(s) => return s,
            Err(quic::EndpointError::Bind(..)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("restart on {addr}: {e}"),
        }
    }
}

/// Waits for `session` to end, returning why and how long it took from `since`.
async fn ends(session: &Session, since: Instant) -> (CloseReason, Duration) {
    let why = within(session.closed()).await;
    (why, since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_on_the_same_address_resets_old_sessions_at_once() {
    let p = pki();
    let (socket, mut accepted) = killable_relay(&p);
    let addr = socket.addr;
    // An agent's session: a 30 s idle timeout, so only a reset can end it quickly.
    let client = quic::client(addr, &p.agent, Liveness::AGENT).unwrap();
    let session = within(client.connect(addr, "localhost")).await.unwrap();
    let relay_side = within(accepted.recv()).await.unwrap();
    let mut s = within(session.open()).await.unwrap();
    s.write_all(b"before").await.unwrap();
    let (_send, mut recv) = within(relay_side.accept_bi()).await.unwrap();
    let mut got = [0u8; 6];
    within(recv.read_exact(&mut got)).await.unwrap();

    // The relay dies without a word, and a new one starts on the same address and key.
    socket.kill();
    drop(relay_side);
    let restarted = restart_on(addr, &p.relay).await;

    // The old session's next packet reaches the new relay, which resets it: this write's, or
    // one already on its way (an acknowledgement), in which case the write fails with the
    // reset; the session's end says which.
    let started = Instant::now();
    let _ = s.write_all(b"after").await;
    let (why, took) = ends(&session, started).await;
    assert_eq!(why, CloseReason::Reset, "{why}");
    assert!(took < Duration::from_secs(2), "the reset took {took:?}");
    assert_eq!(
        why.to_string(),
        "reset by peer (it restarted or lost the session)"
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_another_key_cannot_reset_them() {
    // What a restart did with quinn's random per-process key: the new endpoint's reset does not
    // carry the token the old one handed out, and the client ignores it.
    let p = pki();
    let (socket, mut accepted) = killable_relay(&p);
    let addr = socket.addr;
    let client = quic::client(addr, &p.agent, Liveness::AGENT).unwrap();
    let session = within(client.connect(addr, "localhost")).await.unwrap();
    let _relay_side = within(accepted.recv()).await.unwrap();
    let mut s = within(session.open()).await.unwrap();
    s.write_all(b"before").await.unwrap();

    socket.kill();
    let stranger = pki();
    let _restarted = restart_on(addr, &stranger.relay).await;
    s.write_all(b"after").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(1), session.closed()).await;
    assert!(ended.is_err(), "ended: {:?}", ended.ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_liveness_notices_a_vanished_relay_within_three_seconds_over_quic() {
    let p = pki();
    let (socket, mut accepted) = killable_relay(&p);
    let addr = socket.addr;
    let client = quic::client(addr, &p.agent, Liveness::CONNECT).unwrap();
    let session = within(client.connect(addr, "localhost")).await.unwrap();
    let _relay_side = within(accepted.recv()).await.unwrap();

    socket.kill();
    let started = Instant::now();
    let (why, took) = ends(&session, started).await;
    assert!(matches!(why, CloseReason::TimedOut { .. }), "{why}");
    assert!(
        took < Duration::from_millis(3_500),
        "noticed after {took:?}"
    );
}

/// A TCP forwarder to `to` that can be told to stop forwarding: a path that silently drops
/// everything, as a dead host behind a router does.
async fn stallable_forwarder(to: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = TcpStream::connect(to).await.unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w) in [(ri, wo), (ro, wi)] {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || flag.load(Ordering::Relaxed) {
                            // Dropped, never forwarded.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    (addr, stalled)
}

/// A WebSocket relay behind a stallable path; the client dials with `liveness`.
async fn ws_through_stallable_path(
    p: &support::Pki,
    liveness: Liveness,
) -> (Session, Session, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let material = p.relay.clone();
    let relay = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        let ws = ws::upgrade(tcp, ws::DEFAULT_PATH).await.unwrap();
        ws::accept(ws, remote, &material).await.unwrap()
    });
    let (addr, stalled) = stallable_forwarder(relay_addr).await;
    let mut opts = ws::ConnectOptions::new(
        format!("ws://127.0.0.1:{}", addr.port()).parse().unwrap(),
        "localhost",
    );
    opts.liveness = liveness;
    let client = within(ws::connect(&opts, &p.agent)).await.unwrap();
    (client, within(relay).await.unwrap(), stalled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_liveness_notices_a_vanished_relay_within_three_seconds_over_websocket() {
    let p = pki();
    let (client, _relay, stalled) = ws_through_stallable_path(&p, Liveness::CONNECT).await;
    stalled.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let (why, took) = ends(&client, started).await;
    assert!(matches!(why, CloseReason::TimedOut { .. }), "{why}");
    assert!(
        took < Duration::from_millis(3_500),
        "noticed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_liveness_keeps_a_healthy_idle_session() {
    let p = pki();
    let q = support::quic_pair(&p, Liveness::CONNECT).await;
    let (w, w_relay, _stalled) = ws_through_stallable_path(&p, Liveness::CONNECT).await;
    // Idle for well past the idle timeout: keep-alives keep both up.
    tokio::time::sleep(Liveness::CONNECT.idle_timeout * 2).await;
    for (kind, client, server) in [
        (TransportKind::Quic, &q.client, &q.server),
        (TransportKind::Websocket, &w, &w_relay),
    ] {
        assert_eq!(client.close_reason(), None, "{kind}");
        let (mut a, mut b) = stream_pair(client, server).await;
        a.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within(b.read_to_end(&mut rest)).await.unwrap();
    }
}
