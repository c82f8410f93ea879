//! The relay's HTTP surface for operators: `/v0/*` with Switchboard's fields, status codes and
//! messages (plus Postern's), basic auth, `PATCH /v0/cluster` disabling and restoring traffic,
//! draining and operator failback, `/healthz`, `/readyz`, the separate health port, and
//! `/metrics` in Prometheus text whose counters move with what happens.

use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::api::Metrics;
use postern_tests::stack::node_name;
use postern_tests::*;

/// Metric names (HAProxy exporter's style where one fits: `haproxy_server_up`,
/// `haproxy_server_check_failures_total`, `haproxy_server_check_duration_seconds`, ...).
/// Counters are sample names (`_total`).
mod metric {
    /// Tunneled connections opened, by `service`, `node`, `transport`.
    pub(super) const CONNECTIONS: &str = "postern_connections_total";
    /// Bytes carried, by `service`, `direction`.
    pub(super) const BYTES: &str = "postern_bytes_total";
    /// Refused connections, sessions and streams, by `origin` (which listener) and `reason`
    /// (the refusal's stable code).
    pub(super) const REFUSALS: &str = "postern_refusals_total";
    /// Health checks run, by `service`, `node`.
    pub(super) const CHECKS: &str = "postern_node_checks_total";
    /// Failed health checks, by `service`, `node`.
    pub(super) const CHECK_FAILURES: &str = "postern_node_check_failures_total";
    /// How long the node's last check took (a gauge, as HAProxy's), by `service`, `node`.
    pub(super) const CHECK_DURATION: &str = "postern_node_check_duration_seconds";
    /// Node up/down transitions, by `service`, `node`.
    pub(super) const NODE_TRANSITIONS: &str = "postern_node_transitions_total";
    /// Whether a node is up (1) or down (0), by `service`, `node`.
    pub(super) const NODE_UP: &str = "postern_node_up";
    /// Changes of the active node, by `service`.
    pub(super) const FAILOVERS: &str = "postern_failovers_total";
    /// The term of the decision the relay routes by, by `service`.
    pub(super) const TERM: &str = "postern_active_term";
    /// Agent sessions, by `transport`.
    pub(super) const AGENT_SESSIONS: &str = "postern_agent_sessions";
    /// Two nodes for one term seen from two agents (PLAN9: must stay 0).
    pub(super) const CONFLICTS: &str = "postern_decision_conflicts_total";
}

/// Waits until relay 0's `/v0/backends` shows `node` active.
async fn wait_active(s: &Stack, node: &str) -> u64 {
    let api = s.api(0);
    eventually(
        Duration::from_secs(10),
        &format!("{node} active in /v0/backends"),
        || {
            let api = api.clone();
            let node = node.to_owned();
            async move {
                let (term, active) = api.active(None).await;
                (active.as_deref() == Some(node.as_str())).then_some(term)
            }
        },
    )
    .await
}

