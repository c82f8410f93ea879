//! The WebSocket transport through real middleboxes: nginx terminating TLS as the platform
//! router does, tinyproxy as a corporate CONNECT proxy, a blocked UDP path, router restarts.

use std::time::Duration;

use mysql_async::prelude::*;
use postern_agent::config::{ProxySetting, RelayTarget, TransportChoice, WebsocketSettings};
use postern_common::pki::Kind;
use postern_common::transport::TransportKind;
use postern_tests::config::AgentTransport;
use postern_tests::router::Tinyproxy;
use postern_tests::*;

/// A relay behind nginx, a MariaDB, and no agent yet (each test starts its own).
async fn world() -> Stack {
    Stack::builder()
        .mariadb()
        .transport(Transport::Websocket)
        .no_agent()
        .start()
        .await
}

/// `connect` over WebSocket through the router with `settings`.
async fn connect_ws(w: &Stack, settings: WebsocketSettings) -> ConnectRun {
    let mut to = w.connect_to();
    to.websocket = settings;
    ConnectRun::start_with(&w.pki, to, "alice", "orders", true)
        .await
        .expect("connect over websocket")
}

/// An agent that races a QUIC url `quic` against the router (`transport: auto`).
fn racing_agent(w: &Stack, quic: &str) -> AgentConfig {
    let mut config = w.agent_config();
    config.relay = Some(RelaySpec::Both {
        quic: quic.to_owned(),
        websocket: w.ws_url(),
    });
    config.transport = Some(AgentTransport::Auto);
    config
}

