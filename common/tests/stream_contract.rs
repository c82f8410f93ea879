//! The stream contract of `postern_common::transport`, checked on both transports with the same
//! tests: every byte arrives in order or the stream fails loudly; half-close works both ways; a
//! stream dropped without a clean shutdown, or aborted, is an error for the peer, never a clean
//! end; flow control moves large transfers intact and a reader that stops stalls only its own
//! stream; closing a session fails its streams and tells the peer why; a refused certificate
//! reads the same whichever transport carried it.
//!
//! Each contract is an `async fn` taking the transport; `contract!` runs it once over QUIC and
//! once over WebSocket, on real sockets on 127.0.0.1.

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postern_common::pki::{Ca, Kind, LeafSpec};
use postern_common::tls::{Material, RefusedBy, TlsCause};
use postern_common::transport::{
    CloseReason, ConnectError, Liveness, Session, Stream, TransportError, TransportKind, quic, ws,
};
use support::{Pki, material, pair, pattern, pki, stream_pair, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name(TransportKind::Quic).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn websocket() {
                super::$name(TransportKind::Websocket).await;
            }
        }
    )*};
}

contract!(
    half_close_works_both_ways,
    a_stream_dropped_without_shutdown_is_reset,
    abort_resets_both_directions,
    a_finished_stream_dropped_unread_still_delivers_everything,
    large_transfers_arrive_intact,
    a_stalled_reader_stalls_only_its_own_stream,
    closing_a_session_fails_its_streams_and_tells_the_peer,
    a_certificate_from_another_ca_is_refused_as_unknown_ca,
    a_relay_certificate_for_another_name_is_refused,
    both_ends_use_the_post_quantum_group,
);

async fn both_ends_use_the_post_quantum_group(kind: TransportKind) {
    let p = pki();
    let pair = pair(&p, kind).await;
    assert_eq!(pair.client.key_exchange(), "X25519MLKEM768");
    assert_eq!(pair.server.key_exchange(), "X25519MLKEM768");
    let (mut a, mut b) = stream_pair(&pair.client, &pair.server).await;
    a.write_all(b"after the hybrid handshake").await.unwrap();
    a.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(b.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"after the hybrid handshake");
}

/// A QUIC client whose TLS has only the classic groups (ring's defaults, as any rustls client
/// built without Postern's provider) still gets a session, on X25519.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_only_quic_client_still_connects() {
    let p = pki();
    let mut relay = Relay::start(TransportKind::Quic, &p.relay).await;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(p.agent.roots.clone())
    .with_client_auth_cert(p.agent.chain.clone(), p.agent.key.clone_key())
    .unwrap();
    tls.alpn_protocols = vec![postern_common::protocol::ALPN.to_vec()];
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = within(
        endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic_tls)),
                relay.addr,
                "localhost",
            )
            .unwrap(),
    )
    .await
    .unwrap();
    let session = relay.next().await.unwrap();
    assert_eq!(session.key_exchange(), "X25519");
    assert_eq!(session.peer().unwrap().to_string(), "postern://agent/db1");
    // Streams work on it.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"classic").await.unwrap();
    send.finish().unwrap();
    let mut s = within(session.accept()).await.unwrap();
    let mut got = Vec::new();
    within(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"classic");
    s.write_all(b"ok").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(within(recv.read_to_end(16)).await.unwrap(), b"ok");
}

/// Reads to the end, expecting a failure rather than a clean end.
async fn read_fails(s: &mut Stream) -> io::Error {
    let mut sink = Vec::new();
    match within(s.read_to_end(&mut sink)).await {
        Ok(n) => panic!("clean end after {n} bytes where a failure was due"),
        Err(e) => e,
    }
}

