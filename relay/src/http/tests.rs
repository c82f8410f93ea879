//! The HTTP surface driven over real HTTP on a local port, with agents that are real sessions
//! (in memory) speaking the real control protocol to the relay's agent code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_common::pki::{Ca, Identity, Kind, LeafSpec};
use postern_common::protocol::{
    Answer, CheckResult, Code, Command, Control, FEATURE_BACKENDS, NodeState, Open, ServiceState,
    StreamMode,
};
use postern_common::transport::{Session, Stream};
use postern_common::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Shared;
use crate::config::Config;

/// A relay's shared state with its HTTP listener on an ephemeral port.
struct Relay {
    shared: Arc<Shared>,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

const AUTH: &str = "admin:pw";

async fn relay(api: bool, services: &[&str]) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let (ca, key) = Ca::generate("test", 1).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), key).unwrap();
    let issued = ca.issue(&LeafSpec::new(Kind::Server, "relay", 1)).unwrap();
    std::fs::write(dir.path().join("relay.pem"), issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("relay-key.pem"), issued.key_pem).unwrap();
    std::fs::write(dir.path().join("api-password"), "pw\n").unwrap();
    let mut text = String::from(
        "listen:\n  quic: 127.0.0.1:0\ninstance: test-relay\ntls: { ca: ca.pem, cert: relay.pem, key: relay-key.pem }\n",
    );
    if api {
        text += "api:\n  username: admin\n  password_file: api-password\n";
    }
    text += "agents:\n";
    for a in ["db1", "db2"] {
        text += &format!("  {a}: {{ services: [{}] }}\n", services.join(", "));
    }
    text += "services:\n";
    for s in services {
        text += &format!("  {s}:\n    clients: [\"*\"]\n    protocol: tcp\n");
    }
    let env = BTreeMap::<&str, &str>::new();
    let config = Config::parse(&dir.path().join("relay.yaml"), &text, &env).unwrap();
    let acceptors = crate::state::Acceptors::new(&config.tls).unwrap();
    let shared = Arc::new(Shared::new(config, None, acceptors, None));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    tokio::spawn(super::serve(shared.clone(), listener));
    tokio::spawn(super::metrics::follow(shared.clone()));
    Relay {
        shared,
        http,
        _dir: dir,
    }
}

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Reply {
    use base64::Engine;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        let b64 = base64::engine::general_purpose::STANDARD.encode(a);
        req += &format!("Authorization: Basic {b64}\r\n");
    }
    if !body.is_empty() {
        req += &format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn get(r: &Relay, path: &str) -> Reply {
    request(r.http, "GET", path, Some(AUTH), "").await
}

/// An agent: its end of a session whose other end the relay's agent code serves.
struct Agent {
    session: Session,
    control: Stream,
}

async fn connect_agent(r: &Relay, name: &str, services: &[&str]) -> Agent {
    let (relay_end, session) = Session::memory_pair();
    tokio::spawn(crate::agents::serve(
        r.shared.clone(),
        relay_end,
        name.to_owned(),
    ));
    let mut control = session.open().await.unwrap();
    let hello = Control::Hello {
        versions: vec![1],
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        software: "test".into(),
        take_over: false,
        features: vec![FEATURE_BACKENDS.into()],
    };
    wire::write_first(&mut control, &hello).await.unwrap();
    let welcome: Control = wire::read_frame(&mut control).await.unwrap();
    let Control::Welcome { features, .. } = welcome else {
        panic!("{welcome:?}")
    };
    assert!(features.iter().any(|f| f == FEATURE_BACKENDS));
    Agent { session, control }
}

fn state(service: &str, term: u64, active: Option<&str>, healthy: [bool; 2]) -> ServiceState {
    ServiceState {
        service: service.into(),
        term,
        active: active.map(str::to_owned),
        reason: format!("term {term} reason"),
        decided_at_ms: 1_700_000_000_000,
        traffic_enabled: true,
        message: String::new(),
        nodes: ["n1", "n2"]
            .iter()
            .zip(healthy)
            .enumerate()
            .map(|(i, (n, healthy))| NodeState {
                name: (*n).into(),
                address: format!("10.0.0.{}:3306", i + 1),
                healthy,
                check: "mysql".into(),
                last_check: Some(CheckResult {
                    ok: healthy,
                    detail: if healthy {
                        "Synced".into()
                    } else {
                        "503".into()
                    },
                    latency_ms: 3,
                    at_ms: 1_700_000_000_000,
                }),
                wsrep_local_index: Some(i as u32),
                checks: 10,
                check_failures: 1,
                transitions: 2,
                ..Default::default()
            })
            .collect(),
    }
}

impl Agent {
    /// Sends a report, and waits until the relay has taken it.
    async fn report(&mut self, r: &Relay, states: Vec<ServiceState>) {
        let mut changes = r.shared.cluster.subscribe();
        changes.borrow_and_update();
        wire::write_frame(&mut self.control, &Control::State { services: states })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
    }

    /// The next message other than a heartbeat.
    async fn next(&mut self) -> Control {
        loop {
            let m = tokio::time::timeout(
                Duration::from_secs(5),
                wire::read_frame::<_, Control>(&mut self.control),
            )
            .await
            .unwrap()
            .unwrap();
            if !matches!(m, Control::Heartbeat { .. }) {
                return m;
            }
        }
    }

    /// Answers the next data stream as an agent connected to `backend` would, echoing bytes.
    fn serve_one(&self, backend: &'static str) -> tokio::task::JoinHandle<(Open, Stream)> {
        let session = self.session.clone();
        tokio::spawn(async move {
            let mut s = session.accept().await.unwrap();
            let open: Open = wire::read_first(&mut s).await.unwrap();
            wire::write_first(
                &mut s,
                &Answer::Ok {
                    backend: backend.into(),
                },
            )
            .await
            .unwrap();
            (open, s)
        })
    }
}

#[tokio::test]
async fn without_api_config_the_operator_surface_is_off_and_health_is_open() {
    let r = relay(false, &["orders"]).await;
    for path in [
        "/",
        "/metrics",
        "/v0/agents",
        "/v0/backends",
        "/v0/cluster",
        "/v0/status",
    ] {
        let reply = request(r.http, "GET", path, Some(AUTH), "").await;
        assert_eq!(reply.status, 404, "{path}");
        assert!(reply.body.contains("set api"), "{path}: {}", reply.body);
    }
    assert_eq!(
        request(r.http, "GET", "/healthz", None, "").await.status,
        200
    );
    let ready = request(r.http, "GET", "/readyz", None, "").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["services_without_agent"][0], "orders");
}

