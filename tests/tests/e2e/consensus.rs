//! One decision for every relay: relays that share an agent show the same term and node through
//! every transition, and two agents serving one Galera cluster (`decisions: cluster`) never give
//! one term two nodes, also when one of them, or the node next to it, is killed. Every relay's
//! view (`/v0/backends`, `/v0/cluster/events`) is polled throughout ([`DecisionWatch`]).

use std::time::Duration;

use postern_tests::config::Decisions;
use postern_tests::failover::{DecisionWatch, lowest_index};
use postern_tests::*;
use tokio::time::Instant;

const GUID: &str = "2b7c9e1d-4f3a-4c5b-9d6e-7f8a9b0c1d2e";

/// The failover bound for a node or agent that stops answering.
const HUNG_BOUND: Duration = Duration::from_millis(3_500);

/// Asserts new connections through every relay land on `node`.
async fn all_land_on(s: &Stack, node: &str) {
    for r in 0..s.relays.len() {
        assert_eq!(
            s.which_node(r).await.as_deref(),
            Ok(node),
            "a new connection through relay {r}"
        );
    }
}

/// Two relay instances, one agent with a session to each, three `http`-checked nodes: through
/// 503, a hang, a recovery (sticky: nothing moves) and another 503, both relays show the same
/// term and node at each step, terms only grow, and clients of both land on that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_with_one_agent_agree_on_term_and_node_through_every_transition() {
    let s = Stack::builder()
        .http_nodes(3)
        .api()
        .cloud_foundry(GUID, 2)
        .start()
        .await;
    let watch = DecisionWatch::start(vec![s.api(0), s.api(1)], None);
    let within = Duration::from_secs(10);
    let t1 = watch.wait_all(2, Some("n1"), within).await;
    all_land_on(&s, "n1").await;

    s.http_node("n1").health.set(HealthMode::Status(503));
    let t2 = watch.wait_all(2, Some("n2"), within).await;
    assert!(t2 > t1, "a new term for n2: {t1} -> {t2}");
    all_land_on(&s, "n2").await;

    s.http_node("n2").health.set(HealthMode::Hang);
    let t3 = watch.wait_all(2, Some("n3"), within).await;
    assert!(t3 > t2, "a new term for n3: {t2} -> {t3}");
    all_land_on(&s, "n3").await;

    // n1 recovers: sticky, nothing moves and the term stays.
    s.http_node("n1").health.set(HealthMode::Healthy);
    let api = s.api(0);
    eventually(within, "n1 healthy again", || {
        let api = api.clone();
        async move {
            let b = api.backends(None).await;
            b.iter().any(|b| b.name == "n1" && b.healthy).then_some(())
        }
    })
    .await;
    assert_eq!(watch.wait_all(2, Some("n3"), within).await, t3);
    all_land_on(&s, "n3").await;

    s.http_node("n3").health.set(HealthMode::Status(503));
    let t4 = watch.wait_all(2, Some("n1"), within).await;
    assert!(t4 > t3, "a new term for n1: {t3} -> {t4}");
    all_land_on(&s, "n1").await;

    let seen = watch.stop_and_check().await;
    for relay in 0..2 {
        let terms: std::collections::BTreeSet<u64> = seen
            .iter()
            .filter(|x| x.relay == relay && x.source == "backends")
            .map(|x| x.term)
            .collect();
        assert!(
            [t1, t2, t3, t4].iter().all(|t| terms.contains(t)),
            "relay {relay} showed every term: {terms:?}"
        );
    }
    s.stop().await;
}

/// Two agents (`db1`, `db2`) serve one Galera cluster with `decisions: cluster`, both as
/// processes in session with both relays. Starts them, waits for one decision on both relays.
async fn two_agents() -> (Stack, procs::AgentProc, DecisionWatch) {
    let s = Stack::builder()
        .galera()
        .api()
        .agent_process()
        .cloud_foundry(GUID, 2)
        .relay(|r| {
            r.agent("db2", &["orders"]);
        })
        .agent(|a| a.service_mut("orders").decisions = Some(Decisions::Cluster))
        .start()
        .await;
    let mut db2 = s.agent_config_as("db2");
    db2.websocket_mut().cloud_foundry = true;
    db2.service_mut("orders").decisions = Some(Decisions::Cluster);
    let db2 = s.start_agent_process(&db2, &[]);
    for relay in &s.relays {
        relay.wait_agent("db2").await;
    }
    let watch = DecisionWatch::start(vec![s.api(0), s.api(1)], None);
    let first = lowest_index(s.galera(), &[]);
    watch
        .wait_all(2, Some(&first), Duration::from_secs(15))
        .await;
    all_land_on(&s, &first).await;
    (s, db2, watch)
}

