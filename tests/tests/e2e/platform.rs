//! The relay as Cloud Foundry runs it: no UDP (only `listen.http` on `${PORT}`), its instance
//! named after the app and index it reads from the environment.

use postern_agent::Status;
use postern_agent::config::TransportChoice;
use postern_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_only_an_http_listener_serves_agents_and_clients_over_websocket() {
    let s = Stack::builder()
        .mariadb()
        .transport(Transport::DirectWebsocket)
        // What Cloud Foundry puts in the environment of instance 3 of app "postern-relay".
        .relay_env([
            ("PORT", "0"),
            ("CF_INSTANCE_INDEX", "3"),
            (
                "VCAP_APPLICATION",
                r#"{"application_id":"6f1c6c8e-guid","application_name":"postern-relay","instance_index":3}"#,
            ),
        ])
        .relay(|r| {
            r.listen.quic = None;
            r.listen.http = Some("127.0.0.1:${PORT}".into());
        })
        .start()
        .await;
    let stack::RelayNode::InProcess(relay) = s.relay() else {
        unreachable!("the stack's relay runs in-process")
    };
    assert_eq!(relay.quic, None, "no UDP socket at all");
    assert!(relay.http.is_some(), "an HTTP listener on ${{PORT}}");
    // The instance is named after the app and index from the environment.
    match &*s.agent().status.borrow() {
        Status::Connected { relay_instance, .. } => assert_eq!(relay_instance, "postern-relay/3"),
        other => panic!("{other:?}"),
    }
    // `connect` with the transport left to choose: only WebSocket is there.
    let mut to = s.connect_to();
    to.transport = TransportChoice::Auto;
    let c = ConnectRun::start_with(&s.pki, to, "alice", "orders", true)
        .await
        .expect("connect over websocket");
    assert_eq!(
        c.cli().query("SELECT 'no udp needed'").unwrap(),
        "no udp needed\n"
    );
    c.stop().await;
    s.stop().await;
}
