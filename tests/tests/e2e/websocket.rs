//! The WebSocket transport through real middleboxes: nginx terminating TLS as the platform
//! router does, tinyproxy as a corporate CONNECT proxy, a blocked UDP path, router restarts.

use std::time::Duration;

use mysql_async::prelude::*;
use postern_agent::config::{ProxySetting, RelayTarget, TransportChoice, WebsocketSettings};
use postern_common::pki::Kind;
use postern_common::transport::TransportKind;
use postern_tests::procs::Proc;
use postern_tests::router::{Nginx, Tinyproxy, Upstreams};
use postern_tests::*;
use sha2::{Digest, Sha256};

struct World {
    pki: TestPki,
    db: MariaDb,
    relay: RelayRun,
    nginx: Nginx,
}

async fn world() -> World {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let (cert, key) = pki.files("server-relay");
    let nginx = Nginx::start(
        &cert,
        &key,
        Upstreams {
            relays: vec![relay.http.unwrap()],
            app_guid: None,
        },
    )
    .await;
    World {
        pki,
        db,
        relay,
        nginx,
    }
}

fn wss(nginx: &Nginx) -> String {
    format!("wss://localhost:{}/v1/tunnel", nginx.addr.port())
}

/// Agent YAML with a WebSocket relay and extra `websocket:` settings.
fn agent_ws_yaml(w: &World, relay: &str, transport: &str, websocket: &str) -> String {
    format!(
        "relay: {relay}\ntransport: {transport}\nserver_name: localhost\n{tls}websocket:\n  ping_interval: 2s\n{websocket}services:\n  orders:\n    backend: {backend}\n",
        tls = w.pki.tls_yaml("agent-db1"),
        backend = w.db.backend(),
    )
}

fn ws_target(url: &str) -> RelayTarget {
    RelayTarget {
        quic: None,
        websocket: Some(url.parse().unwrap()),
    }
}

async fn connect_ws(w: &World, url: &str, settings: WebsocketSettings) -> ConnectRun {
    ConnectRun::start_with(
        &w.pki,
        ws_target(url),
        TransportChoice::Websocket,
        settings,
        "alice",
        "orders",
    )
    .await
    .expect("connect over websocket")
}

fn mariadb(port: u16, sql: &str) -> String {
    client::query(port, sql).unwrap_or_else(|e| panic!("{e}"))
}