/// `kill -9` of one of two agents: clients keep being served through the other (new
/// connections on both relays succeed within the bound, on the same node, at the same term),
/// and no term ever names two nodes from either relay's view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_one_killed_clients_are_served_by_the_other_and_no_term_has_two_nodes() {
    let (mut s, db2, watch) = two_agents().await;
    let first = lowest_index(s.galera(), &[]);
    let (term, _) = watch.latest(0).expect("a view");

    let killed = Instant::now();
    s.agent_proc_mut().kill();
    for r in 0..2 {
        loop {
            match s.which_node(r).await {
                Ok(node) => {
                    assert_eq!(node, first, "relay {r}: the decision stays");
                    break;
                }
                Err(e) => assert!(
                    killed.elapsed() < HUNG_BOUND,
                    "relay {r}: no connection within {HUNG_BOUND:?} of the kill: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "agent db1 killed: served through db2 after {:?}",
        killed.elapsed()
    );
    // And it stays so: twenty connections in a row through each relay.
    for _ in 0..10 {
        all_land_on(&s, &first).await;
    }
    assert_eq!(
        watch
            .wait_all(2, Some(&first), Duration::from_secs(5))
            .await,
        term,
        "losing an agent is no new decision"
    );

    // The survivor still fails over alone: its node goes, a new term names another.
    s.galera().desync(&first, true);
    let others: Vec<String> = s
        .galera()
        .names()
        .into_iter()
        .filter(|n| *n != first)
        .collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    let next = lowest_index(s.galera(), &others);
    let t2 = watch.wait_all(2, Some(&next), HUNG_BOUND).await;
    assert!(t2 > term);
    all_land_on(&s, &next).await;

    watch.stop_and_check().await;
    drop(db2);
    s.stop().await;
}

/// `kill -9` of the active node (the one agent db1 sits next to) while two agents serve the
/// cluster: both relays move to one new node at one new term within the bound, clients of both
/// land there, and no term ever names two nodes; when the node comes back, nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_the_active_node_killed_one_new_term_one_new_node_on_every_relay() {
    let (mut s, db2, watch) = two_agents().await;
    let first = lowest_index(s.galera(), &[]);
    let (term, _) = watch.latest(0).expect("a view");
    let others: Vec<String> = s
        .galera()
        .names()
        .into_iter()
        .filter(|n| *n != first)
        .collect();

    let killed = Instant::now();
    s.galera_mut().kill_node(&first);
    let deadline = killed + HUNG_BOUND;
    let (new_term, node) = loop {
        let views: Vec<_> = (0..2).map(|r| watch.latest(r)).collect();
        if let [Some((t0, Some(n0))), Some((t1, Some(n1)))] = views.as_slice()
            && t0 == t1
            && n0 == n1
            && *n0 != first
        {
            break (*t0, n0.clone());
        }
        assert!(
            Instant::now() < deadline,
            "both relays on one new node within {HUNG_BOUND:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "kill -9 of {first}: both relays on {node} at term {new_term} after {:?}",
        killed.elapsed()
    );
    assert!(new_term > term);
    assert!(others.contains(&node));
    all_land_on(&s, &node).await;

    s.galera_mut().start_node(&first).await;
    let api = s.api(0);
    eventually(
        Duration::from_secs(15),
        "the killed node healthy again",
        || {
            let (api, first) = (api.clone(), first.clone());
            async move {
                let b = api.backends(None).await;
                b.iter().any(|b| b.name == first && b.healthy).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        watch.wait_all(2, Some(&node), Duration::from_secs(5)).await,
        new_term
    );
    all_land_on(&s, &node).await;

    watch.stop_and_check().await;
    drop(db2);
    s.stop().await;
}
