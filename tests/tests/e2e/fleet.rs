//! A relay fleet on Cloud Foundry: two relay instances behind one router that pins requests with
//! `X-Cf-App-Instance` (and balances the rest at random). The agent holds a session with each.

use std::sync::Arc;

use mysql_async::prelude::*;
use postern_tests::*;

const GUID: &str = "2f1c7a3e-5b1d-4c7e-9a53-0d4e1f2a3b4c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_every_relay_instance_and_survives_losing_one() {
    let mut s = Stack::builder()
        .mariadb()
        .cloud_foundry(GUID, 2)
        .start()
        .await;
    let url = s.ws_url();

    // 100 client connections, each through its own `connect` session routed at random.
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let c = s.connect("alice").await;
        tasks.push(tokio::spawn(async move {
            let mut conn = mysql_async::Conn::from_url(c.url()).await?;
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
    let (r0, r1) = (s.relays[0].handle(), s.relays[1].handle());
    let (n0, n1) = (r0.connections_opened(), r1.connections_opened());
    assert!(
        n0 > 0 && n1 > 0 && n0 + n1 == 100,
        "connections per instance: {n0} and {n1}"
    );
    assert_eq!(r0.agents().len(), 1);
    assert_eq!(r1.agents().len(), 1);

    // Clients pinned to instance 1 keep working when instance 0 stops.
    let pinned = Arc::new(s.pki.client_material("alice"));
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
    s.relays.remove(0).stop().await;
    assert!(
        open_query(session.clone()).await,
        "instance 1 still serves after instance 0 stopped"
    );
    assert_eq!(s.relays[0].handle().agents().len(), 1);
    s.stop().await;
}