/// 401 with Switchboard's body and challenge without or with wrong credentials; the fields of
/// `/v0/backends`, `/v0/cluster`, `/v0/cluster/events` and `/v0/status`, session counts per
/// node, what a 503 changes in them; 400s for bad `PATCH`es and 405 for other methods;
/// draining a node and an operator's failback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v0_fields_status_codes_auth_draining_and_failback() {
    let s = Stack::builder().http_nodes(2).api().start().await;
    let api = s.api(0);

    for (who, client) in [
        ("no credentials", api.without_auth()),
        ("a wrong password", api.with_auth("admin", "wrong")),
        ("a wrong user", api.with_auth("root", "x")),
    ] {
        for path in [
            "/v0/backends",
            "/v0/cluster",
            "/v0/cluster/events",
            "/v0/status",
            "/",
        ] {
            let r = client.get(path).await;
            assert_eq!(r.status, 401, "{path} with {who}: {}", r.body);
            assert_eq!(r.body.trim(), "Not Authorized", "{path} with {who}");
            assert_eq!(
                r.header("www-authenticate"),
                Some(r#"Basic realm="Authorization Required""#),
                "{path} with {who}"
            );
        }
        let r = client
            .patch("/v0/cluster", "trafficEnabled=false&message=x")
            .await;
        assert_eq!(r.status, 401, "PATCH with {who}");
    }

    let term = wait_active(&s, "n1").await;
    assert!(term >= 1);
    // Two sessions on n1, counted by this relay.
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut c = s.app_conn(0, "alice").await.unwrap();
        assert_eq!(node_name(&mut c).await.unwrap(), "n1");
        conns.push(c);
    }
    let backends = eventually(Duration::from_secs(5), "two sessions on n1", || {
        let api = api.clone();
        async move {
            let b = api.backends(None).await;
            b.iter()
                .any(|b| b.name == "n1" && b.current_session_count == 2)
                .then_some(b)
        }
    })
    .await;
    assert_eq!(backends.len(), 2, "{backends:#?}");
    for (b, node) in backends.iter().zip(&s.http_nodes) {
        assert_eq!(b.name, node.name);
        assert_eq!(b.host, "127.0.0.1");
        assert_eq!(b.port, node.db.addr.port());
        assert!(b.healthy, "{b:?}");
        assert_eq!(b.active, b.name == "n1", "{b:?}");
        assert!(b.traffic_enabled);
        assert_eq!(b.service, "orders");
        assert_eq!(b.term, term);
        assert!(!b.draining);
        assert_eq!(b.check, "http");
        let last = b.last_check.as_ref().expect("lastCheck");
        assert!(last.ok && last.latency_ms >= 0.0, "{last:?}");
        assert_eq!(b.consecutive_failures, 0);
        assert_eq!(b.current_session_count, if b.name == "n1" { 2 } else { 0 });
    }

    let cluster = api.cluster(None).await;
    let active = cluster.active_backend.as_ref().expect("activeBackend");
    assert_eq!(
        (active.name.as_str(), active.host.as_str(), active.port),
        ("n1", "127.0.0.1", s.http_node("n1").db.addr.port())
    );
    assert!(cluster.traffic_enabled);
    assert_eq!(cluster.service, "orders");
    assert_eq!(cluster.term, term);
    time::OffsetDateTime::parse(
        &cluster.last_updated,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap_or_else(|e| panic!("lastUpdated {:?} is RFC 3339: {e}", cluster.last_updated));
    let events = api.events(None).await;
    let last = events
        .iter()
        .max_by_key(|e| e.term)
        .expect("at least the first decision");
    assert_eq!((last.term, last.to.as_deref()), (term, Some("n1")));
    assert!(
        !last.reason.is_empty() && !last.agent.is_empty(),
        "{last:?}"
    );
    let status = api.status().await;
    assert!(status.is_object(), "{status}");
    assert!(
        status.to_string().contains("n1"),
        "/v0/status names the nodes: {status}"
    );

    // Bad requests, in Switchboard's words; other methods.
    let r = api.patch("/v0/cluster", "trafficEnabled=maybe").await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("Failed to parse trafficEnabled"),
        "{}",
        r.body
    );
    let r = api.patch("/v0/cluster", "trafficEnabled=false").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("message must not be empty"), "{}", r.body);
    let r = api
        .patch("/v0/cluster", "trafficEnabled=false&message=")
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    for method in ["POST", "PUT", "DELETE"] {
        let r = api.request(method, "/v0/cluster", Some("")).await;
        assert_eq!(r.status, 405, "{method} /v0/cluster: {}", r.body);
    }
    let r = api.patch("/v0/backends/nope", "draining=true").await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(api.cluster(None).await.traffic_enabled, "nothing changed");

    // A 503: n1 unhealthy with its reason, a new term on n2, an event that says why.
    s.http_node("n1").health.set(HealthMode::Status(503));
    let t2 = wait_active(&s, "n2").await;
    assert!(t2 > term);
    let b = api.backends(None).await;
    let n1 = b.iter().find(|b| b.name == "n1").unwrap();
    assert!(!n1.healthy && !n1.active, "{n1:?}");
    assert!(n1.consecutive_failures >= 1, "{n1:?}");
    let last = n1.last_check.as_ref().expect("lastCheck");
    assert!(
        !last.ok && last.detail.as_deref().unwrap_or_default().contains("503"),
        "{last:?}"
    );
    let why = n1.last_transition.as_ref().expect("lastTransition");
    assert!(why.why.contains("503"), "{why:?}");
    let ev = api
        .events(None)
        .await
        .into_iter()
        .find(|e| e.term == t2)
        .expect("an event for the new term");
    assert_eq!(
        (ev.from.as_deref(), ev.to.as_deref()),
        (Some("n1"), Some("n2"))
    );
    assert!(ev.reason.contains("n1"), "{ev:?}");
    for c in &mut conns {
        assert!(
            c.query_drop("SELECT 1").await.is_err(),
            "n1's sessions were closed"
        );
    }

    // Draining n2 (the active node): open sessions go on, the flag shows.
    let mut on_n2 = s.app_conn(0, "alice").await.unwrap();
    assert_eq!(node_name(&mut on_n2).await.unwrap(), "n2");
    let r = api.patch("/v0/backends/n2", "draining=true").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // With n1 down, a drained n2 leaves no node for new connections: none is active.
    eventually(
        Duration::from_secs(5),
        "n2 draining, no node active",
        || {
            let api = api.clone();
            async move {
                let b = api.backends(None).await;
                (b.iter().any(|b| b.name == "n2" && b.draining) && !b.iter().any(|b| b.active))
                    .then_some(())
            }
        },
    )
    .await;
    let one: Option<i64> = on_n2.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1), "a drained node's open session goes on");
    let r = api.patch("/v0/backends/n2", "draining=false").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Undrained, n2 is active again, at a newer term.
    let back = wait_active(&s, "n2").await;
    assert!(
        back > t2,
        "each change of the active node is a new term: {back} > {t2}"
    );
    let t2 = back;

    // n1 recovers: sticky. The operator asks for it: failback at a new term.
    s.http_node("n1").health.set(HealthMode::Healthy);
    eventually(Duration::from_secs(10), "n1 healthy again", || {
        let api = api.clone();
        async move {
            let b = api.backends(None).await;
            b.iter().any(|b| b.name == "n1" && b.healthy).then_some(())
        }
    })
    .await;
    assert_eq!(api.active(None).await, (t2, Some("n2".into())));
    let r = api.patch("/v0/backends/n1", "active=true").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let t3 = wait_active(&s, "n1").await;
    assert!(t3 > t2);
    assert_eq!(s.which_node(0).await.as_deref(), Ok("n1"));
    s.stop().await;
}

