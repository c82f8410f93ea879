//! Killed and restarted processes, and garbage on the wire.

use std::time::Duration;

use bytes::BufMut;
use postern_common::pki::Kind;
use postern_tests::procs::Proc;
use postern_tests::*;
use tokio::io::AsyncReadExt;

/// Connects through `port` and returns the server's first packet or the error a client sees.
async fn first_packet(port: u16) -> Result<Vec<u8>, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(body)
}

fn is_greeting(p: &Result<Vec<u8>, String>) -> bool {
    matches!(p, Ok(b) if b.first() == Some(&10))
}

fn err_text(p: &Result<Vec<u8>, String>) -> Option<String> {
    match p {
        Ok(b) if b.first() == Some(&0xff) => Some(String::from_utf8_lossy(&b[9..]).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_gives_clear_errors_and_a_restart_restores_service() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let agent_cfg = pki.dir().join("agent.yaml");
    std::fs::write(
        &agent_cfg,
        agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    )
    .unwrap();
    let cfg = agent_cfg.to_str().unwrap().to_owned();
    let mut agent = Proc::spawn(
        "postern-agent",
        &["run", "--config", &cfg],
        pki.dir().join("agent1.log"),
    );
    relay.wait_agent("db1").await;
    let c = ConnectRun::start(&pki, relay.quic, "alice", "orders").await;
    assert!(is_greeting(&first_packet(c.addr.port()).await));

    agent.kill();
    // Within about two heartbeats (1 s each) new clients get a MySQL error that says why.
    let started = tokio::time::Instant::now();
    let msg = eventually(
        Duration::from_secs(5),
        "a clear error after the agent died",
        || async {
            err_text(&first_packet(c.addr.port()).await)
                .filter(|m| m.contains("no agent is connected"))
        },
    )
    .await;
    assert!(msg.contains("orders"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(relay.handle.agents().is_empty());

    // Start it again: service is back within 5 s, without touching the relay.
    let restarted = tokio::time::Instant::now();
    let _agent = Proc::spawn(
        "postern-agent",
        &["run", "--config", &cfg],
        pki.dir().join("agent2.log"),
    );
    eventually(
        Duration::from_secs(5),
        "service back after agent restart",
        || async { is_greeting(&first_packet(c.addr.port()).await).then_some(()) },
    )
    .await;
    assert!(restarted.elapsed() < Duration::from_secs(5));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_by_itself_after_the_relay_is_killed_and_restarted() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let quic_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let tcp_port = mariadb::free_port();
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice"])
        .replace("quic: 127.0.0.1:0", &format!("quic: 127.0.0.1:{quic_port}"))
        .replace(
            "    tls_listen: 127.0.0.1:0\n",
            &format!("    tls_listen: 127.0.0.1:{tcp_port}\n"),
        )
        .replace("    listen: 127.0.0.1:0\n", "");
    let relay_cfg = pki.dir().join("relay.yaml");
    std::fs::write(&relay_cfg, yaml).unwrap();
    let rc = relay_cfg.to_str().unwrap().to_owned();
    let mut relay = Proc::spawn(
        "postern-relay",
        &["run", "--config", &rc],
        pki.dir().join("relay1.log"),
    );
    let relay_addr = format!("127.0.0.1:{quic_port}").parse().unwrap();
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay_addr, "orders", &db.backend()),
    );
    agent.wait_connected().await;

    let tls_ok = |port: u16| {
        let material = pki.client_material("alice");
        async move {
            let tls = postern_common::tls::listener_client(&material).ok()?;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            let mut conn = connector
                .connect("localhost".try_into().ok()?, tcp)
                .await
                .ok()?;
            let mut head = [0u8; 5];
            conn.read_exact(&mut head).await.ok()?;
            (head[4] == 10).then_some(())
        }
    };
    eventually(
        Duration::from_secs(5),
        "service through the first relay",
        || tls_ok(tcp_port),
    )
    .await;

    relay.kill();
    // The agent notices (heartbeats stop) ...
    tokio::time::timeout(
        Duration::from_secs(5),
        agent
            .status
            .wait_for(|s| matches!(s, postern_agent::Status::Disconnected(_))),
    )
    .await
    .expect("agent notices the dead relay within about two heartbeats")
    .unwrap();
    // ... and comes back by itself once a relay runs again on the same address.
    let _relay = Proc::spawn(
        "postern-relay",
        &["run", "--config", &rc],
        pki.dir().join("relay2.log"),
    );
    eventually(
        Duration::from_secs(15),
        "service through the restarted relay",
        || tls_ok(tcp_port),
    )
    .await;
    agent.stop().await;
}

/// A raw QUIC connection to the relay with the given certificate, as a misbehaving peer.
async fn raw_session(pki: &TestPki, base: &str, relay: std::net::SocketAddr) -> quinn::Connection {
    let material = pki.material(base);
    let ep = postern_common::transport::quic::client(
        relay,
        &material,
        postern_common::transport::Liveness::AGENT,
    )
    .unwrap();
    ep.endpoint()
        .connect(relay, "localhost")
        .unwrap()
        .await
        .expect("tls handshake with the relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_only_the_offending_stream_or_session() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Agent, "rogue");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice"])
        .replace("agents:\n", "agents:\n  rogue:\n    services: [orders]\n");
    let relay = RelayRun::start(pki.dir(), &yaml).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    let c = ConnectRun::start(&pki, relay.quic, "alice", "orders").await;
    assert!(is_greeting(&first_packet(c.addr.port()).await));

    // 1. An agent whose control stream starts with garbage: its session is closed.
    let rogue = raw_session(&pki, "agent-rogue", relay.quic).await;
    let (mut send, _recv) = rogue.open_bi().await.unwrap();
    send.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), rogue.closed())
        .await
        .expect("rogue session closed");
    assert!(why.to_string().contains("bad control stream"), "{why}");

    // 2. An agent that says hello with an oversized frame: closed too.
    let rogue = raw_session(&pki, "agent-rogue", relay.quic).await;
    let (mut send, _recv) = rogue.open_bi().await.unwrap();
    let mut bytes = b"PSTN".to_vec();
    bytes.put_u32(1 << 30);
    send.write_all(&bytes).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), rogue.closed())
        .await
        .expect("rogue session closed");
    assert!(why.to_string().contains("exceeds the limit"), "{why}");

    // 3. A client session sending an oversized open frame on one stream, garbage on another:
    //    those streams are reset, the session and its other streams keep working.
    let client = raw_session(&pki, "client-alice", relay.quic).await;
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let mut buf = [0u8; 1];
    assert!(
        recv.read(&mut buf).await.is_err(),
        "oversized preamble: stream reset"
    );
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    send.write_all(b"PSTN\x00\x00\x00\x05hello").await.unwrap();
    assert!(
        recv.read(&mut buf).await.is_err(),
        "garbage preamble: stream reset"
    );
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    postern_common::wire::write_first(
        &mut send,
        &postern_common::protocol::Open::for_service("orders"),
    )
    .await
    .unwrap();
    let answer: postern_common::protocol::Answer =
        postern_common::wire::read_first(&mut recv).await.unwrap();
    assert!(
        matches!(answer, postern_common::protocol::Answer::Ok { .. }),
        "{answer:?}"
    );
    let mut head = [0u8; 5];
    recv.read_exact(&mut head).await.unwrap();
    assert_eq!(head[4], 10, "greeting on a good stream of the same session");

    // Everyone else was undisturbed all along.
    assert!(is_greeting(&first_packet(c.addr.port()).await));
    assert_eq!(relay.handle.agents().len(), 1);
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_versions_get_a_clear_refusal() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let conn = raw_session(&pki, "agent-db1", relay.quic).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = postern_common::protocol::Control::Hello {
        versions: vec![99],
        services: vec!["orders".into()],
        software: "future".into(),
        take_over: false,
        features: Vec::new(),
    };
    postern_common::wire::write_first(&mut send, &hello)
        .await
        .unwrap();
    let answer: postern_common::protocol::Control = tokio::time::timeout(
        Duration::from_secs(5),
        postern_common::wire::read_frame(&mut recv),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap();
    match answer {
        postern_common::protocol::Control::Refused { code, message } => {
            assert_eq!(code, postern_common::protocol::Code::UnsupportedVersion);
            assert!(
                message.contains("[99]") && message.contains("[1]"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_agent_identity_replaces_its_old_session_at_once() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let mut first = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    first.wait_connected().await;
    relay.wait_agent("db1").await;
    let since = relay.handle.agents()[0].remote.clone();

    // The same identity from a second process (a restart while the old one still looks alive).
    let dir = tempfile::tempdir().unwrap();
    let mut second = AgentRun::start(
        dir.path(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    second.wait_connected().await;
    eventually(
        Duration::from_secs(2),
        "the new session to replace the old",
        || {
            let agents = relay.handle.agents();
            let replaced = agents.len() == 1 && agents[0].remote != since;
            async move { replaced.then_some(()) }
        },
    )
    .await;
    // The old session was closed by the relay (not left to time out).
    tokio::time::timeout(
        Duration::from_secs(2),
        first.status.wait_for(
            |s| matches!(s, postern_agent::Status::Disconnected(r) if r.contains("replaced")),
        ),
    )
    .await
    .expect("old session closed at once")
    .unwrap();
    let c = ConnectRun::start(&pki, relay.quic, "alice", "orders").await;
    assert!(is_greeting(&first_packet(c.addr.port()).await));
    first.stop().await;
    second.stop().await;
    relay.stop().await;
}

/// A stand-in relay that misbehaves towards a real agent: it welcomes it, then opens streams
/// carrying garbage and oversized frames. The agent must reset those streams and keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_garbage_streams_from_the_relay() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    let db = MariaDb::start().await;
    let material = pki.material("server-relay");
    let ep = postern_common::transport::quic::server(
        "127.0.0.1:0".parse().unwrap(),
        &material,
        Duration::from_secs(10),
    )
    .unwrap();
    let addr = ep.endpoint().local_addr().unwrap();
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", addr, "orders", &db.backend()),
    );
    let conn = ep.endpoint().accept().await.unwrap().await.unwrap();
    let (mut ctl_send, mut ctl_recv) = conn.accept_bi().await.unwrap();
    let _hello: postern_common::protocol::Control = postern_common::wire::read_first(&mut ctl_recv)
        .await
        .unwrap();
    let welcome = postern_common::protocol::Control::Welcome {
        version: 1,
        relay_instance: "test".into(),
        accepted: vec!["orders".into()],
        rejected: vec![],
        heartbeat_ms: 60_000,
        app_guid: None,
        instance_index: None,
        features: vec![],
    };
    postern_common::wire::write_frame(&mut ctl_send, &welcome)
        .await
        .unwrap();
    agent.wait_connected().await;

    let mut oversized = b"PSTN".to_vec();
    oversized.put_u32(u32::MAX);
    for garbage in [
        &b"\x00\x01\x02\x03garbage"[..],
        &oversized,
        b"PSTN\x00\x00\x00\x02{}",
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(garbage).await.unwrap();
        let mut buf = [0u8; 1];
        let got = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf))
            .await
            .expect("agent answers");
        assert!(
            got.is_err(),
            "garbage stream {garbage:?} is reset, got {got:?}"
        );
    }
    // The same session still serves a good stream.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = postern_common::protocol::Open {
        service: "orders".into(),
        client: "alice".into(),
        client_addr: "127.0.0.1:1".into(),
        conn_id: 1,
        pre_auth: false,
        mode: Default::default(),
    };
    postern_common::wire::write_first(&mut send, &open)
        .await
        .unwrap();
    let answer: postern_common::protocol::Answer =
        postern_common::wire::read_first(&mut recv).await.unwrap();
    assert!(
        matches!(answer, postern_common::protocol::Answer::Ok { .. }),
        "{answer:?}"
    );
    let mut head = [0u8; 5];
    recv.read_exact(&mut head).await.unwrap();
    assert_eq!(head[4], 10);
    assert!(matches!(
        *agent.status.borrow(),
        postern_agent::Status::Connected { .. }
    ));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_gives_clients_a_mysql_error_that_says_why() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let mut db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    let c = ConnectRun::start(&pki, relay.quic, "alice", "orders").await;
    assert!(is_greeting(&first_packet(c.addr.port()).await));

    // The database goes away: the next client gets an ERR packet naming the backend, not a reset.
    db.kill();
    let got = first_packet(c.addr.port()).await;
    let text = err_text(&got).unwrap_or_else(|| panic!("an ERR packet, got {got:?}"));
    assert!(
        text.contains("cannot connect to backend") && text.contains(&db.backend()),
        "{text}"
    );
    let out = client::query(c.addr.port(), "SELECT 1").expect_err("the mariadb client fails");
    assert!(
        out.contains("1053") && out.contains("is unavailable"),
        "{out}"
    );
    // The agent's session with the relay is untouched.
    assert!(matches!(
        *agent.status.borrow(),
        postern_agent::Status::Connected { .. }
    ));
    agent.stop().await;
    relay.stop().await;
}
