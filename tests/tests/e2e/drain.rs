//! Draining: a process that is told to stop lets its open connections finish, and its peers
//! move new connections elsewhere before it goes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::client::driver_opts;
use postern_tests::*;
use tokio::time::Instant;

/// Waits until one query that starts with `query` runs at `db`.
async fn running_at_the_database(db: &MariaDb, query: &str) {
    let sql =
        format!("SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE '{query}%'");
    eventually(Duration::from_secs(5), "the long query to run", || {
        let n = db.sql(&sql);
        async move { (n.trim() == "1").then_some(()) }
    })
    .await;
}

/// Two agents serve `orders`; the one that took a long query is stopped while it runs: the
/// query completes, new clients are served by the other agent without a single failure, and
/// the stopped agent exits as soon as its last connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_finishes_its_connections_while_new_ones_go_to_another() {
    let s = Stack::builder()
        .mariadb()
        .no_agent()
        .relay(|r| {
            r.agent("db2", &["orders"]);
        })
        .start()
        .await;
    // The relay routes to the most recent agent: db2 first, then db1, so db1 takes the query.
    let mut db2 = s.start_agent(&s.agent_config_as("db2"));
    db2.wait_connected().await;
    s.relay().wait_agent("db2").await;
    let mut db1 = s.start_agent(&s.agent_config());
    db1.wait_connected().await;
    s.relay().wait_agent("db1").await;

    let c = s.connect("alice").await;
    let pool = mysql_async::Pool::new(c.url().as_str());
    let mut long = pool.get_conn().await.unwrap();
    let query = tokio::spawn(async move {
        let r: Option<String> = long
            .query_first("SELECT SLEEP(2), 'finished'")
            .await
            .ok()
            .flatten()
            .map(|(_, s): (i64, String)| s);
        // Ends the connection (dropped, it would go back to the pool and stay open).
        long.disconnect().await.expect("disconnect");
        r
    });
    // The query is running at the database (through db1) before db1 is told to stop.
    running_at_the_database(s.db(), "SELECT SLEEP(2)").await;
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
    // As soon as the relay has read the agent's goodbye (tens of milliseconds).
    eventually(
        Duration::from_secs(1),
        "db1 to be gone from the relay",
        || {
            let gone = s.relay().handle().agents().iter().all(|a| a.name != "db1");
            async move { gone.then_some(()) }
        },
    )
    .await;
    pool.disconnect().await.unwrap();
    c.stop().await;
    db2.stop().await;
    s.stop().await;
}

const GUID: &str = "7d0c1b2a-3e4f-4a5b-8c6d-9e0f1a2b3c4d";

/// Two relay instances behind a router, an agent holding a session with each. Instance 0 gets
/// SIGTERM while 50 clients hold connections on it and one runs `SELECT SLEEP(5)`: the query
/// completes, the agent stays in session with instance 1 throughout, every new client in the
/// meantime is served, and instance 0 exits within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_told_to_stop_drains_while_new_clients_go_to_the_other_instance() {
    let mut s = Stack::builder()
        .mariadb()
        .relay_process()
        .cloud_foundry(GUID, 2)
        .start()
        .await;
    let h1 = s.relays[1].http().expect("instance 1's HTTP listener");
    // `/readyz` lists the connected agents whatever its status (and needs no credentials,
    // unlike `/v0/agents`).
    let has_agent = |http: std::net::SocketAddr| async move {
        http_get(http, "/readyz").await.is_ok_and(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                v["agents"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|a| a["name"] == "db1"))
            })
        })
    };

    // 50 idle clients and one long query on instance 0's MySQL listener.
    let port0 = s.relays[0].mysql("orders").port();
    let opts = || driver_opts(&s.pki, port0, "client-alice", "root", "");
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(mysql_async::Conn::new(opts()).await.expect("idle client"));
    }
    let mut long = mysql_async::Conn::new(opts()).await.unwrap();
    let query = tokio::spawn(async move {
        let r: Result<Option<(i64, String)>, _> =
            long.query_first("SELECT SLEEP(5), 'finished'").await;
        r.map(|row| row.map(|(_, s)| s))
    });
    running_at_the_database(s.db(), "SELECT SLEEP(5)").await;

    // From now on: instance 1 must always have the agent, and new clients (each its own
    // `connect` session through the router) must all be served.
    let draining = Arc::new(AtomicBool::new(true));
    let agent_missing = Arc::new(AtomicU32::new(0));
    let watcher = {
        let (draining, missing) = (draining.clone(), agent_missing.clone());
        tokio::spawn(async move {
            while draining.load(Ordering::Relaxed) {
                if !has_agent(h1).await {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let to = s.connect_to();
    let (pki, r0) = (&s.pki, &mut s.relays[0].proc_mut().proc);
    let clients = async {
        let (mut served, mut failed) = (0u32, Vec::new());
        while draining.load(Ordering::Relaxed) {
            let result = async {
                let c = ConnectRun::start_with(pki, to.clone(), "alice", "orders", true).await?;
                let mut conn = mysql_async::Conn::from_url(c.url()).await?;
                let one: Option<i64> = conn.query_first("SELECT 1").await?;
                conn.disconnect().await?;
                c.stop().await;
                anyhow::ensure!(one == Some(1), "wrong answer {one:?}");
                Ok::<_, anyhow::Error>(())
            }
            .await;
            match result {
                Ok(()) => served += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (served, failed)
    };
    let stop = async {
        let started = Instant::now();
        r0.terminate();
        let status = r0.wait_exit(Duration::from_secs(12)).await;
        let took = started.elapsed();
        let finished = query.await.unwrap();
        draining.store(false, Ordering::Relaxed);
        (status, took, finished)
    };
    let ((status, took, finished), (served, failed)) = tokio::join!(stop, clients);
    watcher.await.unwrap();

    assert!(
        status.is_some_and(|s| s.success()),
        "instance 0 exits cleanly: {status:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "instance 0 exits within 10 s: {took:?}"
    );
    assert_eq!(
        finished.unwrap().as_deref(),
        Some("finished"),
        "the running query completed"
    );
    assert!(
        failed.is_empty(),
        "new clients failed during the drain: {failed:?}"
    );
    assert!(
        served >= 5,
        "new clients were served during the drain: {served}"
    );
    assert_eq!(
        agent_missing.load(Ordering::Relaxed),
        0,
        "instance 1 had the agent throughout"
    );
    let log = s.relays[0].proc().proc.log_text();
    assert!(log.contains("relay draining"), "{log}");
    drop(idle);
    s.stop().await;
}