/// `PATCH /v0/cluster trafficEnabled=false` with a message closes open sessions and refuses
/// new ones with that message; `true` lets clients in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_traffic_severs_and_refuses_with_the_message_and_enabling_restores_it() {
    let s = Stack::builder().http_nodes(2).api().start().await;
    let api = s.api(0);
    wait_active(&s, "n1").await;
    let mut open = s.app_conn(0, "alice").await.unwrap();
    open.query_drop("SELECT 1").await.unwrap();

    let message = "maintenance until 14:00, see #ops";
    let cluster = api.set_traffic(false, message).await;
    assert!(!cluster.traffic_enabled);
    assert_eq!(cluster.message.as_deref(), Some(message));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while open.query_drop("SELECT 1").await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the open session still works 2 s after traffic was disabled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = s
        .app_conn(0, "alice")
        .await
        .expect_err("a new client is refused")
        .to_string();
    assert!(err.contains(message), "the operator's message: {err}");
    let b = api.backends(None).await;
    assert!(b.iter().all(|b| !b.traffic_enabled), "{b:?}");
    assert!(!api.cluster(None).await.traffic_enabled);

    let cluster = api.set_traffic(true, "").await;
    assert!(cluster.traffic_enabled);
    eventually(Duration::from_secs(5), "clients served again", || async {
        s.which_node(0).await.ok().filter(|n| n == "n1")
    })
    .await;
    s.stop().await;
}

/// `/healthz` answers 200 with no agent at all; `/readyz` answers 503 until an agent is
/// connected with a healthy active node, then 200 with details, and 503 again when no node is
/// healthy; the separate health port answers 200 with an empty body on any path, no auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_without_agents_readyz_follows_agent_and_nodes_and_the_health_port_answers() {
    let s = Stack::builder()
        .http_nodes(1)
        .api()
        .health_listen()
        .no_agent()
        .start()
        .await;
    let http = s.relay().http().expect("an HTTP listener");
    let (status, _) = http_get(http, "/healthz").await.unwrap();
    assert_eq!(status, 200, "/healthz with no agent");
    let (status, body) = http_get(http, "/readyz").await.unwrap();
    assert_eq!(status, 503, "/readyz with no agent: {body}");
    for path in ["/", "/healthz", "/anything"] {
        let (status, body) = http_get(s.health_addr(), path).await.unwrap();
        assert_eq!((status, body.as_str()), (200, ""), "health port {path}");
    }

    let mut agent = s.start_agent(&s.agent_config());
    agent.wait_connected().await;
    let body = wait_ready(http, Duration::from_secs(10)).await;
    assert!(
        body.contains("orders") && body.contains("n1"),
        "details: {body}"
    );

    s.http_node("n1").health.set(HealthMode::Status(503));
    eventually(
        Duration::from_secs(5),
        "/readyz 503 without a healthy node",
        || async {
            http_get(http, "/readyz")
                .await
                .ok()
                .filter(|(status, _)| *status == 503)
        },
    )
    .await;
    let (status, _) = http_get(http, "/healthz").await.unwrap();
    assert_eq!(status, 200, "/healthz never depends on the database");
    agent.stop().await;
    s.stop().await;
}

