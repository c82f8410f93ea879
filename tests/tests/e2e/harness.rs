//! The failover harness itself: the Galera cluster starts, syncs and survives its nodes being
//! stopped, killed and started again; the health endpoint answers each mode and switches at run
//! time; headless Chromium runs a page's scripts behind basic auth and keeps a screenshot.

use std::time::Duration;

use postern_tests::api::base64;
use postern_tests::browser::{Chromium, artifact_dir};
use postern_tests::galera::{MONITOR_PASSWORD, MONITOR_USER};
use postern_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Three nodes become Synced in one Primary component, with distinct `wsrep_local_index`es; a
/// write on one is read on another; a desynced node says so; a stopped node leaves the cluster
/// and rejoins when started, and so does a killed one; the monitor user can create and write
/// the decision table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_galera_cluster_starts_syncs_and_takes_its_nodes_back() {
    init_logging();
    let started = Instant::now();
    let mut g = Galera::start().await;
    let took = started.elapsed();
    eprintln!("galera: three nodes Synced in {took:?}");

    let names = g.names();
    assert_eq!(names, ["n1", "n2", "n3"]);
    let mut indexes = Vec::new();
    for n in &names {
        assert_eq!(g.state(n).as_deref(), Some("Synced"), "{n}\n{}", g.logs());
        assert_eq!(g.status(n, "wsrep_cluster_size").as_deref(), Some("3"));
        assert_eq!(g.ok(n, "SELECT @@wsrep_node_name").trim(), n.as_str());
        indexes.push(g.local_index(n).expect("wsrep_local_index"));
    }
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2], "distinct wsrep_local_index");
    let ports: std::collections::BTreeSet<u16> = g.nodes().iter().map(|n| n.addr.port()).collect();
    assert_eq!(ports.len(), 3, "distinct SQL ports");

    // Replication, and the users the stacks make.
    g.create_monitor_user(MONITOR_USER, MONITOR_PASSWORD);
    g.create_app_user("app", "app-pw");
    g.ok("n1", "INSERT INTO app.t (node) VALUES ('n1')");
    eventually(Duration::from_secs(10), "the row on n3", || {
        let n = g
            .sql("n3", "SELECT COUNT(*) FROM app.t")
            .unwrap_or_default();
        async move { (n.trim() == "1").then_some(()) }
    })
    .await;
    let monitor = Cli::at(g.addr("n2").port())
        .user(MONITOR_USER)
        .password(MONITOR_PASSWORD);
    monitor.ok(
        "CREATE DATABASE IF NOT EXISTS postern; \
         CREATE TABLE IF NOT EXISTS postern.decisions (service VARCHAR(64) PRIMARY KEY, \
           term BIGINT NOT NULL, node VARCHAR(64) NULL, reason VARCHAR(255), agent VARCHAR(64), \
           decided_at DATETIME(6)); \
         INSERT IGNORE INTO postern.decisions VALUES ('orders', 1, 'n1', 'first', 'db1', NOW(6)); \
         UPDATE postern.decisions SET term = term + 1, node = 'n2' WHERE service = 'orders' AND term = 1;",
    );
    let status = monitor.ok("SHOW STATUS LIKE 'wsrep_local_state_comment'");
    assert!(status.contains("Synced"), "{status}");

    // Desync: the state says so, and comes back.
    g.desync("n2", true);
    let state = g.state("n2").unwrap_or_default();
    assert!(state.contains("Desynced"), "n2 desynced: {state}");
    g.desync("n2", false);
    eventually(Duration::from_secs(10), "n2 Synced again", || {
        let s = g.state("n2");
        async move { (s.as_deref() == Some("Synced")).then_some(()) }
    })
    .await;

    // A clean stop, then a rejoin.
    let t = Instant::now();
    g.stop_node("n3").await;
    assert!(g.state("n3").is_none(), "n3 answers after its stop");
    g.wait_cluster_size(2).await;
    g.ok(
        "n1",
        "INSERT INTO app.t (node) VALUES ('while n3 was away')",
    );
    g.start_node("n3").await;
    g.wait_cluster_size(3).await;
    assert_eq!(
        g.ok("n3", "SELECT COUNT(*) FROM app.t").trim(),
        "2",
        "n3 caught up"
    );
    eprintln!("galera: n3 stopped and rejoined in {:?}", t.elapsed());

    // kill -9 (no goodbye): the others evict it; it rejoins.
    let t = Instant::now();
    g.kill_node("n1");
    g.wait_cluster_size(2).await;
    eprintln!("galera: killed n1 evicted in {:?}", t.elapsed());
    g.ok(
        "n2",
        "INSERT INTO app.t (node) VALUES ('while n1 was dead')",
    );
    g.start_node("n1").await;
    g.wait_cluster_size(3).await;
    assert_eq!(g.ok("n1", "SELECT COUNT(*) FROM app.t").trim(), "3");
    eprintln!("galera: n1 killed and rejoined in {:?}", t.elapsed());

    // Frozen (SIGSTOP): evicted by the others; thawed, it comes back by itself.
    let t = Instant::now();
    g.freeze("n2");
    g.wait_cluster_size_on(&["n1", "n3"], 2).await;
    eprintln!("galera: frozen n2 evicted in {:?}", t.elapsed());
    g.thaw("n2");
    g.wait_synced("n2").await;
    g.wait_cluster_size(3).await;
    eprintln!("galera: n2 frozen, thawed and back in {:?}", t.elapsed());
}

