//! A relay fleet on Cloud Foundry: two relay instances behind one router that pins requests with
//! `X-Cf-App-Instance` (and balances the rest at random). The agent holds a session with each.

use std::sync::Arc;

use mysql_async::prelude::*;
use postern_agent::config::{RelayTarget, TransportChoice, WebsocketSettings};
use postern_common::pki::Kind;
use postern_relay::config::CfInstance;
use postern_tests::router::{Nginx, Upstreams};
use postern_tests::*;

const GUID: &str = "2f1c7a3e-5b1d-4c7e-9a53-0d4e1f2a3b4c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_every_relay_instance_and_survives_losing_one() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice"]);
    let dir0 = tempfile::tempdir().unwrap();
    let dir1 = tempfile::tempdir().unwrap();
    let r0 = RelayRun::start_on(
        dir0.path(),
        &yaml,
        Some(CfInstance {
            app_guid: GUID.into(),
            app_name: "relay".into(),
            instance_index: 0,
        }),
    )
    .await;
    let r1 = RelayRun::start_on(
        dir1.path(),
        &yaml,
        Some(CfInstance {
            app_guid: GUID.into(),
            app_name: "relay".into(),
            instance_index: 1,
        }),
    )
    .await;
    let (cert, key) = pki.files("server-relay");
    let nginx = Nginx::start(
        &cert,
        &key,
        Upstreams {
            relays: vec![r0.http.unwrap(), r1.http.unwrap()],
            app_guid: Some(GUID.into()),
        },
    )
    .await;
    let url = format!("wss://localhost:{}/v1/tunnel", nginx.addr.port());

    let agent_yaml = format!(
        "relay: {url}\ntransport: websocket\nserver_name: localhost\n{tls}websocket:\n  cloud_foundry: true\nservices:\n  orders:\n    backend: {backend}\n",
        tls = pki.tls_yaml("agent-db1"),
        backend = db.backend(),
    );
    let agent = AgentRun::start(pki.dir(), &agent_yaml);
    r0.wait_agent("db1").await;
    r1.wait_agent("db1").await;

    // 100 client connections, each through its own `connect` session routed at random.
    let target = RelayTarget {
        quic: None,
        websocket: Some(url.parse().unwrap()),
    };
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let c = ConnectRun::start_with(
            &pki,
            target.clone(),
            TransportChoice::Websocket,
            WebsocketSettings::default(),
            "alice",
            "orders",
        )
        .await
        .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut conn = mysql_async::Conn::from_url(format!(
                "mysql://root@127.0.0.1:{}/mysql",
                c.addr.port()
            ))
            .await?;
            let v: Option<u32> = conn.query_first(format!("SELECT {i}")).await?;
            conn.disconnect().await?;
            drop(c);
            Ok::<_, mysql_async::Error>(v)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("client {i}: {e}")),
            Some(i as u32)
        );
    }
    // Both instances carried clients, and each holds a session with the agent.
    let (n0, n1) = (
        r0.handle.connections_opened(),
        r1.handle.connections_opened(),
    );
    assert!(
        n0 > 0 && n1 > 0 && n0 + n1 == 100,
        "connections per instance: {n0} and {n1}"
    );
    assert_eq!(r0.handle.agents().len(), 1);
    assert_eq!(r1.handle.agents().len(), 1);

    // Clients pinned to instance 1 keep working when instance 0 stops.
    let pinned = Arc::new(pki.client_material("alice"));
    let mut opts =
        postern_common::transport::ws::ConnectOptions::new(url.parse().unwrap(), "localhost");
    opts.headers
        .push(("X-Cf-App-Instance".into(), format!("{GUID}:1")));
    let session = postern_common::transport::ws::connect(&opts, &pinned)
        .await
        .unwrap();
    let open_query = |session: postern_common::transport::Session| async move {
        let mut stream = session.open().await.unwrap();
        postern_common::wire::write_first(
            &mut stream,
            &postern_common::protocol::Open::for_service("orders"),
        )
        .await
        .unwrap();
        let answer: postern_common::protocol::Answer =
            postern_common::wire::read_first(&mut stream).await.unwrap();
        matches!(answer, postern_common::protocol::Answer::Ok { .. })
    };
    assert!(open_query(session.clone()).await);
    r0.stop().await;
    assert!(
        open_query(session.clone()).await,
        "instance 1 still serves after instance 0 stopped"
    );
    assert_eq!(r1.handle.agents().len(), 1);
    agent.stop().await;
    r1.stop().await;
}
