//! Failover across database nodes, at the default check settings: a real Galera cluster
//! (`mysql` check) and plain `mariadbd` nodes with health endpoints the test controls (`http`
//! check). Where a client lands is read from the node itself (`SELECT @@wsrep_node_name`
//! through the tunnel); the time bounds are the issue's: an explicit "unhealthy" answer moves
//! traffic within 1 s, a hung node within 3 s (asserted with a margin that still catches a
//! regression to the anchors' 5 to 6 s).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::failover::lowest_index;
use postern_tests::stack::node_name;
use postern_tests::*;
use tokio::time::Instant;

/// An explicit unhealthy answer (503, `healthy: false`, desync) moves traffic within this.
const UNHEALTHY_BOUND: Duration = Duration::from_millis(1_500);
/// A hung node (or a stopped or killed one) is left within this.
const HUNG_BOUND: Duration = Duration::from_millis(3_500);

/// Opens `n` connections through relay 0 and returns them with the node each landed on.
async fn open(s: &Stack, n: usize) -> Vec<(mysql_async::Conn, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut c = s
            .app_conn(0, "alice")
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let node = node_name(&mut c).await.expect("node name");
        out.push((c, node));
    }
    out
}

/// Asserts every connection of `conns` is closed within 1 s (its next query fails).
async fn assert_closed(conns: &mut [(mysql_async::Conn, String)], why: &str) {
    for (i, (c, node)) in conns.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if c.query_drop("SELECT 1").await.is_err() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "connection {i} to {node} still works 1 s after {why}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls new connections until they land somewhere other than `from`; returns the node and how
/// long it took, panicking after `within`.
async fn moved_from(s: &Stack, from: &str, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    loop {
        // A connection to a hung node never gets its greeting: bounded by what is left.
        let left = within.saturating_sub(started.elapsed()) + Duration::from_millis(100);
        let got = tokio::time::timeout(left, s.which_node(0))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {left:?}")));
        if let Ok(node) = &got
            && node != from
        {
            return (node.clone(), started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "new connections still not off {from} after {within:?}: last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until relay 0's API shows `node` healthy again (its check passed `rise` times).
async fn wait_healthy_again(s: &Stack, node: &str) {
    let api = s.api(0);
    eventually(
        Duration::from_secs(10),
        &format!("{node} healthy in /v0/backends"),
        || {
            let api = api.clone();
            let node = node.to_owned();
            async move {
                let b = api.backends(None).await;
                b.iter().any(|b| b.name == node && b.healthy).then_some(())
            }
        },
    )
    .await;
}

/// Asserts that 10 new connections in a row land on `node` (sticky: a recovered node does not
/// take the traffic back).
async fn stays_on(s: &Stack, node: &str) {
    for i in 0..10 {
        assert_eq!(
            s.which_node(0).await.as_deref(),
            Ok(node),
            "connection {i} after the old node recovered"
        );
    }
}

/// Every client lands on one node (the lowest `wsrep_local_index`); `wsrep_desync=ON` there
/// moves new connections to another node within 1 s and closes the old ones; the node's return
/// (Synced and healthy again) leaves the traffic where it is, at the same term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_desync_moves_new_connections_and_closes_the_old_ones() {
    let s = Stack::builder().galera().api().start().await;
    let first = lowest_index(s.galera(), &[]);
    s.wait_node(0, &first, Duration::from_secs(10)).await;
    let mut old = open(&s, 10).await;
    assert!(
        old.iter().all(|(_, n)| *n == first),
        "every client on {first}: {:?}",
        old.iter().map(|(_, n)| n).collect::<Vec<_>>()
    );

    let t = Instant::now();
    s.galera().desync(&first, true);
    let (second, took) = moved_from(&s, &first, UNHEALTHY_BOUND).await;
    let others: Vec<&str> = s
        .galera()
        .nodes()
        .iter()
        .map(|n| n.name.as_str())
        .filter(|n| *n != first)
        .collect();
    assert_eq!(
        second,
        lowest_index(s.galera(), &others),
        "the next node by wsrep_local_index"
    );
    eprintln!("desync of {first}: traffic on {second} after {took:?}");
    assert_closed(&mut old, "the desync").await;
    assert!(t.elapsed() < Duration::from_secs(3));
    let (term, active) = s.api(0).active(None).await;
    assert_eq!(active.as_deref(), Some(second.as_str()));

    s.galera().desync(&first, false);
    wait_healthy_again(&s, &first).await;
    stays_on(&s, &second).await;
    assert_eq!(
        s.api(0).active(None).await,
        (term, Some(second.clone())),
        "same term and node after {first} recovered"
    );
    s.stop().await;
}

/// Stopping the active node moves new connections to another within the hung-node bound; the
/// node rejoins (Synced, healthy) and the traffic stays where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_stopping_the_active_node_moves_traffic_and_its_rejoin_does_not_take_it_back() {
    let mut s = Stack::builder().galera().api().start().await;
    let first = lowest_index(s.galera(), &[]);
    s.wait_node(0, &first, Duration::from_secs(10)).await;
    let mut old = open(&s, 3).await;

    let stopping = Instant::now();
    s.galera_mut().stop_node(&first).await;
    let stopped = stopping.elapsed();
    // From the moment the process is gone (a clean shutdown takes a while, and the node stops
    // answering early in it), new connections are elsewhere within the hung-node bound.
    let (second, took) = moved_from(&s, &first, HUNG_BOUND).await;
    eprintln!("stop of {first} ({stopped:?}): traffic on {second} {took:?} after it exited");
    assert_closed(&mut old, "the stop").await;
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(s.which_node(0).await.as_deref(), Ok(second.as_str()));
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    let (term, _) = s.api(0).active(None).await;

    s.galera_mut().start_node(&first).await;
    wait_healthy_again(&s, &first).await;
    stays_on(&s, &second).await;
    assert_eq!(s.api(0).active(None).await, (term, Some(second)));
    s.stop().await;
}

/// `mysql` check: the active node hangs (its process frozen with SIGSTOP: connections open,
/// nothing answers); new connections go to another node within 3 s, and the node's return
/// (thawed, rejoined, Synced) leaves the traffic there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_a_hung_active_node_is_left_within_three_seconds() {
    let mut s = Stack::builder().galera().api().start().await;
    let first = lowest_index(s.galera(), &[]);
    s.wait_node(0, &first, Duration::from_secs(10)).await;
    s.galera().freeze(&first);
    let (second, took) = moved_from(&s, &first, HUNG_BOUND).await;
    eprintln!("freeze of {first}: traffic on {second} after {took:?}");
    let (term, _) = s.api(0).active(None).await;
    s.galera().thaw(&first);
    s.galera_mut().wait_synced(&first).await;
    wait_healthy_again(&s, &first).await;
    stays_on(&s, &second).await;
    assert_eq!(s.api(0).active(None).await, (term, Some(second)));
    s.stop().await;
}

/// `http` check: a 503 from the active node's endpoint moves traffic to the next node within
/// 1 s and closes the old connections; then `{"healthy": false}` does the same to that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_an_unhealthy_answer_moves_traffic_within_a_second() {
    let s = Stack::builder().http_nodes(3).api().start().await;
    s.wait_node(0, "n1", Duration::from_secs(10)).await;
    let mut old = open(&s, 3).await;

    s.http_node("n1").health.set(HealthMode::Status(503));
    let (node, took) = moved_from(&s, "n1", UNHEALTHY_BOUND).await;
    eprintln!("503: traffic on {node} after {took:?}");
    assert_eq!(node, "n2", "config order");
    assert_closed(&mut old, "the 503").await;

    let mut old = open(&s, 3).await;
    assert!(old.iter().all(|(_, n)| n == "n2"));
    s.http_node("n2").health.set(HealthMode::UnhealthyJson);
    let (node, took) = moved_from(&s, "n2", UNHEALTHY_BOUND).await;
    eprintln!("healthy:false: traffic on {node} after {took:?}");
    assert_eq!(node, "n3");
    assert_closed(&mut old, "healthy:false").await;
    s.stop().await;
}

/// `http` check: an endpoint that accepts and never answers is left within 3 s (timeouts count
/// towards `fall`, and the next check runs at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_a_hung_node_is_left_within_three_seconds() {
    let s = Stack::builder().http_nodes(2).api().start().await;
    s.wait_node(0, "n1", Duration::from_secs(10)).await;
    let mut old = open(&s, 2).await;
    let before = s.http_node("n1").health.requests();
    s.http_node("n1").health.set(HealthMode::Hang);
    let (node, took) = moved_from(&s, "n1", HUNG_BOUND).await;
    eprintln!("hang: traffic on {node} after {took:?}");
    assert_eq!(node, "n2");
    assert!(
        s.http_node("n1").health.requests() > before,
        "the hung endpoint was asked"
    );
    assert_closed(&mut old, "the hang").await;
    let b = s.api(0).backends(None).await;
    let n1 = b
        .iter()
        .find(|b| b.name == "n1")
        .expect("n1 in /v0/backends");
    assert!(!n1.healthy && n1.consecutive_failures >= 2, "{n1:?}");
    s.stop().await;
}

