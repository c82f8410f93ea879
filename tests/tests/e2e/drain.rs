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

const GUID: &str = "7d0c1b2a-3e4f-4a5b-8c6d-9e0f1a2b3c4d";

/// Two relay instances behind a router, an agent holding a session with each. Instance 0 gets
/// SIGTERM while 50 clients hold connections on it and one runs `SELECT SLEEP(5)`: the query
/// completes, the agent stays in session with instance 1 throughout, every new client in the
/// meantime is served, and instance 0 exits within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_told_to_stop_drains_while_new_clients_go_to_the_other_instance() {
    use postern_agent::config::{RelayTarget, TransportChoice, WebsocketSettings};
    use postern_tests::procs::RelayProc;
    use postern_tests::router::{Nginx, Upstreams};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice"]);
    let (dir0, dir1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vcap = format!(r#"{{"application_id":"{GUID}","application_name":"relay"}}"#);
    let mut r0 = RelayProc::start_env(
        dir0.path(),
        &yaml,
        &[("VCAP_APPLICATION", &vcap), ("CF_INSTANCE_INDEX", "0")],
    )
    .await;
    let r1 = RelayProc::start_env(
        dir1.path(),
        &yaml,
        &[("VCAP_APPLICATION", &vcap), ("CF_INSTANCE_INDEX", "1")],
    )
    .await;
    let (h0, h1) = (r0.http.unwrap(), r1.http.unwrap());
    let (cert, key) = pki.files("server-relay");
    let nginx = Nginx::start(
        &cert,
        &key,
        Upstreams {
            relays: vec![h0, h1],
            app_guid: Some(GUID.into()),
        },
    )
    .await;
    let url = format!("wss://localhost:{}/v1/tunnel", nginx.addr.port());
    let agent = AgentRun::start(
        pki.dir(),
        &format!(
            "relay: {url}\ntransport: websocket\nserver_name: localhost\n{tls}websocket:\n  cloud_foundry: true\nservices:\n  orders:\n    backend: {backend}\n",
            tls = pki.tls_yaml("agent-db1"),
            backend = db.backend(),
        ),
    );
    let has_agent = |http: std::net::SocketAddr| async move {
        http_get(http, "/v0/agents")
            .await
            .is_ok_and(|(status, body)| status == 200 && body.contains("\"db1\""))
    };
    for h in [h0, h1] {
        eventually(
            Duration::from_secs(10),
            "the agent on both instances",
            || async move { has_agent(h).await.then_some(()) },
        )
        .await;
    }

    // 50 idle clients and one long query on instance 0's MySQL listener.
    let port0 = r0.listener("orders", "mysql").port();
    let opts = || crate::mysql_tls::driver_opts(&pki, port0, "client-alice", "root", "");
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
    eventually(Duration::from_secs(5), "the long query to run", || {
        let n = db.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(5)%'");
        async move { (n.trim() == "1").then_some(()) }
    })
    .await;

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
    let clients = {
        let draining = draining.clone();
        let pki_dir = pki.dir().to_owned();
        let target = RelayTarget {
            quic: None,
            websocket: Some(url.parse().unwrap()),
        };
        let material = pki.client_material("alice");
        let _ = pki_dir;
        tokio::spawn(async move {
            let (mut served, mut failed) = (0u32, Vec::new());
            while draining.load(Ordering::Relaxed) {
                let dialer = postern_agent::dial::Dialer::load(
                    material.clone(),
                    Some("localhost".into()),
                    TransportChoice::Websocket,
                    WebsocketSettings::default(),
                )
                .await
                .unwrap();
                let opts = postern_agent::connect::Options {
                    dialer,
                    relay: target.clone(),
                    service: "orders".into(),
                    listen: "127.0.0.1:0".parse().unwrap(),
                    mysql: true,
                };
                let result = async {
                    let c = postern_agent::connect::Connect::bind(opts).await?;
                    let port = c.local_addr().port();
                    let stop = tokio_util::sync::CancellationToken::new();
                    let run = tokio::spawn(c.run(stop.clone()));
                    let mut conn =
                        mysql_async::Conn::from_url(format!("mysql://root@127.0.0.1:{port}/"))
                            .await?;
                    let one: Option<i64> = conn.query_first("SELECT 1").await?;
                    conn.disconnect().await?;
                    stop.cancel();
                    let _ = run.await;
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
        })
    };

    let started = Instant::now();
    r0.proc.terminate();
    let status = r0.proc.wait_exit(Duration::from_secs(12)).await;
    let took = started.elapsed();
    let finished = query.await.unwrap();
    draining.store(false, Ordering::Relaxed);
    let (served, failed) = clients.await.unwrap();
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
    let log = r0.proc.log_text();
    assert!(log.contains("relay draining"), "{log}");
    drop(idle);
    agent.stop().await;
}
