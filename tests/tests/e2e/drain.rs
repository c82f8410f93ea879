//! Draining: a process that is told to stop lets its open connections finish, and its peers
//! move new connections elsewhere before it goes.

use std::time::Duration;

use mysql_async::prelude::*;
use postern_common::pki::Kind;
use postern_tests::*;
use tokio::time::Instant;

/// Two agents serve `orders`; the one that took a long query is stopped while it runs: the
/// query completes, new clients are served by the other agent without a single failure, and
/// the stopped agent exits as soon as its last connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_finishes_its_connections_while_new_ones_go_to_another() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Agent, "db2");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice"]).replace(
        "agents:\n  db1:\n    services: [orders]\n",
        "agents:\n  db1:\n    services: [orders]\n  db2:\n    services: [orders]\n",
    );
    let relay = RelayRun::start(pki.dir(), &yaml).await;
    // The relay routes to the most recent agent: db2 first, then db1, so db1 takes the query.
    let dir2 = tempfile::tempdir().unwrap();
    let mut db2 = AgentRun::start(
        dir2.path(),
        &agent_yaml(&pki, "db2", relay.quic, "orders", &db.backend()),
    );
    db2.wait_connected().await;
    relay.wait_agent("db2").await;
    let mut db1 = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    db1.wait_connected().await;
    relay.wait_agent("db1").await;

    let c = ConnectRun::start(&pki, relay.quic, "alice", "orders").await;
    let url = format!("mysql://root@127.0.0.1:{}/", c.addr.port());
    let pool = mysql_async::Pool::new(url.as_str());
    let mut long = pool.get_conn().await.unwrap();
    let query = tokio::spawn(async move {
        let r: Option<String> = long
            .query_first("SELECT SLEEP(2), 'finished'")
            .await
            .ok()
            .flatten()
            .map(|(_, s): (i64, String)| s);
        drop(long);
        r
    });
    // The query is running at the database (through db1) before db1 is told to stop.
    eventually(Duration::from_secs(5), "the long query to run", || {
        let running = db.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(2)%'");
        async move { (running.trim() == "1").then_some(()) }
    })
    .await;
    let stopping = Instant::now();
    let stopped = tokio::spawn(db1.stop());
    // New clients all succeed meanwhile: the relay sends them to db2.
    for i in 0..20 {
        let mut conn = pool
            .get_conn()
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        let one: Option<i64> = conn.query_first("SELECT 1").await.unwrap();
        assert_eq!(one, Some(1));
        conn.disconnect().await.unwrap();
    }
    assert_eq!(
        query.await.unwrap().as_deref(),
        Some("finished"),
        "the running query completed"
    );
    stopped.await.unwrap();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_millis(3_500),
        "the agent exits once its last connection ends, not at the end of its grace: {took:?}"
    );
    assert!(
        relay.handle.agents().iter().all(|a| a.name != "db1"),
        "db1 is gone from the relay"
    );
    pool.disconnect().await.unwrap();
    db2.stop().await;
    relay.stop().await;
}