#[tokio::test]
async fn the_operator_surface_needs_the_credentials() {
    let r = relay(true, &["orders"]).await;
    for path in [
        "/",
        "/metrics",
        "/v0/agents",
        "/v0/backends",
        "/v0/cluster",
        "/v0/nothing",
    ] {
        for auth in [None, Some("admin:wrong"), Some("root:pw")] {
            let reply = request(r.http, "GET", path, auth, "").await;
            assert_eq!(reply.status, 401, "{path} {auth:?}");
            assert_eq!(reply.body, "Not Authorized");
            assert!(
                reply
                    .head
                    .to_ascii_lowercase()
                    .contains("www-authenticate: basic realm=\"authorization required\""),
                "{}",
                reply.head
            );
        }
        let ok = get(&r, path).await;
        let want = if path == "/v0/nothing" { 404 } else { 200 };
        assert_eq!(ok.status, want, "{path}: {}", ok.body);
    }
    let page = get(&r, "/").await;
    assert!(page.head.contains("text/html"));
    assert!(page.body.contains("v0/status") && page.body.contains("data-active"));
    // Health stays open.
    assert_eq!(
        request(r.http, "GET", "/healthz", None, "").await.status,
        200
    );
}

#[tokio::test]
async fn several_services_need_a_choice() {
    let r = relay(true, &["orders", "billing"]).await;
    let reply = get(&r, "/v0/backends").await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("billing, orders"), "{}", reply.body);
    assert_eq!(get(&r, "/v0/backends?service=orders").await.status, 200);
    assert_eq!(get(&r, "/v0/backends?service=nope").await.status, 404);
}