/// Writes until a write fails.
async fn writes_fail(s: &mut Stream) -> io::Error {
    let chunk = vec![0u8; 64 * 1024];
    within(async {
        loop {
            if let Err(e) = s.write_all(&chunk).await {
                return e;
            }
        }
    })
    .await
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

async fn half_close_works_both_ways(kind: TransportKind) {
    let p = pki();
    let s = pair(&p, kind).await;
    for (from, to) in [(&s.client, &s.server), (&s.server, &s.client)] {
        // A request, then our half-close: the peer reads it all and a clean end.
        let (mut a, mut b) = stream_pair(from, to).await;
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        within(b.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"request");
        // After the peer's end the other direction still works, at length.
        let answer = pattern(3, 1_000_000);
        let send = answer.clone();
        let writer = tokio::spawn(async move {
            b.write_all(&send).await.unwrap();
            b.shutdown().await.unwrap();
            b
        });
        let mut got = Vec::new();
        within(a.read_to_end(&mut got)).await.unwrap();
        assert!(got == answer, "answer corrupted");
        let _b = writer.await.unwrap();

        // A stream closed before its first byte still reaches the peer, which can answer.
        let mut a = within(from.open()).await.unwrap();
        a.shutdown().await.unwrap();
        let mut b = within(to.accept()).await.unwrap();
        let mut got = Vec::new();
        within(b.read_to_end(&mut got)).await.unwrap();
        assert!(got.is_empty());
        b.write_all(b"still open this way").await.unwrap();
        b.shutdown().await.unwrap();
        let mut got = Vec::new();
        within(a.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"still open this way");
    }
}

async fn a_stream_dropped_without_shutdown_is_reset(kind: TransportKind) {
    let p = pki();
    let s = pair(&p, kind).await;
    for (from, to) in [(&s.client, &s.server), (&s.server, &s.client)] {
        let (mut a, mut b) = stream_pair(from, to).await;
        a.write_all(b"partial").await.unwrap();
        a.flush().await.unwrap();
        drop(a);
        read_fails(&mut b).await;

        // After the peer's half-close too (yamux alone would send a clean FIN here).
        let (mut a, mut b) = stream_pair(from, to).await;
        b.shutdown().await.unwrap();
        let mut got = Vec::new();
        within(a.read_to_end(&mut got)).await.unwrap();
        drop(a);
        read_fails(&mut b).await;
    }
    // The sessions are unharmed.
    let (mut a, mut b) = stream_pair(&s.client, &s.server).await;
    a.write_all(b"ok").await.unwrap();
    a.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(b.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"ok");
}

async fn abort_resets_both_directions(kind: TransportKind) {
    let p = pki();
    let s = pair(&p, kind).await;
    // The peer's reads fail.
    let (mut a, mut b) = stream_pair(&s.client, &s.server).await;
    a.write_all(b"partial").await.unwrap();
    a.flush().await.unwrap();
    a.abort();
    read_fails(&mut b).await;
    assert!(a.write_all(b"more").await.is_err());
    // And the peer's writes fail.
    let (mut a, mut b) = stream_pair(&s.server, &s.client).await;
    a.abort();
    writes_fail(&mut b).await;
}

async fn a_finished_stream_dropped_unread_still_delivers_everything(kind: TransportKind) {
    let p = pki();
    let s = pair(&p, kind).await;
    let data = pattern(11, 200_000);
    // Finished, then dropped without reading; and finished, then aborted. Either way the peer
    // reads everything cleanly, and only its further writes fail.
    for abort in [false, true] {
        let (mut a, mut b) = stream_pair(&s.client, &s.server).await;
        a.write_all(&data).await.unwrap();
        a.shutdown().await.unwrap();
        if abort {
            a.abort();
        } else {
            drop(a);
        }
        let mut got = Vec::new();
        within(b.read_to_end(&mut got)).await.unwrap();
        assert!(got == data, "data corrupted (abort: {abort})");
        writes_fail(&mut b).await;
    }
}

async fn large_transfers_arrive_intact(kind: TransportKind) {
    const LEN: usize = 64 * 1024 * 1024;
    let p = pki();
    let s = pair(&p, kind).await;
    let (a, b) = stream_pair(&s.client, &s.server).await;
    let mut tasks = Vec::new();
    for (seed, mut stream) in [(1u32, a), (2u32, b)] {
        tasks.push(tokio::spawn(async move {
            let data = pattern(seed, LEN);
            let (mut r, mut w) = tokio::io::split(&mut stream);
            let write = async {
                // Uneven chunks, so that no frame size lines up with them.
                for chunk in data.chunks(100_003) {
                    w.write_all(chunk).await.unwrap();
                }
                w.shutdown().await.unwrap();
            };
            let read = async {
                let mut got = Vec::with_capacity(LEN);
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            let ((), got) = tokio::join!(write, read);
            (sha256(&data), got)
        }));
    }
    let (sent_a, got_b) = within(tasks.remove(0)).await.unwrap();
    let (sent_b, got_a) = within(tasks.remove(0)).await.unwrap();
    assert_eq!(got_a.len(), LEN);
    assert_eq!(got_b.len(), LEN);
    assert_eq!(sha256(&got_a), sent_a, "what b received is not what a sent");
    assert_eq!(sha256(&got_b), sent_b, "what a received is not what b sent");
}

async fn a_stalled_reader_stalls_only_its_own_stream(kind: TransportKind) {
    const BULK: usize = 32 * 1024 * 1024;
    let p = pki();
    let s = pair(&p, kind).await;
    // A stream whose reader never reads, with a writer that keeps trying.
    let (mut stalled, _unread) = stream_pair(&s.client, &s.server).await;
    let pushed = Arc::new(AtomicUsize::new(0));
    let progress = pushed.clone();
    let stalled_writer = tokio::spawn(async move {
        let chunk = vec![1u8; 16 * 1024];
        while stalled.write_all(&chunk).await.is_ok() {
            progress.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    // Another stream moves a bulk transfer meanwhile.
    let (mut w, mut r) = stream_pair(&s.client, &s.server).await;
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..BULK / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    within(r.read_to_end(&mut got)).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), BULK);
    // The stalled stream took its own window and no more (QUIC: 4 MiB, yamux: 256 KiB).
    let stuck = pushed.load(Ordering::Relaxed);
    assert!(
        stuck <= 8 * 1024 * 1024,
        "stalled writer pushed {stuck} bytes"
    );
    assert!(
        !stalled_writer.is_finished(),
        "the stalled writer must be blocked, not failed"
    );
    stalled_writer.abort();
}

async fn closing_a_session_fails_its_streams_and_tells_the_peer(kind: TransportKind) {
    let p = pki();
    let s = pair(&p, kind).await;
    let (mut a, _b) = stream_pair(&s.client, &s.server).await;
    let reason = "replaced by a new session of the same agent";
    s.server.close(reason);
    assert!(s.server.is_closed());
    assert_eq!(
        within(s.server.closed()).await,
        CloseReason::Local(reason.into())
    );
    let seen = within(s.client.closed()).await;
    assert_eq!(seen, CloseReason::Peer(reason.into()));
    assert_eq!(seen.to_string(), format!("closed by peer: {reason}"));
    assert!(s.client.is_closed());
    assert_eq!(s.client.close_reason(), Some(seen));
    read_fails(&mut a).await;
    for result in [
        within(s.client.accept()).await,
        within(s.client.open()).await,
        within(s.server.open()).await,
    ] {
        assert!(
            matches!(result, Err(TransportError::Closed(_))),
            "{:?}",
            result.err()
        );
    }
}

/// A relay on `kind` that hands back every accepted session or refusal.
struct Relay {
    addr: SocketAddr,
    accepted: tokio::sync::mpsc::UnboundedReceiver<Result<Session, TransportError>>,
    _quic: Option<quic::Server>,
}

impl Relay {
    async fn start(kind: TransportKind, material: &Material) -> Self {
        let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
        match kind {
            TransportKind::Quic => {
                let server = quic::server(
                    "127.0.0.1:0".parse().unwrap(),
                    material,
                    Duration::from_secs(30),
                )
                .unwrap();
                let addr = server.endpoint().local_addr().unwrap();
                let s = server.clone();
                tokio::spawn(async move {
                    while let Some(incoming) = s.endpoint().accept().await {
                        let _ = tx.send(s.accept(incoming).await);
                    }
                });
                Self {
                    addr,
                    accepted,
                    _quic: Some(server),
                }
            }
            TransportKind::Websocket => {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let material = material.clone();
                tokio::spawn(async move {
                    while let Ok((tcp, remote)) = listener.accept().await {
                        let ws = ws::upgrade(tcp, ws::DEFAULT_PATH).await.unwrap();
                        let _ = tx.send(ws::accept(ws, remote, &material).await);
                    }
                });
                Self {
                    addr,
                    accepted,
                    _quic: None,
                }
            }
        }
    }

    async fn next(&mut self) -> Result<Session, TransportError> {
        within(self.accepted.recv())
            .await
            .expect("relay task ended")
    }
}

/// Dials `relay` as `material` expecting `server_name`; a session that the relay refuses after
/// the handshake (TLS 1.3 lets the client finish first) is asked once, and its end returned.
async fn dial(
    kind: TransportKind,
    relay: &Relay,
    material: &Material,
    server_name: &str,
) -> Result<Session, TransportError> {
    let session = match kind {
        TransportKind::Quic => {
            let ep = quic::client(relay.addr, material, Liveness::AGENT).unwrap();
            within(ep.connect(relay.addr, server_name)).await?
        }
        TransportKind::Websocket => {
            let url = format!("ws://127.0.0.1:{}", relay.addr.port())
                .parse()
                .unwrap();
            let opts = ws::ConnectOptions::new(url, server_name);
            within(ws::connect(&opts, material)).await?
        }
    };
    let mut s = within(session.open()).await?;
    let refused = async {
        s.write_all(b"?").await?;
        s.flush().await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map(|_| ())
    };
    match tokio::time::timeout(Duration::from_secs(3), refused).await {
        Ok(Err(_)) => Err(TransportError::Closed(within(session.closed()).await)),
        _ => Ok(session),
    }
}

/// The words a refusal shows, whatever address it names.
fn words(e: &TransportError) -> String {
    match e {
        TransportError::Connect { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

async fn a_certificate_from_another_ca_is_refused_as_unknown_ca(kind: TransportKind) {
    let p = pki();
    let mut relay = Relay::start(kind, &p.relay).await;
    // An agent certificate from another CA that trusts the relay's CA: the relay refuses.
    let (other, _) = Ca::generate("other ca", 1).unwrap();
    let stranger = Material {
        roots: p.agent.roots.clone(),
        ..material(&other, &LeafSpec::new(Kind::Agent, "db1", 1))
    };
    let e = dial(kind, &relay, &stranger, "localhost")
        .await
        .unwrap_err();
    let Some(CloseReason::Tls(f)) = e.close_reason() else {
        panic!("not a tls refusal: {e}");
    };
    assert_eq!(f.by, RefusedBy::Peer, "{e}");
    assert_eq!(
        f.cause,
        TlsCause::UnknownCa {
            issuer: Some("other ca".into()),
            trusted: Vec::new(),
        },
        "{e}"
    );
    assert_eq!(
        f.to_string(),
        "the peer does not trust the CA that issued our certificate (unknown CA: ours is \"other ca\")"
    );
    // The relay says which CA signed it and which one it trusts.
    let refused = relay.next().await.unwrap_err();
    assert_eq!(
        words(&refused),
        "tls handshake: certificate signed by an unknown CA (unknown issuer \"other ca\"; trusted: \"test ca\")"
    );
    assert!(matches!(
        refused,
        TransportError::Connect {
            source: ConnectError::Tls(_),
            ..
        }
    ));
    // Good agents still get in.
    let ok = dial(kind, &relay, &p.agent, "localhost").await.unwrap();
    assert!(!ok.is_closed());
    assert!(relay.next().await.is_ok());
}

async fn a_relay_certificate_for_another_name_is_refused(kind: TransportKind) {
    let p: Pki = pki();
    let mut relay = Relay::start(kind, &p.relay).await;
    let e = dial(kind, &relay, &p.agent, "other.example")
        .await
        .unwrap_err();
    assert_eq!(
        words(&e),
        "tls handshake: certificate is not valid for the name dialled \"other.example\" (it is for \"localhost\", \"127.0.0.1\")"
    );
    // The relay hears that the peer refused its certificate.
    let refused = relay.next().await.unwrap_err();
    assert_eq!(
        words(&refused),
        "session refused: the peer refused the tls handshake (bad_certificate)"
    );
}
