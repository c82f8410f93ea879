//! The relay as Cloud Foundry runs it: no UDP (only `listen.http` on `${PORT}`), its instance
//! named after the app and index it reads from the environment.

use std::collections::BTreeMap;

use postern_agent::Status;
use postern_agent::config::{RelayTarget, TransportChoice, WebsocketSettings};
use postern_common::pki::Kind;
use postern_relay::Relay;
use postern_tests::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_only_an_http_listener_serves_agents_and_clients_over_websocket() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let yaml = format!(
        "listen:\n  http: 127.0.0.1:${{PORT}}\n{tls}heartbeat_interval: 1s\nagents:\n  db1:\n    services: [orders]\nservices:\n  orders:\n    clients: [alice]\n",
        tls = pki.tls_yaml("server-relay"),
    );
    let path = pki.dir().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    // What Cloud Foundry puts in the environment of instance 3 of app "postern-relay".
    let env = BTreeMap::from([
        ("PORT", "0"),
        ("CF_INSTANCE_INDEX", "3"),
        (
            "VCAP_APPLICATION",
            r#"{"application_id":"6f1c6c8e-guid","application_name":"postern-relay","instance_index":3}"#,
        ),
    ]);
    let config = postern_relay::Config::load_with(&path, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.quic_listen, None);
    assert_eq!(config.instance, "postern-relay/3");
    let relay = Relay::bind(config).await.expect("bind");
    assert_eq!(relay.quic_addr(), None, "no UDP socket at all");
    let http = relay.http_addr().expect("http listener");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));

    let url = format!("ws://localhost:{}", http.port());
    let mut agent = AgentRun::start(
        pki.dir(),
        &format!(
            "relay: {url}\n{tls}services:\n  orders:\n    backend: {}\n",
            db.backend(),
            tls = pki.tls_yaml("agent-db1"),
        ),
    );
    agent.wait_connected().await;
    match &*agent.status.borrow() {
        Status::Connected { relay_instance, .. } => assert_eq!(relay_instance, "postern-relay/3"),
        other => panic!("{other:?}"),
    }
    let target = RelayTarget {
        quic: None,
        websocket: Some(url.parse().unwrap()),
    };
    let c = ConnectRun::start_with(
        &pki,
        target,
        TransportChoice::Auto,
        WebsocketSettings::default(),
        "alice",
        "orders",
    )
    .await
    .expect("connect over websocket");
    assert_eq!(
        client::query(c.addr.port(), "SELECT 'no udp needed'").unwrap(),
        "no udp needed\n"
    );
    agent.stop().await;
    shutdown.cancel();
    running.await.unwrap();
}