/// Without `api:` the API, dashboard and metrics are off: 404 with a hint, never open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_api_credentials_the_api_is_off() {
    let s = Stack::builder().mariadb().start().await;
    let http = s.relay().http().expect("an HTTP listener");
    for path in ["/v0/backends", "/v0/cluster", "/metrics", "/"] {
        let (status, body) = http_get(http, path).await.unwrap();
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            body.contains("api"),
            "{path}: a hint about `api:` in relay.yaml: {body}"
        );
    }
    s.stop().await;
}

/// `/metrics` (basic auth) parses as Prometheus text; its counters move with connections,
/// refusals and a failover, and the gauges say what is true now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_connections_refusals_and_failovers() {
    let s = Stack::builder().http_nodes(2).api().start().await;
    let api = s.api(0);
    let r = api.without_auth().get("/metrics").await;
    assert_eq!(r.status, 401, "/metrics needs credentials");
    let t1 = wait_active(&s, "n1").await;
    let before = api.metrics().await;
    let orders = [("service", "orders")];
    assert_eq!(before.sum(metric::TERM, &orders), t1 as f64);
    assert_eq!(before.sum(metric::CONFLICTS, &[]), 0.0);
    assert!(before.sum(metric::AGENT_SESSIONS, &[]) >= 1.0);
    assert_eq!(
        before.sum(metric::NODE_UP, &[("service", "orders"), ("node", "n1")]),
        1.0
    );

    for _ in 0..3 {
        let mut c = s.app_conn(0, "alice").await.unwrap();
        let _: Option<String> = c.query_first("SELECT REPEAT('x', 10000)").await.unwrap();
        c.disconnect().await.unwrap();
    }
    // A refusal: a client the service does not list.
    let refused = mysql_async::Conn::new(s.app_opts(0, "mallory")).await;
    assert!(refused.is_err(), "mallory is refused");
    // A failover.
    s.http_node("n1").health.set(HealthMode::Status(503));
    let t2 = wait_active(&s, "n2").await;
    // Check rounds happen meanwhile.
    let after = eventually(Duration::from_secs(5), "the counters to move", || {
        let api = api.clone();
        let before = before.clone();
        async move {
            let m = api.metrics().await;
            moved(&before, &m).is_ok().then_some(m)
        }
    })
    .await;
    moved(&before, &after).unwrap();
    let n1 = [("service", "orders"), ("node", "n1")];
    let duration: Vec<_> = after.matching(metric::CHECK_DURATION, &n1).collect();
    assert!(
        duration.len() == 1 && duration[0].value >= 0.0 && duration[0].value < 5.0,
        "{}: {duration:?}",
        metric::CHECK_DURATION
    );
    for (family, kind) in [
        ("postern_connections", "counter"),
        ("postern_refusals", "counter"),
        ("postern_failovers", "counter"),
        (metric::CHECK_DURATION, "gauge"),
        (metric::NODE_UP, "gauge"),
        (metric::TERM, "gauge"),
    ] {
        assert_eq!(
            after.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}"
        );
    }
    assert_eq!(after.sum(metric::TERM, &orders), t2 as f64);
    assert_eq!(
        after.sum(metric::NODE_UP, &[("service", "orders"), ("node", "n1")]),
        0.0
    );
    assert_eq!(after.sum(metric::CONFLICTS, &[]), 0.0);
    s.stop().await;
}

/// Every counter that should have moved, or the first that did not.
fn moved(before: &Metrics, after: &Metrics) -> Result<(), String> {
    let orders = [("service", "orders")];
    let n1 = [("service", "orders"), ("node", "n1")];
    /// A counter, the labels it must have, and by how much it must have grown.
    type Moved<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
    // mallory's certificate is not on the service's list: refused at the MySQL listener.
    let not_authorized = [("origin", "mysql_listener"), ("reason", "not_authorized")];
    let checks: [Moved<'_>; 7] = [
        (metric::CONNECTIONS, &n1, 3.0),
        (metric::BYTES, &orders, 30_000.0),
        (metric::REFUSALS, &not_authorized, 1.0),
        (metric::FAILOVERS, &orders, 1.0),
        (metric::NODE_TRANSITIONS, &n1, 1.0),
        (metric::CHECK_FAILURES, &n1, 1.0),
        (metric::CHECKS, &n1, 2.0),
    ];
    for (name, labels, by) in checks {
        let (b, a) = (before.sum(name, labels), after.sum(name, labels));
        if a - b < by {
            return Err(format!("{name}{labels:?} moved {b} -> {a}, expected +{by}"));
        }
    }
    Ok(())
}
