//! Tests of the WebSocket transport over real sockets on 127.0.0.1 (tokio-tungstenite doing the
//! upgrade on both ends, our frames after it, and tungstenite's frames as the peer where the two
//! must agree) and certificates made by `crate::pki` at test time.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;
use crate::pki::{Ca, Identity, Kind, LeafSpec};
use crate::transport::{Stream, TransportKind};

const LIMIT: Duration = Duration::from_secs(30);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test step timed out")
}

struct Pki {
    ca: Ca,
    ca_key: String,
    relay: Material,
    agent: Material,
}

fn material(ca: &Ca, spec: &LeafSpec) -> Material {
    let issued = ca.issue(spec).unwrap();
    Material::from_pem(&ca.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap()
}

fn pki() -> Pki {
    let (ca, ca_key) = Ca::generate("test ca", 1).unwrap();
    let mut relay = LeafSpec::new(Kind::Server, "relay", 1);
    relay.dns.push("localhost".into());
    relay.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let relay = material(&ca, &relay);
    let agent = material(&ca, &LeafSpec::new(Kind::Agent, "db1", 1));
    Pki {
        ca,
        ca_key,
        relay,
        agent,
    }
}

/// The outer TLS a router would terminate: the relay's certificate, HTTP/1.1, no client auth.
fn outer_server(m: &Material) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A relay's accepting side: TCP, optional outer TLS, the upgrade and [`accept_with`].
struct TestRelay {
    addr: SocketAddr,
    sessions: mpsc::UnboundedReceiver<Result<Session, TransportError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestRelay {
    async fn start(
        material: Material,
        outer: Option<Arc<rustls::ServerConfig>>,
        opts: AcceptOptions,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, sessions) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, remote)) = listener.accept().await {
                let (tx, material, outer, opts) =
                    (tx.clone(), material.clone(), outer.clone(), opts.clone());
                tokio::spawn(async move {
                    let result = async {
                        let stream = match outer {
                            Some(cfg) => {
                                Either::Right(TlsAcceptor::from(cfg).accept(tcp).await.map_err(
                                    |e| TransportError::Connect {
                                        addr: remote.to_string(),
                                        source: ConnectError::OuterTls(e),
                                    },
                                )?)
                            }
                            None => Either::Left(tcp),
                        };
                        let ws = upgrade(stream, DEFAULT_PATH).await?;
                        accept_with(ws, remote, &material, &opts).await
                    }
                    .await;
                    let _ = tx.send(result);
                });
            }
        });
        Self {
            addr,
            sessions,
            task,
        }
    }

    async fn plain(material: &Material) -> Self {
        Self::start(material.clone(), None, AcceptOptions::default()).await
    }

    async fn next(&mut self) -> Result<Session, TransportError> {
        within(self.sessions.recv())
            .await
            .expect("relay task ended")
    }

    fn url(&self, scheme: &str) -> RelayUrl {
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
            .parse()
            .unwrap()
    }

    fn options(&self, scheme: &str) -> ConnectOptions {
        ConnectOptions::new(self.url(scheme), "localhost")
    }
}

/// A connected pair: (agent side, relay side).
async fn pair(p: &Pki) -> (Session, Session, TestRelay) {
    let mut relay = TestRelay::plain(&p.relay).await;
    let client = within(connect(&relay.options("ws"), &p.agent))
        .await
        .unwrap();
    let server = relay.next().await.unwrap();
    (client, server, relay)
}