/// Each mode answers as galera-agent or a stuck node would, switched at run time, also on a
/// connection kept alive across the switch.
#[tokio::test]
async fn the_health_endpoint_answers_each_mode_and_switches_at_run_time() {
    let h = HealthServer::start(1).await;
    let (status, body) = http_get(h.addr, "/api/v1/status").await.unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["healthy"], true);
    assert_eq!(json["wsrep_local_index"], 1);
    assert!(h.url().ends_with("/api/v1/status"));

    h.set(HealthMode::UnhealthyJson);
    let (status, body) = http_get(h.addr, "/").await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, json["healthy"].clone()), (200, false.into()));

    h.set(HealthMode::Status(503));
    let (status, _) = http_get(h.addr, "/api/v1/status").await.unwrap();
    assert_eq!(status, 503);

    // Hang: the request is read (counted) and never answered.
    h.set(HealthMode::Hang);
    let before = h.requests();
    let hung = tokio::time::timeout(
        Duration::from_millis(500),
        http_get(h.addr, "/api/v1/status"),
    )
    .await;
    assert!(hung.is_err(), "a hung endpoint answered: {hung:?}");
    assert_eq!(h.requests(), before + 1);

    // Keep-alive: two requests on one connection, the mode switched between them.
    h.set(HealthMode::Healthy);
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let get = b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(get).await.unwrap();
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    h.set(HealthMode::Status(503));
    s.write_all(get).await.unwrap();
    let second = read_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 503"), "{second}");
}

/// Reads one response with a Content-Length body.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

/// A page behind basic auth whose script fetches data (with an absolute URL, as a page opened
/// with credentials in its URL must) shows the data in the DOM, and its screenshot is kept.
#[tokio::test]
async fn headless_chromium_runs_a_pages_scripts_behind_basic_auth() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let expected = format!("Basic {}", base64(b"admin:pw"));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let expected = expected.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let authorized = req
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case(&format!("authorization: {expected}")));
                let (status, body) = if !authorized {
                    ("401 Unauthorized", "Not Authorized".to_owned())
                } else if req.starts_with("GET /data ") {
                    ("200 OK", "active node n2".to_owned())
                } else {
                    (
                        "200 OK",
                        "<!doctype html><html><body><h1 id=active>loading</h1><script>\
                         fetch(location.origin + '/data').then(r => r.text())\
                         .then(t => document.getElementById('active').textContent = t);\
                         </script></body></html>"
                            .to_owned(),
                    )
                };
                let auth = if authorized {
                    ""
                } else {
                    "WWW-Authenticate: Basic realm=\"Authorization Required\"\r\n"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\n{auth}Content-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let url = format!("http://admin:pw@{addr}/");
    let browser = Chromium::find();
    let dom = browser.dump_dom(&url).await;
    assert!(dom.contains("active node n2"), "{dom}");
    let shot = browser
        .with_window(390, 844)
        .screenshot(&url, &artifact_dir().join("harness-basic-auth.png"))
        .await;
    assert!(shot.starts_with(artifact_dir()));
}