fn transport_of(agent: &AgentRun) -> Option<TransportKind> {
    match &*agent.status.borrow() {
        postern_agent::Status::Connected { transport, .. } => Some(*transport),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_connect_through_nginx_carry_the_mariadb_cli_and_64_mib() {
    let w = world().await;
    let url = wss(&w.nginx);
    let mut agent = AgentRun::start(w.pki.dir(), &agent_ws_yaml(&w, &url, "websocket", ""));
    agent.wait_connected().await;
    assert_eq!(transport_of(&agent), Some(TransportKind::Websocket));
    let c = connect_ws(&w, &url, WebsocketSettings::default()).await;
    assert_eq!(mariadb(c.addr.port(), "SELECT 6 * 7"), "42\n");

    let pool =
        mysql_async::Pool::new(format!("mysql://root@127.0.0.1:{}/mysql", c.addr.port()).as_str());
    let mut conn = pool.get_conn().await.unwrap();
    conn.query_drop("CREATE DATABASE big; CREATE TABLE big.b (id INT PRIMARY KEY, data LONGBLOB)")
        .await
        .unwrap();
    let data: Vec<u8> = (0..64 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = hex(&Sha256::digest(&data));
    conn.exec_drop("INSERT INTO big.b VALUES (1, ?)", (data,))
        .await
        .unwrap();
    let back: Option<Vec<u8>> = conn
        .query_first("SELECT data FROM big.b WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(hex(&Sha256::digest(back.unwrap())), want);
    drop(conn);
    pool.disconnect().await.unwrap();
    agent.stop().await;
    w.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_connect_proxy_with_and_without_authentication() {
    let w = world().await;
    let url = wss(&w.nginx);
    for auth in [None, Some(("proxyuser", "s3cret"))] {
        let proxy = Tinyproxy::start(auth).await;
        let proxy_url = match auth {
            Some((u, p)) => format!("http://{u}:{p}@{}", proxy.addr),
            None => format!("http://{}", proxy.addr),
        };
        let mut agent = AgentRun::start(
            w.pki.dir(),
            &agent_ws_yaml(&w, &url, "websocket", &format!("  proxy: {proxy_url}\n")),
        );
        agent.wait_connected().await;
        let c = connect_ws(
            &w,
            &url,
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
            let bad = format!("http://proxyuser:wrong@{}", proxy.addr);
            let err = ConnectRun::start_with(
                &w.pki,
                ws_target(&url),
                TransportChoice::Websocket,
                WebsocketSettings {
                    proxy: ProxySetting::parse("proxy", &bad).expect("proxy url"),
                    ..Default::default()
                },
                "alice",
                "orders",
            )
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
    w.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_quickly_when_udp_is_blocked_and_prefers_quic_when_it_works() {
    let w = world().await;
    let url = wss(&w.nginx);
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
            let c = ConnectRun::start_with(
                pki,
                target,
                transport,
                WebsocketSettings::default(),
                "alice",
                "orders",
            )
            .await
            .unwrap();
            let port = c.addr.port();
            tokio::task::spawn_blocking(move || mariadb(port, "SELECT 1"))
                .await
                .unwrap();
            started.elapsed()
        }
    };
    let mut agent = AgentRun::start(
        w.pki.dir(),
        &agent_ws_yaml(
            &w,
            &format!("{{ quic: \"{dead_quic}\", websocket: \"{url}\" }}"),
            "auto",
            "",
        ),
    );
    agent.wait_connected().await;
    assert_eq!(
        transport_of(&agent),
        Some(TransportKind::Websocket),
        "agent fell back to websocket"
    );
    let ws_only = time_to_query(ws_target(&url), TransportChoice::Websocket).await;
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
    let live_quic = format!("quic://{}", w.relay.quic);
    let mut agent = AgentRun::start(
        w.pki.dir(),
        &agent_ws_yaml(
            &w,
            &format!("{{ quic: \"{live_quic}\", websocket: \"{url}\" }}"),
            "auto",
            "",
        ),
    );
    agent.wait_connected().await;
    assert_eq!(transport_of(&agent), Some(TransportKind::Quic));
    agent.stop().await;
    w.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_router_mid_session_recovers_within_5s() {
    let mut w = world().await;
    let url = wss(&w.nginx);
    let mut agent = AgentRun::start(w.pki.dir(), &agent_ws_yaml(&w, &url, "websocket", ""));
    agent.wait_connected().await;
    let c = connect_ws(&w, &url, WebsocketSettings::default()).await;
    assert_eq!(mariadb(c.addr.port(), "SELECT 1"), "1\n");

    w.nginx.restart().await;
    let restarted = tokio::time::Instant::now();
    let port = c.addr.port();
    eventually(
        Duration::from_secs(5),
        "queries through the restarted router",
        || async move {
            let out = client::query_async(port, "SELECT 2").await;
            (out.as_deref() == Ok("2\n")).then_some(())
        },
    )
    .await;
    assert!(restarted.elapsed() < Duration::from_secs(5));
    agent.stop().await;
    w.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_client_certificate_header_without_a_valid_inner_certificate_is_refused() {
    let w = world().await;
    let url = wss(&w.nginx);
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
    let c = connect_ws(&w, &url, WebsocketSettings::default()).await;
    let mut agent = AgentRun::start(w.pki.dir(), &agent_ws_yaml(&w, &url, "websocket", ""));
    agent.wait_connected().await;
    assert_eq!(mariadb(c.addr.port(), "SELECT 3"), "3\n");
    agent.stop().await;
    w.relay.stop().await;
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A UDP path that drops everything until `open` is set, then forwards to `to` (and back).
async fn udp_gate(
    to: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    let front = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut backs: HashMap<std::net::SocketAddr, std::sync::Arc<tokio::net::UdpSocket>> =
            HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            if !open.load(Ordering::Relaxed) {
                continue;
            }
            let back = match backs.get(&from) {
                Some(b) => b.clone(),
                None => {
                    let b = std::sync::Arc::new(
                        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
                    );
                    b.connect(to).await.unwrap();
                    let (b2, front2) = (b.clone(), front.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = b2.recv(&mut buf).await {
                            let _ = front2.send_to(&buf[..n], from).await;
                        }
                    });
                    backs.insert(from, b.clone());
                    b
                }
            };
            let _ = back.send(&buf[..n]).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_udp_opens_up_new_streams_move_to_quic_and_old_ones_finish_on_websocket() {
    let w = world().await;
    let url = wss(&w.nginx);
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = udp_gate(w.relay.quic, open.clone()).await;
    let yaml = agent_ws_yaml(
        &w,
        &format!("{{ quic: \"quic://{gate}\", websocket: \"{url}\" }}"),
        "auto",
        "",
    )
    .replace("transport: auto\n", "transport: auto\nquic_reprobe: 1s\n");
    let mut agent = AgentRun::start(w.pki.dir(), &yaml);
    agent.wait_connected().await;
    assert_eq!(transport_of(&agent), Some(TransportKind::Websocket));

    // A client connection opened while on WebSocket...
    let c = ConnectRun::start(&w.pki, w.relay.quic, "alice", "orders").await;
    let mut old =
        mysql_async::Conn::from_url(format!("mysql://root@127.0.0.1:{}/mysql", c.addr.port()))
            .await
            .unwrap();
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
            let agents = w.relay.handle.agents();
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
    w.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_honours_https_proxy_and_no_proxy_from_its_environment() {
    let w = world().await;
    let url = wss(&w.nginx);
    let proxy = Tinyproxy::start(Some(("corp", "pw"))).await;
    let cfg = w.pki.dir().join("agent-env.yaml");
    std::fs::write(&cfg, agent_ws_yaml(&w, &url, "websocket", "")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let proxy_url = format!("http://corp:pw@{}", proxy.addr);
    let mut agent = Proc::spawn_env(
        "postern-agent",
        &["run", "--config", &cfg],
        &[("HTTPS_PROXY", &proxy_url)],
        w.pki.dir().join("agent-env.log"),
    );
    w.relay.wait_agent("db1").await;
    let tunnel = format!("CONNECT localhost:{}", w.nginx.addr.port());
    assert!(
        proxy.log().contains(&tunnel),
        "went through the proxy: {}",
        proxy.log()
    );
    agent.kill();

    // NO_PROXY for the relay's host: straight to the router.
    let proxy = Tinyproxy::start(Some(("corp", "pw"))).await;
    let proxy_url = format!("http://corp:pw@{}", proxy.addr);
    let before = w.relay.handle.connections_opened();
    let _agent = Proc::spawn_env(
        "postern-agent",
        &["run", "--config", &cfg],
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "localhost")],
        w.pki.dir().join("agent-env2.log"),
    );
    let c = connect_ws(
        &w,
        &url,
        WebsocketSettings {
            proxy: ProxySetting::Direct,
            ..Default::default()
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "service through the direct agent",
        || async {
            let port = c.addr.port();
            let ok = client::query_async(port, "SELECT 1").await.is_ok();
            ok.then_some(())
        },
    )
    .await;
    assert!(w.relay.handle.connections_opened() > before);
    assert!(
        !proxy.log().contains(&tunnel),
        "NO_PROXY bypassed the proxy: {}",
        proxy.log()
    );
    w.relay.stop().await;
}