/// One connection stays open and usable through many health rounds (30 checks of its node)
/// while other clients connect, query and leave; it is the same session throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_connection_survives_many_health_rounds_and_other_clients() {
    let s = Stack::builder().http_nodes(2).start().await;
    s.wait_node(0, "n1", Duration::from_secs(10)).await;
    let mut long = s.app_conn(0, "alice").await.expect("the long connection");
    let id: Option<u64> = long.query_first("SELECT CONNECTION_ID()").await.unwrap();
    let health = &s.http_node("n1").health;
    let since = health.requests();
    let mut others = 0u32;
    while health.requests() < since + 30 {
        let mut c = s.app_conn(0, "alice").await.expect("another client");
        let one: Option<i64> = c.query_first("SELECT 1").await.unwrap();
        assert_eq!(one, Some(1));
        c.disconnect().await.unwrap();
        others += 1;
        let again: Option<u64> = long
            .query_first("SELECT CONNECTION_ID()")
            .await
            .unwrap_or_else(|e| panic!("the long connection broke after {others} clients: {e}"));
        assert_eq!(again, id, "the same session");
    }
    assert!(others > 10, "other clients came and went: {others}");
    long.disconnect().await.unwrap();
    s.stop().await;
}

/// Four clients run a write loop through the tunnel (each reconnecting after an error) while
/// the active Galera node is killed (`kill -9`): errors happen only on connections that were
/// open on the killed node, or on connects inside the failover bound; after the first
/// connection on the new node, every connect and write succeeds, on the new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_a_write_loop_costs_only_the_connections_on_the_killed_node() {
    let mut s = Stack::builder().galera().start().await;
    let first = lowest_index(s.galera(), &[]);
    s.wait_node(0, &first, Duration::from_secs(10)).await;

    #[derive(Debug)]
    struct Outcome {
        /// (node of the connection, error) for failed writes.
        write_errors: Vec<(String, String)>,
        /// (time since start, error) for failed connects.
        connect_errors: Vec<(Duration, String)>,
        /// (time since start, node) of every connection opened.
        opened: Vec<(Duration, String)>,
        /// Writes that succeeded, per node.
        written: std::collections::BTreeMap<String, u32>,
    }
    let started = Instant::now();
    let running = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..4 {
        let opts = s.app_opts(0, "alice");
        let running = running.clone();
        writers.push(tokio::spawn(async move {
            let mut out = Outcome {
                write_errors: Vec::new(),
                connect_errors: Vec::new(),
                opened: Vec::new(),
                written: Default::default(),
            };
            while running.load(Ordering::Relaxed) {
                let mut conn = match mysql_async::Conn::new(opts.clone()).await {
                    Ok(c) => c,
                    Err(e) => {
                        out.connect_errors.push((started.elapsed(), e.to_string()));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let node = match node_name(&mut conn).await {
                    Ok(n) => n,
                    Err(e) => {
                        out.connect_errors.push((started.elapsed(), e.to_string()));
                        continue;
                    }
                };
                out.opened.push((started.elapsed(), node.clone()));
                while running.load(Ordering::Relaxed) {
                    match conn
                        .exec_drop(
                            "INSERT INTO app.t (node) VALUES (?)",
                            (format!("writer {w} via {node}"),),
                        )
                        .await
                    {
                        Ok(()) => *out.written.entry(node.clone()).or_default() += 1,
                        Err(e) => {
                            out.write_errors.push((node.clone(), e.to_string()));
                            break;
                        }
                    }
                }
            }
            out
        }));
    }
    // Writes flow on the first node, then it dies.
    eventually(Duration::from_secs(10), "writes on the first node", || {
        let n = s
            .galera()
            .sql(&first, "SELECT COUNT(*) FROM app.t")
            .unwrap_or_default();
        async move { (n.trim().parse::<u32>().unwrap_or(0) >= 20).then_some(()) }
    })
    .await;
    let killed_at = started.elapsed();
    s.galera_mut().kill_node(&first);
    // Let the writers run on the new node until each has written there.
    let (second, took) = moved_from(&s, &first, HUNG_BOUND).await;
    eprintln!("kill -9 of {first}: new connections on {second} after {took:?}");
    eventually(Duration::from_secs(15), "writes on the new node", || {
        let n = s
            .galera()
            .sql(
                &second,
                &format!("SELECT COUNT(*) FROM app.t WHERE node LIKE '%via {second}'"),
            )
            .unwrap_or_default();
        async move { (n.trim().parse::<u32>().unwrap_or(0) >= 40).then_some(()) }
    })
    .await;
    running.store(false, Ordering::Relaxed);
    for (w, writer) in writers.into_iter().enumerate() {
        let out = writer.await.expect("writer task");
        for (node, e) in &out.write_errors {
            assert_eq!(
                node, &first,
                "writer {w}: a write failed on a connection to {node}, not the killed node: {e}"
            );
        }
        for (at, e) in &out.connect_errors {
            assert!(
                *at >= killed_at && *at <= killed_at + HUNG_BOUND,
                "writer {w}: a connect failed outside the failover window (at {at:?}, kill at \
                 {killed_at:?}): {e}"
            );
        }
        let first_on_new = out
            .opened
            .iter()
            .find(|(_, n)| *n == second)
            .map(|(at, _)| *at)
            .unwrap_or_else(|| panic!("writer {w} never connected to {second}: {out:?}"));
        assert!(
            out.connect_errors.iter().all(|(at, _)| *at < first_on_new),
            "writer {w}: a connect failed after the first connection on {second}: {out:?}"
        );
        assert!(
            out.opened
                .iter()
                .filter(|(at, _)| *at > first_on_new)
                .all(|(_, n)| *n == second),
            "writer {w}: a later connection went elsewhere: {out:?}"
        );
        assert!(
            out.written.get(&second).copied().unwrap_or(0) > 0,
            "writer {w} wrote on {second}: {out:?}"
        );
    }
    s.stop().await;
}

/// No node healthy (one answers 503, the other hangs): a new client waits `wait_for_node`
/// (default 5 s), then gets a MySQL ERR naming each node's state; when a node recovers inside
/// the window, a waiting client connects to it. The relay keeps its default handshake deadline
/// (10 s; the stacks' usual 5 s would end the handshake before the agent's 5 s window does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_healthy_node_clients_wait_then_get_the_reasons_or_the_recovered_node() {
    let s = Stack::builder()
        .http_nodes(2)
        .api()
        .relay(|r| r.handshake_timeout = None)
        .start()
        .await;
    s.wait_node(0, "n1", Duration::from_secs(10)).await;
    s.http_node("n1").health.set(HealthMode::Status(503));
    s.http_node("n2").health.set(HealthMode::Hang);
    let api = s.api(0);
    eventually(Duration::from_secs(10), "no active node", || {
        let api = api.clone();
        async move { (api.active(None).await.1.is_none()).then_some(()) }
    })
    .await;

    let t = Instant::now();
    let err = s
        .app_conn(0, "alice")
        .await
        .expect_err("no client gets a node while none is healthy")
        .to_string();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(4_500) && waited <= Duration::from_millis(7_000),
        "the client waited the 5 s window: {waited:?}"
    );
    assert!(err.contains("no healthy node"), "{err}");
    assert!(
        err.contains("n1") && err.contains("503"),
        "n1's reason: {err}"
    );
    assert!(
        err.contains("n2") && (err.contains("timed out") || err.contains("timeout")),
        "n2's reason: {err}"
    );

    // A client that starts waiting gets the node that recovers inside the window.
    let opts = s.app_opts(0, "alice");
    let t = Instant::now();
    let waiting = tokio::spawn(async move {
        let mut c = mysql_async::Conn::new(opts).await?;
        let node = node_name(&mut c).await?;
        c.disconnect().await?;
        Ok::<_, mysql_async::Error>(node)
    });
    s.http_node("n1").health.set(HealthMode::Healthy);
    let node = waiting.await.unwrap().expect("the waiting client connects");
    let took = t.elapsed();
    assert_eq!(node, "n1");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "the client waited for the recovery, inside the window: {took:?}"
    );
    s.stop().await;
}