fn mariadb(port: u16, sql: &str) -> String {
    Cli::at(port).query(sql).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_connect_through_nginx_carry_the_mariadb_cli_and_64_mib() {
    let s = Stack::builder()
        .mariadb()
        .transport(Transport::Websocket)
        .start()
        .await;
    assert_eq!(s.agent().transport(), Some(TransportKind::Websocket));
    let c = s.connect("alice").await;
    assert_eq!(mariadb(c.addr.port(), "SELECT 6 * 7"), "42\n");

    let pool = mysql_async::Pool::new(c.url().as_str());
    let mut conn = pool.get_conn().await.unwrap();
    conn.query_drop("CREATE DATABASE big; CREATE TABLE big.b (id INT PRIMARY KEY, data LONGBLOB)")
        .await
        .unwrap();
    let data: Vec<u8> = (0..64 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = sha256_hex(&data);
    conn.exec_drop("INSERT INTO big.b VALUES (1, ?)", (data,))
        .await
        .unwrap();
    let back: Option<Vec<u8>> = conn
        .query_first("SELECT data FROM big.b WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(sha256_hex(&back.unwrap()), want);
    drop(conn);
    pool.disconnect().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_connect_proxy_with_and_without_authentication() {
    let w = world().await;
    for auth in [None, Some(("proxyuser", "s3cret"))] {
        let proxy = Tinyproxy::start(auth).await;
        let proxy_url = match auth {
            Some((u, p)) => format!("http://{u}:{p}@{}", proxy.addr),
            None => format!("http://{}", proxy.addr),
        };
        let mut config = w.agent_config();
        config.websocket_mut().proxy = Some(proxy_url.clone());
        let mut agent = w.start_agent(&config);
        agent.wait_connected().await;
        let c = connect_ws(
            &w,
            WebsocketSettings {
                proxy: ProxySetting::parse("proxy", &proxy_url).expect("proxy url"),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(mariadb(c.addr.port(), "SELECT 'via proxy'"), "via proxy\n");
        assert!(
            proxy.log().contains("CONNECT"),
            "the proxy carried the tunnel: {}",
            proxy.log()
        );
        if auth.is_some() {
            // Wrong credentials: a clear error, not a hang.
            let mut to = w.connect_to();
            let bad = format!("http://proxyuser:wrong@{}", proxy.addr);
            to.websocket.proxy = ProxySetting::parse("proxy", &bad).expect("proxy url");
            let err = ConnectRun::start_with(&w.pki, to, "alice", "orders", true)
                .await
                .err()
                .expect("wrong proxy credentials are refused");
            // tinyproxy answers 401 to wrong credentials (407 when none are sent).
            let text = format!("{err:#}");
            assert!(
                text.contains("refused CONNECT") && (text.contains("401") || text.contains("407")),
                "{text}"
            );
        }
        agent.stop().await;
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_quickly_when_udp_is_blocked_and_prefers_quic_when_it_works() {
    let w = world().await;
    let url = w.ws_url();
    // A UDP port that swallows everything, as a firewall that drops UDP does.
    let black_hole = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead_quic = format!("quic://{}", black_hole.local_addr().unwrap());
    let swallow = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while black_hole.recv_from(&mut buf).await.is_ok() {}
    });

    // Time to the first query: WebSocket only, then auto with a dead QUIC path.
    let time_to_query = |target: RelayTarget, transport: TransportChoice| {
        let pki = &w.pki;
        async move {
            let started = tokio::time::Instant::now();
            let to = ConnectTo {
                target,
                transport,
                websocket: WebsocketSettings::default(),
            };
            let c = ConnectRun::start_with(pki, to, "alice", "orders", true)
                .await
                .unwrap();
            let port = c.addr.port();
            tokio::task::spawn_blocking(move || mariadb(port, "SELECT 1"))
                .await
                .unwrap();
            started.elapsed()
        }
    };
    let mut agent = w.start_agent(&racing_agent(&w, &dead_quic));
    agent.wait_connected().await;
    assert_eq!(
        agent.transport(),
        Some(TransportKind::Websocket),
        "agent fell back to websocket"
    );
    let ws_only = time_to_query(w.connect_to().target, TransportChoice::Websocket).await;
    let auto = time_to_query(
        RelayTarget {
            quic: Some(dead_quic.parse().unwrap()),
            websocket: Some(url.parse().unwrap()),
        },
        TransportChoice::Auto,
    )
    .await;
    eprintln!("time to first query: websocket only {ws_only:?}, auto with udp blocked {auto:?}");
    assert!(
        auto <= ws_only + Duration::from_secs(1),
        "auto {auto:?} vs websocket only {ws_only:?}"
    );
    agent.stop().await;
    swallow.abort();

    // With QUIC reachable, auto uses QUIC.
    let live_quic = format!("quic://{}", w.relay().quic());
    let mut agent = w.start_agent(&racing_agent(&w, &live_quic));
    agent.wait_connected().await;
    assert_eq!(agent.transport(), Some(TransportKind::Quic));
    agent.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_router_mid_session_recovers_within_5s() {
    let mut s = Stack::builder()
        .mariadb()
        .transport(Transport::Websocket)
        .start()
        .await;
    let c = s.connect("alice").await;
    assert_eq!(c.cli().ok("SELECT 1"), "1\n");

    s.nginx_mut().restart().await;
    let restarted = tokio::time::Instant::now();
    let cli = c.cli();
    eventually(
        Duration::from_secs(5),
        "queries through the restarted router",
        || async { (cli.query_async("SELECT 2").await.as_deref() == Ok("2\n")).then_some(()) },
    )
    .await;
    let recovered = restarted.elapsed();
    eprintln!("router restarted: service back after {recovered:?}");
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_client_certificate_header_without_a_valid_inner_certificate_is_refused() {
    let w = world().await;
    let url = w.ws_url();
    // The header claims alice's certificate; the inner TLS presents one from another CA.
    let alice_pem = std::fs::read_to_string(w.pki.files("client-alice").0).unwrap();
    let body: String = alice_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let other = TestPki::new();
    other.issue(Kind::Client, "alice");
    let mut material = other.material("client-alice");
    material.roots = w.pki.material("client-alice").roots; // it trusts the real relay
    let mut opts =
        postern_common::transport::ws::ConnectOptions::new(url.parse().unwrap(), "localhost");
    opts.headers.push(("X-Forwarded-Client-Cert".into(), body));
    opts.headers.push(("X-Client-Cert".into(), "alice".into()));
    let err = postern_common::transport::ws::connect(&opts, &material)
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("refused") || text.contains("closed"),
        "{text}"
    );
    // The real alice, same path, is served.
    let c = connect_ws(&w, WebsocketSettings::default()).await;
    let mut agent = w.start_agent(&w.agent_config());
    agent.wait_connected().await;
    assert_eq!(mariadb(c.addr.port(), "SELECT 3"), "3\n");
    agent.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_udp_opens_up_new_streams_move_to_quic_and_old_ones_finish_on_websocket() {
    let w = world().await;
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = udp::gate(w.relay().quic(), open.clone()).await;
    let mut config = racing_agent(&w, &format!("quic://{gate}"));
    config.quic_reprobe = Some(Duration::from_secs(1));
    let mut agent = w.start_agent(&config);
    agent.wait_connected().await;
    assert_eq!(agent.transport(), Some(TransportKind::Websocket));

    // A client connection opened while on WebSocket...
    let c = ConnectRun::start(&w.pki, w.relay().quic(), "alice", "orders").await;
    let mut old = mysql_async::Conn::from_url(c.url()).await.unwrap();
    let _: Option<u32> = old.query_first("SELECT 1").await.unwrap();

    // ... then UDP opens: the agent moves to QUIC by itself.
    open.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut status = agent.status.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| {
            matches!(
                s,
                postern_agent::Status::Connected {
                    transport: TransportKind::Quic,
                    ..
                }
            )
        }),
    )
    .await
    .expect("agent moves to quic")
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "relay to route new streams over quic",
        || {
            let agents = w.relay().handle().agents();
            async move {
                (agents.len() == 1 && agents[0].transport == TransportKind::Quic).then_some(())
            }
        },
    )
    .await;
    // The old connection still works (it drains on the WebSocket session) ...
    let v: Option<u32> = old.query_first("SELECT 2").await.unwrap();
    assert_eq!(v, Some(2));
    // ... and new ones work over QUIC.
    assert_eq!(mariadb(c.addr.port(), "SELECT 3"), "3\n");
    old.disconnect().await.unwrap();
    agent.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_honours_https_proxy_and_no_proxy_from_its_environment() {
    let w = world().await;
    let proxy = Tinyproxy::start(Some(("corp", "pw"))).await;
    let config = w.agent_config();
    let proxy_url = format!("http://corp:pw@{}", proxy.addr);
    let mut agent = w.start_agent_process(&config, &[("HTTPS_PROXY", &proxy_url)]);
    w.relay().wait_agent("db1").await;
    let tunnel = format!(
        "CONNECT localhost:{}",
        w.nginx.as_ref().unwrap().addr.port()
    );
    assert!(
        proxy.log().contains(&tunnel),
        "went through the proxy: {}",
        proxy.log()
    );
    agent.kill();

    // NO_PROXY for the relay's host: straight to the router.
    let proxy = Tinyproxy::start(Some(("corp", "pw"))).await;
    let proxy_url = format!("http://corp:pw@{}", proxy.addr);
    let before = w.relay().handle().connections_opened();
    let _agent = w.start_agent_process(
        &config,
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "localhost")],
    );
    let c = connect_ws(
        &w,
        WebsocketSettings {
            proxy: ProxySetting::Direct,
            ..Default::default()
        },
    )
    .await;
    let cli = c.cli();
    eventually(
        Duration::from_secs(10),
        "service through the direct agent",
        || async { cli.query_async("SELECT 1").await.is_ok().then_some(()) },
    )
    .await;
    assert!(w.relay().handle().connections_opened() > before);
    assert!(
        !proxy.log().contains(&tunnel),
        "NO_PROXY bypassed the proxy: {}",
        proxy.log()
    );
    w.stop().await;
}