#[tokio::test]
async fn backends_cluster_readiness_and_events_follow_the_agents_reports() {
    let r = relay(true, &["orders"]).await;
    assert_eq!(get(&r, "/v0/backends").await.json(), serde_json::json!([]));
    let cluster = get(&r, "/v0/cluster").await.json();
    assert_eq!(cluster["activeBackend"], serde_json::Value::Null);
    assert_eq!(cluster["lastUpdated"], "0001-01-01T00:00:00Z");

    let mut agent = connect_agent(&r, "db1", &["orders"]).await;
    // Connected, but no healthy active node reported yet.
    assert_eq!(
        request(r.http, "GET", "/readyz", None, "").await.status,
        503
    );
    agent
        .report(&r, vec![state("orders", 1, Some("n1"), [true, true])])
        .await;
    let ready = request(r.http, "GET", "/readyz", None, "").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["services"][0]["active"], "n1");

    let backends = get(&r, "/v0/backends").await;
    assert!(backends.head.contains("application/json"));
    let b = backends.json();
    assert_eq!(b.as_array().unwrap().len(), 2);
    let n1 = &b[0];
    for (k, v) in [
        ("host", serde_json::json!("10.0.0.1")),
        ("port", serde_json::json!(3306)),
        ("healthy", serde_json::json!(true)),
        ("name", serde_json::json!("n1")),
        ("currentSessionCount", serde_json::json!(0)),
        ("active", serde_json::json!(true)),
        ("trafficEnabled", serde_json::json!(true)),
        ("service", serde_json::json!("orders")),
        ("term", serde_json::json!(1)),
        ("draining", serde_json::json!(false)),
        ("check", serde_json::json!("mysql")),
        ("consecutiveFailures", serde_json::json!(0)),
        ("wsrepLocalIndex", serde_json::json!(0)),
    ] {
        assert_eq!(n1[k], v, "{k} in {n1}");
    }
    assert_eq!(n1["lastCheck"]["latencyMs"], 3);
    assert_eq!(n1["lastCheck"]["at"], "2023-11-14T22:13:20.000Z");
    assert_eq!(b[1]["active"], false);

    // n1 fails: term 2 on n2.
    agent
        .report(&r, vec![state("orders", 2, Some("n2"), [false, true])])
        .await;
    let c = get(&r, "/v0/cluster").await.json();
    assert_eq!(
        c["activeBackend"],
        serde_json::json!({"host": "10.0.0.2", "port": 3306, "name": "n2"})
    );
    assert_eq!(
        (c["term"].as_u64(), c["trafficEnabled"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(c["reason"], "term 2 reason");
    assert!(c["lastUpdated"].as_str().unwrap() > "2020");
    let events = get(&r, "/v0/cluster/events").await.json();
    assert_eq!(events[0]["term"], 2);
    assert_eq!(
        (events[0]["from"].as_str(), events[0]["to"].as_str()),
        (Some("n1"), Some("n2"))
    );
    assert_eq!(events[0]["agent"], "db1");
    assert_eq!(events[1]["to"], "n1");
    let status = get(&r, "/v0/status").await.json();
    assert_eq!(status["instance"], "test-relay");
    assert_eq!(status["services"][0]["active"], "n2");
    assert_eq!(status["services"][0]["failovers"], 1);
    assert_eq!(status["agents"][0]["name"], "db1");
    assert_eq!(status["agents"][0]["backends"], true);

    // The agent leaves: the decision stays, readiness goes.
    agent.session.close("test over");
    let mut changes = r.shared.cluster.subscribe();
    while r
        .shared
        .cluster
        .snapshot("orders")
        .unwrap()
        .reports
        .contains_key("db1")
    {
        changes.changed().await.unwrap();
    }
    assert_eq!(r.shared.cluster.route("orders"), (2, Some("n2".into())));
    assert_eq!(
        request(r.http, "GET", "/readyz", None, "").await.status,
        503
    );
}

#[tokio::test]
async fn patches_are_checked_as_switchboard_checks_them_and_sent_to_every_agent() {
    let r = relay(true, &["orders"]).await;
    // No agent: nobody to tell.
    let reply = request(
        r.http,
        "PATCH",
        "/v0/cluster",
        Some(AUTH),
        "trafficEnabled=false&message=x",
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.body);

    let mut a1 = connect_agent(&r, "db1", &["orders"]).await;
    let mut a2 = connect_agent(&r, "db2", &["orders"]).await;
    a1.report(&r, vec![state("orders", 1, Some("n1"), [true, true])])
        .await;
    a2.report(&r, vec![state("orders", 1, Some("n1"), [true, true])])
        .await;

    let bad = request(
        r.http,
        "PATCH",
        "/v0/cluster",
        Some(AUTH),
        "trafficEnabled=maybe",
    )
    .await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "Failed to parse trafficEnabled")
    );
    let bad = request(r.http, "PATCH", "/v0/cluster", Some(AUTH), "").await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "Failed to parse trafficEnabled")
    );
    let bad = request(
        r.http,
        "PATCH",
        "/v0/cluster?trafficEnabled=false",
        Some(AUTH),
        "",
    )
    .await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "message must not be empty")
    );
    for method in ["POST", "PUT", "DELETE"] {
        let reply = request(r.http, method, "/v0/cluster", Some(AUTH), "").await;
        assert_eq!(reply.status, 405, "{method}");
    }

    let ok = request(
        r.http,
        "PATCH",
        "/v0/cluster",
        Some(AUTH),
        "trafficEnabled=false&message=down+for+maintenance",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let c = ok.json();
    assert_eq!(c["trafficEnabled"], false);
    assert_eq!(c["message"], "down for maintenance");
    let want = Control::Command {
        command: Command::Traffic {
            service: "orders".into(),
            enabled: false,
            message: "down for maintenance".into(),
        },
    };
    assert_eq!(a1.next().await, want);
    assert_eq!(a2.next().await, want);
    // New clients are refused here at once with the operator's message, before any agent
    // confirms (no stream is opened to an agent: none of them answers one here).
    let svc = r.shared.config().services.get("orders").unwrap().clone();
    let refused = crate::forward::open(
        &r.shared,
        &svc,
        Some(&Identity::Client("alice".into())),
        Some("127.0.0.1:1".parse().unwrap()),
        StreamMode::Plain,
    )
    .await;
    let refusal = refused.err().expect("refused while traffic is disabled");
    assert_eq!(
        (refusal.code, refusal.message.as_str()),
        (Code::BackendUnavailable, "down for maintenance")
    );

    let ok = request(
        r.http,
        "PATCH",
        "/v0/backends/n2",
        Some(AUTH),
        "active=true",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["name"], "n2");
    let want = Control::Command {
        command: Command::Activate {
            service: "orders".into(),
            node: "n2".into(),
        },
    };
    assert_eq!(a1.next().await, want);
    assert_eq!(a2.next().await, want);
    let ok = request(
        r.http,
        "PATCH",
        "/v0/backends/n1?draining=true",
        Some(AUTH),
        "",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        a1.next().await,
        Control::Command {
            command: Command::Drain {
                service: "orders".into(),
                node: "n1".into(),
                drain: true
            }
        }
    );
    let nope = request(
        r.http,
        "PATCH",
        "/v0/backends/n9",
        Some(AUTH),
        "active=true",
    )
    .await;
    assert_eq!(nope.status, 404);
    let bad = request(
        r.http,
        "PATCH",
        "/v0/backends/n1",
        Some(AUTH),
        "draining=perhaps",
    )
    .await;
    assert_eq!(bad.status, 400);
    let big = "message=".to_owned() + &"x".repeat(super::api::MAX_BODY + 1);
    let reply = request(r.http, "PATCH", "/v0/cluster", Some(AUTH), &big).await;
    assert_eq!(reply.status, 413);
}