async fn open_pair(from: &Session, to: &Session) -> (Stream, Stream) {
    let mut a = within(from.open()).await.unwrap();
    // The peer hears of a stream with its first byte.
    a.write_all(b"x").await.unwrap();
    a.flush().await.unwrap();
    let mut b = within(to.accept()).await.unwrap();
    let mut x = [0u8; 1];
    within(b.read_exact(&mut x)).await.unwrap();
    assert_eq!(&x, b"x");
    (a, b)
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
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

async fn exchange_both_ways(client: &Session, server: &Session) {
    // Agent-opened stream (the control stream's direction).
    let (mut a, mut b) = open_pair(client, server).await;
    a.write_all(b"hello relay").await.unwrap();
    a.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(b.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"hello relay");
    b.write_all(b"hello agent").await.unwrap();
    b.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(a.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"hello agent");

    // Relay-opened stream (one per client connection).
    let (mut b, mut a) = open_pair(server, client).await;
    let data = pattern(7, 300_000);
    let send = data.clone();
    let writer = tokio::spawn(async move {
        b.write_all(&send).await.unwrap();
        b.shutdown().await.unwrap();
        b
    });
    let mut got = Vec::new();
    within(a.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, data);
    a.shutdown().await.unwrap();
    let mut b = writer.await.unwrap();
    let mut rest = Vec::new();
    within(b.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn streams_flow_both_ways_over_ws() {
    let p = pki();
    let (client, server, _relay) = pair(&p).await;
    assert_eq!(client.kind(), TransportKind::Websocket);
    assert_eq!(server.kind(), TransportKind::Websocket);
    assert_eq!(server.peer(), Some(&Identity::Agent("db1".into())));
    assert_eq!(client.peer(), None);
    assert_eq!(client.remote().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(server.remote().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(client.id(), server.id());
    assert_eq!(client.id(), client.clone().id());
    exchange_both_ways(&client, &server).await;
    assert!(!client.is_closed() && !server.is_closed());
}

#[tokio::test]
async fn streams_flow_both_ways_over_wss() {
    let p = pki();
    let mut relay = TestRelay::start(
        p.relay.clone(),
        Some(outer_server(&p.relay)),
        AcceptOptions::default(),
    )
    .await;
    // Dial the address, verify the outer certificate by name (SNI override).
    let mut opts = relay.options("wss");
    opts.sni = Some("localhost".into());
    let client = within(connect(&opts, &p.agent)).await.unwrap();
    let server = relay.next().await.unwrap();
    exchange_both_ways(&client, &server).await;

    // An outer certificate from a CA we were not told to trust is refused.
    let (other_ca, _) = Ca::generate("other ca", 1).unwrap();
    let mut roots = RootCertStore::empty();
    let other_der =
        rustls_pki_types::pem::PemObject::from_pem_slice(other_ca.cert_pem.as_bytes()).unwrap();
    roots.add(other_der).unwrap();
    opts.outer_roots = Some(Arc::new(roots));
    let e = within(connect(&opts, &p.agent)).await.unwrap_err();
    assert!(e.to_string().contains("outer tls"), "{e}");
}

async fn read_fails(s: &mut Stream) -> io::Error {
    let mut sink = Vec::new();
    match within(s.read_to_end(&mut sink)).await {
        Ok(n) => panic!("clean end after {n} bytes where a failure was due"),
        Err(e) => e,
    }
}

/// (streams the tap follows, live streams, unread bytes) of a WebSocket session.
fn tracked(s: &Session) -> (usize, usize, usize) {
    match &s.inner {
        Inner::Mux(m) => m.tracked(),
        Inner::Quic(..) => unreachable!("a websocket session"),
    }
}

#[tokio::test]
async fn no_stream_state_outlives_its_streams() {
    let p = pki();
    let (client, server, _relay) = pair(&p).await;
    {
        exchange_both_ways(&client, &server).await;
        let (mut a, _b) = open_pair(&client, &server).await;
        a.abort();
        let (a, mut b) = open_pair(&server, &client).await;
        drop(a);
        let _ = read_fails(&mut b).await;
        let (mut a, b) = open_pair(&client, &server).await;
        a.write_all(b"done").await.unwrap();
        a.shutdown().await.unwrap();
        drop((a, b));
        // Opened and never used: the peer never hears of it.
        let _ = within(client.open()).await.unwrap();
    }
    within(async {
        while tracked(&client) != (0, 0, 0) || tracked(&server) != (0, 0, 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn two_hundred_concurrent_streams_echo_intact() {
    let p = pki();
    let (client, server, _relay) = pair(&p).await;
    let echo = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let mut s = within(server.accept()).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut s);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        server
    });
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let s = within(client.open()).await.unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            let data = pattern(i, 50_000 + i as usize * 997);
            let send = data.clone();
            let writer = tokio::spawn(async move {
                for chunk in send.chunks(4096 + i as usize) {
                    w.write_all(chunk).await.unwrap();
                }
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            within(r.read_to_end(&mut got)).await.unwrap();
            writer.await.unwrap();
            assert!(got == data, "stream {i} corrupted");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let _server = within(echo).await.unwrap();
}

#[tokio::test]
async fn both_directions_at_full_speed_do_not_deadlock() {
    let p = pki();
    let (client, server, _relay) = pair(&p).await;
    const LEN: usize = 8 * 1024 * 1024;
    let mut pairs = Vec::new();
    for _ in 0..2 {
        pairs.push(open_pair(&client, &server).await);
        pairs.push({
            let (b, a) = open_pair(&server, &client).await;
            (a, b)
        });
    }
    let mut tasks = Vec::new();
    for (a, b) in pairs {
        for mut s in [a, b] {
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut s);
                let write = async {
                    let chunk = vec![5u8; 256 * 1024];
                    for _ in 0..LEN / chunk.len() {
                        w.write_all(&chunk).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                };
                let read = async {
                    let mut n = 0usize;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let k = r.read(&mut buf).await.unwrap();
                        if k == 0 {
                            break n;
                        }
                        n += k;
                    }
                };
                let ((), n) = tokio::join!(write, read);
                assert_eq!(n, LEN);
            }));
        }
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("bidirectional transfer stalled")
            .unwrap();
    }
}

#[tokio::test]
async fn dropping_every_handle_closes_the_session() {
    let p = pki();
    let (client, server, _relay) = pair(&p).await;
    let (a, b) = open_pair(&client, &server).await;
    drop(client);
    // A stream still in use keeps its session open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.is_closed());
    drop((a, b));
    assert_eq!(
        within(server.closed()).await,
        CloseReason::Peer("session dropped".into())
    );
}

/// A TCP forwarder that can be told to stop forwarding: a path that silently drops packets.
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
                        if n == 0 {
                            break;
                        }
                        while flag.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
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

#[tokio::test]
async fn a_silent_peer_ends_the_session() {
    let p = pki();
    let interval = Duration::from_millis(150);
    let mut relay = TestRelay::start(
        p.relay.clone(),
        None,
        AcceptOptions {
            liveness: Liveness::pings(interval),
            ..AcceptOptions::default()
        },
    )
    .await;
    let (addr, stalled) = stallable_forwarder(relay.addr).await;
    let mut opts = ConnectOptions::new(
        format!("ws://127.0.0.1:{}", addr.port()).parse().unwrap(),
        "localhost",
    );
    opts.liveness = Liveness::pings(interval);
    let client = within(connect(&opts, &p.agent)).await.unwrap();
    let server = relay.next().await.unwrap();
    // Pings keep an idle session alive well past two intervals.
    tokio::time::sleep(interval * 6).await;
    assert!(!client.is_closed() && !server.is_closed());
    exchange_both_ways(&client, &server).await;

    stalled.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let why = within(client.closed()).await;
    assert!(matches!(why, CloseReason::TimedOut { .. }), "{why}");
    assert!(why.to_string().starts_with("timed out"), "{why}");
    let why = within(server.closed()).await;
    assert!(matches!(why, CloseReason::TimedOut { .. }), "{why}");
    assert!(started.elapsed() < interval * 6, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_client_without_a_valid_inner_certificate_is_refused() {
    let p = pki();
    let mut relay = TestRelay::plain(&p.relay).await;

    // Signed by another CA: the upgrade succeeds, the inner TLS does not.
    let (other, _) = Ca::generate("other ca", 1).unwrap();
    let stranger = material(&other, &LeafSpec::new(Kind::Agent, "db1", 1));
    let stranger = Material {
        roots: p.agent.roots.clone(),
        ..stranger
    };
    let e = within(connect(&relay.options("ws"), &stranger))
        .await
        .unwrap_err();
    match e.close_reason() {
        Some(CloseReason::Tls(f)) => {
            assert_eq!(f.by, tls::RefusedBy::Peer);
            assert!(matches!(f.cause, tls::TlsCause::UnknownCa { .. }), "{e}");
        }
        _ => panic!("not a tls refusal: {e}"),
    }
    assert!(e.to_string().contains("session refused"), "{e}");
    let e = relay.next().await.unwrap_err();
    assert!(e.to_string().contains("unknown CA"), "{e}");
    assert!(e.to_string().contains("\"other ca\""), "{e}");
    assert!(e.to_string().contains("\"test ca\""), "{e}");

    // Signed by our CA, but a server certificate.
    let mut spec = LeafSpec::new(Kind::Server, "not-an-agent", 1);
    spec.dns.push("localhost".into());
    let server_cert = material(&p.ca, &spec);
    let e = within(connect(&relay.options("ws"), &server_cert))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("session refused"), "{e}");
    assert!(relay.next().await.is_err());

    // Signed by our CA for client auth, but without a postern identity.
    let nobody = {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &p.ca.cert_pem,
            rcgen::KeyPair::from_pem(&p.ca_key).unwrap(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Material::from_pem(&p.ca.cert_pem, &cert.pem(), &key.serialize_pem()).unwrap()
    };
    let e = within(connect(&relay.options("ws"), &nobody))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no postern identity"), "{e}");
    assert!(matches!(
        relay.next().await,
        Err(TransportError::Identity(_))
    ));

    // No client certificate at all, through a hand-made client.
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let ws = client_upgrade(
        format!("ws://127.0.0.1:{}{DEFAULT_PATH}", relay.addr.port()),
        tcp,
    )
    .await
    .unwrap();
    let io = WsIo::new(ws, Liveness::pings(DEFAULT_PING_INTERVAL), Link::new());
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(p.agent.roots.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![crate::protocol::ALPN.to_vec()];
    let name = tls::server_name("localhost").unwrap();
    let mut anon = TlsConnector::from(Arc::new(cfg))
        .connect(name, io)
        .await
        .unwrap();
    let mut marker = [0u8; 8];
    assert!(within(anon.read_exact(&mut marker)).await.is_err());
    let e = relay.next().await.unwrap_err();
    assert!(e.to_string().contains("no certificate"), "{e}");

    // The relay's certificate must match the name we expect.
    let mut opts = relay.options("ws");
    opts.server_name = "other.example".into();
    let e = within(connect(&opts, &p.agent)).await.unwrap_err();
    assert!(
        matches!(
            &e,
            TransportError::Connect {
                source: ConnectError::Tls(TlsFailure {
                    cause: tls::TlsCause::WrongName { .. },
                    ..
                }),
                ..
            }
        ),
        "{e}"
    );
    assert!(relay.next().await.is_err());
}

#[tokio::test]
async fn a_refused_upgrade_is_typed_and_headers_go_out() {
    let p = pki();
    // A router that refuses: reads the request head, answers 400 unknown_route.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let body = "400 Bad Request: Requested instance ('7') does not exist for route\n";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nX-Cf-Routererror: unknown_route\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(answer.as_bytes()).await.unwrap();
        String::from_utf8(head).unwrap()
    });
    let mut opts = ConnectOptions::new(
        format!("ws://127.0.0.1:{port}/v1/tunnel").parse().unwrap(),
        "localhost",
    );
    opts.host_header = Some("relay.apps.example.com".into());
    opts.headers
        .push(("X-Cf-App-Instance".into(), "8f1e-guid:7".into()));
    let e = within(connect(&opts, &p.agent)).await.unwrap_err();
    match &e {
        TransportError::Rejected {
            status,
            router_error,
            ..
        } => {
            assert_eq!(*status, 400);
            assert_eq!(router_error.as_deref(), Some("unknown_route"));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("unknown_route"), "{e}");
    let head = router.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /v1/tunnel http/1.1\r\n"), "{head}");
    assert!(head.contains("host: relay.apps.example.com\r\n"), "{head}");
    assert!(
        head.contains("x-cf-app-instance: 8f1e-guid:7\r\n"),
        "{head}"
    );

    // Our own server answers 404 off the tunnel path.
    let relay = TestRelay::plain(&p.relay).await;
    let mut opts = relay.options("ws");
    opts.url.path = "/elsewhere".into();
    let e = within(connect(&opts, &p.agent)).await.unwrap_err();
    assert!(
        matches!(e, TransportError::Rejected { status: 404, .. }),
        "{e}"
    );

    // Headers the handshake owns cannot be overridden.
    let mut opts = relay.options("ws");
    opts.headers.push(("Upgrade".into(), "h2c".into()));
    assert!(within(connect(&opts, &p.agent)).await.is_err());
}

/// A minimal HTTP CONNECT proxy with optional basic auth ("user:pw").
async fn forward_proxy(require_auth: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                    .unwrap_or_default()
                    .to_owned();
                // base64("user:pw")
                if require_auth && !head.contains("Proxy-Authorization: Basic dXNlcjpwdw==\r\n") {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = tcp.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn sessions_go_through_an_http_connect_proxy() {
    let p = pki();
    let mut relay = TestRelay::start(
        p.relay.clone(),
        Some(outer_server(&p.relay)),
        AcceptOptions::default(),
    )
    .await;
    let proxy_addr = forward_proxy(true).await;
    let env = |k: &str| match k {
        "HTTPS_PROXY" => Some(format!("http://user:pw@127.0.0.1:{}", proxy_addr.port())),
        _ => None,
    };
    let mut opts = relay.options("wss");
    opts.sni = Some("localhost".into());
    opts.proxy = proxy::proxy_from_env(env, Scheme::Wss, "127.0.0.1", relay.addr.port()).unwrap();
    assert!(opts.proxy.is_some());
    let client = within(connect(&opts, &p.agent)).await.unwrap();
    let server = relay.next().await.unwrap();
    exchange_both_ways(&client, &server).await;

    // Without credentials the proxy answers 407, and we say so.
    opts.proxy = Some(Proxy::parse("test", &format!("127.0.0.1:{}", proxy_addr.port())).unwrap());
    let e = within(connect(&opts, &p.agent)).await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Proxy(ProxyError::AuthRequired {
                sent_credentials: false,
                ..
            })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("407"), "{e}");
}

#[test]
fn sessions_and_streams_can_move_between_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Session>();
    send::<Stream>();
}

#[test]
fn close_reasons_are_cut_at_a_character_boundary() {
    assert_eq!(truncate("abc", 120), "abc");
    assert_eq!(truncate("ééé", 5), "éé");
    assert_eq!(truncate("", 3), "");
}

/// Checks the proxy client against a real proxy (the integration tests use Debian's tinyproxy):
/// `HTTPS_PROXY=http://user:pw@127.0.0.1:PORT cargo test -p postern-common -- --ignored proxy_in`.
#[tokio::test]
#[ignore = "needs a real forward proxy named in HTTPS_PROXY"]
async fn sessions_go_through_the_proxy_in_https_proxy() {
    let p = pki();
    let mut relay = TestRelay::start(
        p.relay.clone(),
        Some(outer_server(&p.relay)),
        AcceptOptions::default(),
    )
    .await;
    let mut opts = relay.options("wss");
    opts.sni = Some("localhost".into());
    opts.proxy = proxy::proxy_from_env(
        |k| std::env::var(k).ok(),
        Scheme::Wss,
        "127.0.0.1",
        relay.addr.port(),
    )
    .unwrap();
    assert!(
        opts.proxy.is_some(),
        "HTTPS_PROXY is not set (or NO_PROXY covers 127.0.0.1)"
    );
    let client = within(connect(&opts, &p.agent)).await.unwrap();
    let server = relay.next().await.unwrap();
    exchange_both_ways(&client, &server).await;

    // The same proxy without the credentials.
    if let Some(proxy) = &mut opts.proxy
        && proxy.auth.take().is_some()
    {
        let e = within(connect(&opts, &p.agent)).await.unwrap_err();
        assert!(
            matches!(e, TransportError::Proxy(ProxyError::AuthRequired { .. })),
            "{e}"
        );
        println!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_data_is_held_to_the_session_budget_and_given_back() {
    let p = pki();
    let (peer, server, _relay) = pair(&p).await;
    // 400 streams of 256 KiB (their initial windows): 100 MiB the peer may send unasked.
    let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..400u32 {
        let peer = peer.clone();
        let (pushed, finished) = (pushed.clone(), finished.clone());
        tokio::spawn(async move {
            let mut s = peer.open().await.unwrap();
            let chunk = vec![i as u8; 16 * 1024];
            for _ in 0..16 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
                pushed.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            if s.shutdown().await.is_ok() {
                finished.fetch_add(1, Ordering::Relaxed);
            }
            std::future::pending::<()>().await;
        });
    }
    // The session takes its budget, then holds the peer back.
    within(async {
        while tracked(&server).2 < MAX_UNREAD {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut last = pushed.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = pushed.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let unread = tracked(&server).2;
    // At most one frame past the bound: the tap stops between reads, not inside a frame.
    assert!(
        (MAX_UNREAD..MAX_UNREAD + 64 * 1024).contains(&unread),
        "{unread} bytes unread"
    );
    assert!(
        finished.load(Ordering::Relaxed) < 400,
        "every writer finished: nothing held the peer back"
    );

    // Readers give the budget back and the rest comes in; streams dropped unread give back what
    // they held. (Read at once: a stream read alone waits while unread streams hold the budget,
    // as on QUIC.)
    let mut readers = Vec::new();
    for i in 0..400 {
        let mut s = within(server.accept()).await.unwrap();
        readers.push(tokio::spawn(async move {
            if i % 2 == 1 {
                return 0;
            }
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.len()
        }));
    }
    let mut read = 0;
    for r in readers {
        read += within(r).await.unwrap();
    }
    assert_eq!(read, 200 * 256 * 1024);
    within(async {
        while tracked(&server) != (0, 0, 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Our frames against tungstenite's, in both roles over an in-memory pipe: large messages both
/// ways, a Ping answered with its payload, and a Close reason each way.
#[tokio::test]
async fn frames_interoperate_with_tungstenite() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole};

    for ours in [Role::Server, Role::Client] {
        let (a, b) = tokio::io::duplex(8 * 1024);
        let theirs = match ours {
            Role::Server => WsRole::Client,
            Role::Client => WsRole::Server,
        };
        let mut peer = tokio_tungstenite::WebSocketStream::from_raw_socket(
            b,
            theirs,
            Some(websocket_config()),
        )
        .await;
        let link = Link::new();
        let upgraded = Upgraded {
            io: a,
            role: ours,
            tail: Bytes::new(),
        };
        let mut io = WsIo::new(
            upgraded,
            Liveness::pings(DEFAULT_PING_INTERVAL),
            link.clone(),
        );

        // Theirs to ours: a message larger than a read, a Ping, a small message.
        let big = pattern(1, 300_000);
        let mut got = vec![0u8; big.len() + 3];
        let (sent, read) = within(async {
            tokio::join!(
                async {
                    peer.send(Message::Binary(big.clone().into())).await?;
                    peer.send(Message::Ping(Bytes::from_static(b"hi"))).await?;
                    peer.send(Message::Binary(Bytes::from_static(b"end"))).await
                },
                io.read_exact(&mut got),
            )
        })
        .await;
        sent.unwrap();
        read.unwrap();
        assert_eq!(&got[..big.len()], &big[..]);
        assert_eq!(&got[big.len()..], b"end");

        // Ours to theirs: the Pong first, then the bytes in order.
        let back = pattern(2, 200_000);
        let (written, received) = within(async {
            tokio::join!(
                async {
                    io.write_all(&back).await?;
                    io.flush().await
                },
                async {
                    let mut pong = None;
                    let mut data = Vec::new();
                    while data.len() < back.len() {
                        match peer.next().await {
                            Some(Ok(Message::Pong(p))) => pong = Some(p),
                            Some(Ok(Message::Binary(b))) => {
                                assert!(pong.is_some(), "data before the pong");
                                assert!(b.len() <= MESSAGE_SIZE);
                                data.extend_from_slice(&b);
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                    (pong, data)
                },
            )
        })
        .await;
        written.unwrap();
        assert_eq!(received.0.as_deref(), Some(&b"hi"[..]));
        assert_eq!(received.1, back);

        match ours {
            Role::Server => {
                // Their Close: our reads end, the reason is kept, our reply ends their stream.
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "bye".into(),
                };
                let (closed, n) =
                    within(async { tokio::join!(peer.close(Some(frame)), io.read(&mut got)) })
                        .await;
                closed.unwrap();
                assert_eq!(n.unwrap(), 0);
                assert_eq!(link.peer_reason().as_deref(), Some("bye"));
                assert!(io.write(b"late").await.is_err());
                match within(peer.next()).await {
                    Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
                    other => panic!("{other:?}"),
                }
                drop(io);
                assert!(within(peer.next()).await.is_none());
            }
            Role::Client => {
                // Our Close: the reason arrives and their reply completes our close handshake.
                let ((), (first, second)) = within(async {
                    tokio::join!(io.refuse("going"), async {
                        (peer.next().await, peer.next().await)
                    })
                })
                .await;
                match first {
                    Some(Ok(Message::Close(Some(f)))) => {
                        assert_eq!(f.code, CloseCode::Normal);
                        assert_eq!(f.reason.as_str(), "going");
                    }
                    other => panic!("{other:?}"),
                }
                assert!(second.is_none(), "{second:?}");
                assert!(matches!(io.state, CloseState::Closed));
            }
        }
    }
}

/// Frames that come in the same read as the `101` (tungstenite keeps them past the HTTP head) are
/// the first of the session. (A server refuses bytes behind the request: tungstenite answers
/// them with an error, so there is no such tail on that side.)
#[tokio::test]
async fn frames_right_behind_the_101_are_kept() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        while !request.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tcp.read_exact(&mut byte).await.unwrap();
            request.push(byte[0]);
        }
        let request = String::from_utf8(request).unwrap();
        let key = request
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(": ")?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then_some(value)
            })
            .unwrap();
        // The 101 and our first frame in one write.
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            tungstenite::handshake::derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        frame::control(Role::Server, frame::BINARY, b"from server", &mut out);
        tcp.write_all(&out).await.unwrap();
        let mut io = WsIo::new(
            Upgraded::server(tcp),
            Liveness::pings(DEFAULT_PING_INTERVAL),
            Link::new(),
        );
        let mut got = [0u8; 11];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"from client");
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let up = within(client_upgrade(
        format!("ws://127.0.0.1:{}{DEFAULT_PATH}", addr.port()),
        tcp,
    ))
    .await
    .unwrap();
    assert_eq!(up.tail.len(), 2 + 11);
    let mut io = WsIo::new(up, Liveness::pings(DEFAULT_PING_INTERVAL), Link::new());
    let mut got = [0u8; 11];
    within(io.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"from server");
    io.write_all(b"from client").await.unwrap();
    io.flush().await.unwrap();
    within(server).await.unwrap();
}
