//! What the integration tests of the transports share: certificates made at test time, and
//! session pairs on 127.0.0.1 over each transport, built with the public API only.

#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use postern_common::pki::{Ca, Kind, LeafSpec};
use postern_common::tls::Material;
use postern_common::transport::{Liveness, Session, Stream, TransportKind, quic, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Bound on any one step of a test.
pub const STEP: Duration = Duration::from_secs(30);

/// Runs `f`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

/// A CA with a relay (server) and an agent certificate.
pub struct Pki {
    pub ca: Ca,
    pub relay: Material,
    pub agent: Material,
}

pub fn material(ca: &Ca, spec: &LeafSpec) -> Material {
    let issued = ca.issue(spec).unwrap();
    Material::from_pem(&ca.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap()
}

pub fn pki() -> Pki {
    let (ca, _) = Ca::generate("test ca", 1).unwrap();
    let mut relay = LeafSpec::new(Kind::Server, "relay", 1);
    relay.dns.push("localhost".into());
    relay.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    Pki {
        relay: material(&ca, &relay),
        agent: material(&ca, &LeafSpec::new(Kind::Agent, "db1", 1)),
        ca,
    }
}

/// A connected session pair and what keeps it running.
pub struct Pair {
    /// The dialling side (agent or `connect` client).
    pub client: Session,
    /// The accepting side (relay).
    pub server: Session,
    /// Endpoints that must outlive the sessions (QUIC).
    pub keep: Option<(quic::Server, quic::Client)>,
}

/// A session pair over `kind` on 127.0.0.1.
pub async fn pair(p: &Pki, kind: TransportKind) -> Pair {
    match kind {
        TransportKind::Quic => quic_pair(p, Liveness::AGENT).await,
        TransportKind::Websocket => {
            let (client, server) = ws_pair(p, false).await;
            Pair {
                client,
                server,
                keep: None,
            }
        }
    }
}

/// A WebSocket session pair over 127.0.0.1: (agent side, relay side). With `outer_tls`, the
/// WebSocket runs over TLS as well (wss).
pub async fn ws_pair(p: &Pki, outer_tls: bool) -> (Session, Session) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let relay = p.relay.clone();
    let server = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        if outer_tls {
            let mut cfg =
                rustls::ServerConfig::builder_with_provider(postern_common::tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(relay.chain.clone(), relay.key.clone_key())
                    .unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
                .accept(tcp)
                .await
                .unwrap();
            let ws = ws::upgrade(tls, ws::DEFAULT_PATH).await.unwrap();
            ws::accept(ws, remote, &relay).await.unwrap()
        } else {
            let ws = ws::upgrade(tcp, ws::DEFAULT_PATH).await.unwrap();
            ws::accept(ws, remote, &relay).await.unwrap()
        }
    });
    let scheme = if outer_tls { "wss" } else { "ws" };
    let url = format!("{scheme}://localhost:{port}").parse().unwrap();
    let opts = ws::ConnectOptions::new(url, "localhost");
    let client = within(ws::connect(&opts, &p.agent)).await.unwrap();
    (client, within(server).await.unwrap())
}

/// A QUIC session pair over 127.0.0.1, the client noticing a dead peer as `liveness` says.
pub async fn quic_pair(p: &Pki, liveness: Liveness) -> Pair {
    let server_ep = quic::server(
        "127.0.0.1:0".parse().unwrap(),
        &p.relay,
        Duration::from_secs(30),
    )
    .unwrap();
    let addr: SocketAddr = server_ep.endpoint().local_addr().unwrap();
    let ep = server_ep.clone();
    let server = tokio::spawn(async move {
        let incoming = ep.endpoint().accept().await.unwrap();
        ep.accept(incoming).await.unwrap()
    });
    let client_ep = quic::client(addr, &p.agent, liveness).unwrap();
    let client = within(client_ep.connect(addr, "localhost")).await.unwrap();
    Pair {
        client,
        server: within(server).await.unwrap(),
        keep: Some((server_ep, client_ep)),
    }
}

/// Opens a stream from `from` and accepts it on `to` (the peer hears of a stream with its first
/// byte, so one byte goes across and is read).
pub async fn stream_pair(from: &Session, to: &Session) -> (Stream, Stream) {
    let mut a = within(from.open()).await.unwrap();
    a.write_all(b"x").await.unwrap();
    a.flush().await.unwrap();
    let mut b = within(to.accept()).await.unwrap();
    let mut x = [0u8; 1];
    within(b.read_exact(&mut x)).await.unwrap();
    assert_eq!(&x, b"x");
    (a, b)
}

/// Deterministic bytes that differ per `seed`.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Resident memory of this process, from /proc.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

pub const MIB: u64 = 1024 * 1024;