/// Opens a connection through the relay's forwarding code, as a listener would.
async fn open(r: &Relay) -> crate::forward::Reached {
    let svc = r.shared.config().services.get("orders").unwrap().clone();
    crate::forward::open(
        &r.shared,
        &svc,
        Some(&Identity::Client("alice".into())),
        Some("127.0.0.1:1".parse().unwrap()),
        StreamMode::Plain,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.message))
}

#[tokio::test]
async fn connections_go_to_the_active_node_and_are_severed_when_it_moves() {
    let r = relay(true, &["orders"]).await;
    let mut a1 = connect_agent(&r, "db1", &["orders"]).await;
    let mut a2 = connect_agent(&r, "db2", &["orders"]).await;
    // db1 sees n1 healthy, db2 (the newer session, preferred otherwise) does not.
    a1.report(&r, vec![state("orders", 3, Some("n1"), [true, true])])
        .await;
    a2.report(&r, vec![state("orders", 3, Some("n1"), [false, true])])
        .await;

    let served = a1.serve_one("10.0.0.1:3306");
    let mut reached = open(&r).await;
    let (asked, mut agent_end) = served.await.unwrap();
    assert_eq!((asked.node.as_deref(), asked.term), (Some("n1"), 3));
    assert_eq!(reached.agent, "db1", "the agent that reports n1 healthy");
    // Bytes flow.
    reached.stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    agent_end.read_exact(&mut buf).await.unwrap();
    let b = get(&r, "/v0/backends").await.json();
    assert_eq!(b[0]["currentSessionCount"], 1);
    let metrics = get(&r, "/metrics").await.body;
    assert!(
        metrics.contains(
            "postern_connections_total{service=\"orders\",node=\"n1\",transport=\"websocket\"} 1"
        ),
        "{metrics}"
    );

    // Term 4 on n2: the connection to n1 drops at once, both ways.
    a1.report(&r, vec![state("orders", 4, Some("n2"), [false, true])])
        .await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        reached.stream.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert_eq!(
        read.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionAborted
    );
    let at_agent = tokio::time::timeout(Duration::from_secs(5), agent_end.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(at_agent.is_err(), "the agent sees a reset, not a clean end");
    drop(reached);
    let b = get(&r, "/v0/backends").await.json();
    assert_eq!(b[0]["currentSessionCount"], 0);
    let metrics = get(&r, "/metrics").await.body;
    for line in [
        "postern_severed_total{service=\"orders\"} 1",
        "postern_failovers_total{service=\"orders\"} 1",
        "postern_active_term{service=\"orders\"} 4",
        "postern_decision_conflicts_total{service=\"orders\"} 0",
        "postern_node_up{service=\"orders\",node=\"n2\"} 1",
        "postern_agent_sessions{transport=\"websocket\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

/// Checks the OpenMetrics text line by line: `# HELP`/`# TYPE` comments, samples with a
/// number, and `# EOF` last. Returns the samples.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"));
    let mut helped = std::collections::BTreeSet::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty(), "{name} has help");
            helped.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# TYPE ") || line.starts_with("# UNIT ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        assert!(
            helped.iter().any(|h| name.starts_with(h.as_str())),
            "{name} has HELP"
        );
        samples.insert(
            series.to_owned(),
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}")),
        );
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_move_with_refusals_and_conflicts() {
    let r = relay(true, &["orders"]).await;
    let reply = get(&r, "/metrics").await;
    assert!(
        reply.head.contains("application/openmetrics-text"),
        "{}",
        reply.head
    );
    let before = parse_metrics(&reply.body);
    for name in [
        "postern_agent_sessions{transport=\"quic\"}",
        "postern_active_term{service=\"orders\"}",
        "postern_failovers_total{service=\"orders\"}",
        "postern_connections_current{service=\"orders\"}",
    ] {
        assert_eq!(before.get(name), Some(&0.0), "{name}");
    }
    // A refused client (no agent yet) and a conflict between two agents.
    let svc = r.shared.config().services.get("orders").unwrap().clone();
    let refused = crate::forward::open(&r.shared, &svc, None, None, StreamMode::Plain).await;
    let refusal = refused.err().expect("no agent");
    r.shared.events.refused(
        postern_common::events::Origin::TlsListener,
        None,
        Some("orders"),
        None,
        &refusal,
    );
    let mut a1 = connect_agent(&r, "db1", &["orders"]).await;
    let mut a2 = connect_agent(&r, "db2", &["orders"]).await;
    a1.report(&r, vec![state("orders", 5, Some("n2"), [true, true])])
        .await;
    a2.report(&r, vec![state("orders", 5, Some("n1"), [true, true])])
        .await;
    let after = parse_metrics(&get(&r, "/metrics").await.body);
    assert_eq!(
        after.get("postern_refusals_total{origin=\"tls_listener\",reason=\"no_agent\"}"),
        Some(&1.0)
    );
    assert_eq!(
        after.get("postern_decision_conflicts_total{service=\"orders\"}"),
        Some(&1.0)
    );
    assert_eq!(
        after.get("postern_active_term{service=\"orders\"}"),
        Some(&5.0)
    );
    assert_eq!(
        after.get("postern_node_checks_total{service=\"orders\",node=\"n1\"}"),
        Some(&10.0)
    );
    assert_eq!(
        after.get("postern_node_check_duration_seconds{service=\"orders\",node=\"n1\"}"),
        Some(&0.003)
    );
    // The conflict resolves to the lowest name.
    assert_eq!(r.shared.cluster.route("orders"), (5, Some("n1".into())));
}

#[tokio::test]
async fn the_health_port_answers_200_with_nothing_on_any_path() {
    let r = relay(false, &["orders"]).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(super::serve_health(r.shared.clone(), listener));
    for path in ["/", "/anything/at/all"] {
        let reply = request(addr, "GET", path, None, "").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, ""), "{path}");
    }
}

#[tokio::test]
async fn certificate_expiry_is_in_the_metrics() {
    let r = relay(true, &["orders"]).await;
    let samples = parse_metrics(&get(&r, "/metrics").await.body);
    let certs = postern_common::tls::expiry::of_material(&r.shared.config().tls, "relay");
    assert!(certs.iter().any(|c| c.role == "relay") && certs.iter().any(|c| c.role == "ca"));
    for c in &certs {
        let series = format!(
            "postern_certificate_expiry_timestamp_seconds{{role=\"{}\",name=\"{}\"}}",
            c.role, c.name
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as f64;
        let at = samples.get(&series).copied();
        assert_eq!(at, Some(c.unix() as f64), "{series} in {samples:?}");
        assert!(at.unwrap() > now, "{series}");
    }
    assert!(samples.contains_key("postern_client_certificates_expiring"));
}

#[tokio::test]
async fn what_the_process_holds_is_in_the_metrics() {
    let r = relay(true, &["orders"]).await;
    let samples = parse_metrics(&get(&r, "/metrics").await.body);
    let tasks = samples["postern_runtime_tasks"];
    let fds = samples["process_open_fds"];
    let rss = samples["process_resident_memory_bytes"];
    // The relay's accept loops and the request being served are tasks; its listeners are fds.
    assert!(tasks >= 2.0, "{samples:?}");
    assert!(fds >= 3.0, "{samples:?}");
    assert!(rss > 1_000_000.0, "{samples:?}");
    // A task spawned now is counted; once it ends, it is not.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let held = tokio::spawn(async move {
        let _ = rx.await;
    });
    let more = parse_metrics(&get(&r, "/metrics").await.body)["postern_runtime_tasks"];
    assert!(more > tasks, "{more} > {tasks}");
    drop(tx);
    held.await.unwrap();
    // The connections of earlier scrapes may take a moment to close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let after = parse_metrics(&get(&r, "/metrics").await.body)["postern_runtime_tasks"];
        if after <= tasks {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{after} tasks, {tasks} before"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
