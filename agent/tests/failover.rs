//! Failover inside one agent, with real sockets: health checks against endpoints the test
//! controls, the decision that follows them, streams that wait for a healthy node, severing,
//! operator commands, and decisions that survive a restart.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_agent::backends::Backends;
use postern_agent::config::{CheckKind, Decisions, HealthCheck, HttpTarget, Node, Service};
use postern_common::protocol::{Code, Command, ServiceState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(200);

/// What a test health endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 200 `{"healthy": true, "wsrep_local_index": N}`.
    Healthy(u32),
    /// 200 `{"healthy": false}`.
    NotHealthy,
    /// 503.
    Unavailable,
    /// Reads the request and never answers.
    Hang,
}

/// A galera-agent-like health endpoint whose answer the test sets.
struct Endpoint {
    mode: Arc<Mutex<Mode>>,
    port: u16,
}

impl Endpoint {
    async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(mode));
        let m = mode.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let m = m.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 512];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mode = *m.lock().unwrap();
                    let (status, body) = match mode {
                        Mode::Healthy(i) => (
                            "200 OK",
                            format!(r#"{{"wsrep_local_state":4,"wsrep_local_state_comment":"Synced","wsrep_local_index":{i},"healthy":true}}"#),
                        ),
                        Mode::NotHealthy => (
                            "200 OK",
                            r#"{"wsrep_local_state":1,"wsrep_local_state_comment":"Joining","healthy":false}"#.to_owned(),
                        ),
                        Mode::Unavailable => ("503 Service Unavailable", "node is not synced".to_owned()),
                        Mode::Hang => {
                            std::future::pending::<()>().await;
                            return;
                        }
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self { mode, port }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// A database node stand-in: accepts connections and keeps them open.
async fn database() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn service(nodes: Vec<Node>, kind: CheckKind, wait_for_node: Duration) -> Service {
    Service {
        name: "orders".into(),
        backend: nodes[0].address.clone(),
        nodes,
        check: Some(HealthCheck {
            kind,
            interval: INTERVAL,
            timeout: TIMEOUT,
            rise: 2,
            fall: 2,
        }),
        wait_for_node,
        decisions: Decisions::Local,
        connect_timeout: Duration::from_secs(1),
        tls: None,
        users: None,
    }
}

fn http_node(name: &str, addr: &str, health: &Endpoint) -> Node {
    Node {
        name: name.into(),
        address: addr.into(),
        http: Some(HttpTarget {
            host: "127.0.0.1".into(),
            port: health.port,
            path: "/api/v1/status".into(),
        }),
    }
}

fn tcp_node(name: &str, addr: &str) -> Node {
    Node {
        name: name.into(),
        address: addr.into(),
        http: None,
    }
}

fn state(b: &Backends) -> ServiceState {
    b.states(&["orders".into()]).remove(0)
}

/// Waits (on the backends' change signal, not by sleeping) until `cond` holds, for at most
/// `within`; returns how long it took.
async fn until(b: &Backends, within: Duration, cond: impl Fn(&ServiceState) -> bool) -> Duration {
    let start = Instant::now();
    let mut changed = b.subscribe();
    loop {
        let s = state(b);
        if cond(&s) {
            return start.elapsed();
        }
        let left = within.saturating_sub(start.elapsed());
        if tokio::time::timeout(left, changed.changed()).await.is_err() {
            panic!("condition not reached within {within:?}: {s:#?}");
        }
    }
}

fn active(s: &ServiceState) -> Option<&str> {
    s.active.as_deref()
}

fn started(svc: &Service, dir: &Path) -> (Backends, CancellationToken) {
    let b = Backends::of([svc]);
    let cancel = CancellationToken::new();
    b.start_with([svc], dir, "db1", &cancel);
    (b, cancel)
}

#[tokio::test]
async fn http_checks_move_traffic_and_failback_waits_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (
        Endpoint::start(Mode::Healthy(0)).await,
        Endpoint::start(Mode::Healthy(1)).await,
    );
    let ((_db1, a1), (_db2, a2)) = (database().await, database().await);
    let svc = service(
        vec![http_node("n1", &a1, &h1), http_node("n2", &a2, &h2)],
        CheckKind::Http,
        Duration::from_secs(2),
    );
    let (b, _cancel) = started(&svc, dir.path());

    // The lowest wsrep_local_index wins.
    until(&b, Duration::from_secs(3), |s| active(s) == Some("n1")).await;
    let s = state(&b);
    assert_eq!(s.nodes[0].wsrep_local_index, Some(0));
    assert_eq!(s.nodes[0].check, "http");
    let first_term = s.term;
    let (held, _tcp) = b.connect("orders", None).await.unwrap();
    assert_eq!(held.node(), "n1");
    assert_eq!(state(&b).nodes[0].connections, 1);

    // An explicit 503 moves traffic at once, and the open connection is cut.
    h1.set(Mode::Unavailable);
    let took = until(&b, Duration::from_secs(2), |s| active(s) == Some("n2")).await;
    assert!(took < Duration::from_secs(1), "503 took {took:?}");
    assert!(held.severed.is_cancelled());
    let s = state(&b);
    assert!(s.term > first_term);
    assert!(
        s.reason
            .starts_with("n1 unhealthy: 503 node is not synced; n2 chosen"),
        "{}",
        s.reason
    );
    drop(held);
    assert_eq!(state(&b).nodes[0].connections, 0);

    // n1 recovers (rise 2): traffic stays on n2.
    h1.set(Mode::Healthy(0));
    until(&b, Duration::from_secs(2), |s| s.nodes[0].healthy).await;
    let term = state(&b).term;
    // Not a wait for readiness: four check rounds in which nothing may change.
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!((active(&state(&b)), state(&b).term), (Some("n2"), term));
    let (on_n2, _tcp) = b.connect("orders", None).await.unwrap();
    assert_eq!(on_n2.node(), "n2");

    // n2 hangs: timeouts count to fall, checked back to back, so it is down within
    // interval + fall * timeout (plus scheduling slack).
    h2.set(Mode::Hang);
    let took = until(&b, Duration::from_secs(3), |s| active(s) == Some("n1")).await;
    assert!(
        took < INTERVAL + TIMEOUT * 2 + Duration::from_millis(400),
        "hang took {took:?}"
    );
    assert!(on_n2.severed.is_cancelled());
    let n2 = &state(&b).nodes[1];
    assert!(
        n2.last_transition.contains("timed out after 200ms"),
        "{n2:?}"
    );

    // healthy:false is as explicit as a 503.
    h2.set(Mode::Healthy(1));
    until(&b, Duration::from_secs(2), |s| s.nodes[1].healthy).await;
    h2.set(Mode::NotHealthy);
    until(&b, Duration::from_secs(2), |s| !s.nodes[1].healthy).await;
    assert_eq!(
        state(&b).nodes[1].last_check.as_ref().unwrap().detail,
        "200 healthy:false (Joining)"
    );
}

#[tokio::test]
async fn with_no_healthy_node_clients_wait_then_hear_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (
        Endpoint::start(Mode::Unavailable).await,
        Endpoint::start(Mode::Hang).await,
    );
    let ((_db1, a1), (_db2, a2)) = (database().await, database().await);
    let svc = service(
        vec![http_node("n1", &a1, &h1), http_node("n2", &a2, &h2)],
        CheckKind::Http,
        Duration::from_millis(600),
    );
    let (b, _cancel) = started(&svc, dir.path());
    until(&b, Duration::from_secs(3), |s| {
        s.nodes.iter().all(|n| n.last_check.is_some())
    })
    .await;

    let start = Instant::now();
    let r = b.connect("orders", None).await.unwrap_err();
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(550), "{waited:?}");
    assert_eq!(r.code, Code::BackendUnavailable);
    assert!(
        r.message
            .contains("no healthy node: n1 503 node is not synced, n2 timed out after 200ms"),
        "{}",
        r.message
    );

    // A node that recovers inside the window serves the waiting client.
    let waiting = {
        let b = Arc::new(b);
        let b2 = b.clone();
        (
            b,
            tokio::spawn(async move {
                b2.connect("orders", None)
                    .await
                    .map(|(be, _)| be.node().to_owned())
            }),
        )
    };
    h1.set(Mode::Healthy(0));
    let node = waiting.1.await.unwrap().unwrap();
    assert_eq!(node, "n1");
}

#[tokio::test]
async fn tcp_checks_operator_commands_and_terms_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ((db1, a1), (_db2, a2)) = (database().await, database().await);
    let svc = service(
        vec![tcp_node("n1", &a1), tcp_node("n2", &a2)],
        CheckKind::Tcp,
        Duration::from_millis(300),
    );
    let (b, cancel) = started(&svc, dir.path());
    until(&b, Duration::from_secs(3), |s| active(s) == Some("n1")).await;
    assert_eq!(state(&b).nodes[0].check, "tcp");

    // Drain: n2 takes new connections, n1's open ones go on.
    let (on_n1, _t) = b.connect("orders", None).await.unwrap();
    b.command(Command::Drain {
        service: "orders".into(),
        node: "n1".into(),
        drain: true,
    });
    until(&b, Duration::from_secs(2), |s| active(s) == Some("n2")).await;
    assert!(
        !on_n1.severed.is_cancelled(),
        "a drained node keeps its connections"
    );
    assert!(state(&b).nodes[0].draining);

    // Activate n1 again (undrain first): n2's connections end.
    let (on_n2, _t2) = b.connect("orders", None).await.unwrap();
    b.command(Command::Drain {
        service: "orders".into(),
        node: "n1".into(),
        drain: false,
    });
    b.command(Command::Activate {
        service: "orders".into(),
        node: "n1".into(),
    });
    until(&b, Duration::from_secs(2), |s| active(s) == Some("n1")).await;
    assert!(on_n2.severed.is_cancelled());
    assert_eq!(state(&b).reason, "operator activated n1");

    // Traffic off: refused with the operator's message, every connection cut.
    b.command(Command::Traffic {
        service: "orders".into(),
        enabled: false,
        message: "maintenance until 3pm".into(),
    });
    until(&b, Duration::from_secs(2), |s| !s.traffic_enabled).await;
    assert!(on_n1.severed.is_cancelled());
    let s = state(&b);
    assert_eq!(
        (s.active.as_deref(), s.message.as_str()),
        (None, "maintenance until 3pm")
    );
    let r = b.connect("orders", None).await.unwrap_err();
    assert_eq!(r.message, "maintenance until 3pm");
    b.command(Command::Traffic {
        service: "orders".into(),
        enabled: true,
        message: String::new(),
    });
    until(&b, Duration::from_secs(2), |s| s.traffic_enabled).await;

    // n1 goes away: a failed connect re-checks it at once; tcp errors count to fall.
    drop(db1);
    until(&b, Duration::from_secs(3), |s| active(s) == Some("n2")).await;
    let before = state(&b);
    cancel.cancel();

    // A restart keeps the term and the choice, though n1 is back and first in config order.
    let db1 = TcpListener::bind(&a1).await.unwrap();
    let (b, _cancel) = started(&svc, dir.path());
    until(&b, Duration::from_secs(3), |s| {
        s.nodes.iter().all(|n| n.healthy)
    })
    .await;
    // Not a wait for readiness: four check rounds in which nothing may change.
    tokio::time::sleep(INTERVAL * 4).await;
    let after = state(&b);
    assert_eq!((after.term, active(&after)), (before.term, Some("n2")));
    drop(db1);
}

#[tokio::test]
async fn a_newer_term_from_the_relay_is_followed_and_then_adopted_or_outbid() {
    let dir = tempfile::tempdir().unwrap();
    let ((_db1, a1), (_db2, a2)) = (database().await, database().await);
    let svc = service(
        vec![tcp_node("n1", &a1), tcp_node("n2", &a2)],
        CheckKind::Tcp,
        Duration::from_secs(2),
    );
    let (b, _cancel) = started(&svc, dir.path());
    until(&b, Duration::from_secs(3), |s| active(s) == Some("n1")).await;

    // Another agent (or an earlier life of this one) made term 50 = n2: follow it at once.
    let (be, _t) = b.connect("orders", Some(("n2", 50))).await.unwrap();
    assert_eq!(be.node(), "n2");
    until(&b, Duration::from_secs(2), |s| {
        s.term == 50 && active(s) == Some("n2")
    })
    .await;
    // An older term from the relay is ignored.
    let (be, _t) = b.connect("orders", Some(("n1", 3))).await.unwrap();
    assert_eq!(be.node(), "n2");
    // A newer term naming a node this agent does not have is outbid by a term above it.
    let (be, _t) = b.connect("orders", Some(("n9", 60))).await.unwrap();
    assert_eq!(be.node(), "n2");
    let s = state(&b);
    assert_eq!((s.term, active(&s)), (61, Some("n2")));
}

#[tokio::test]
async fn one_backend_is_always_healthy_at_term_1() {
    let (_db, addr) = database().await;
    let svc = Service {
        check: None,
        ..service(
            vec![tcp_node("backend", &addr)],
            CheckKind::Tcp,
            Duration::ZERO,
        )
    };
    let b = Backends::of([&svc]);
    let s = state(&b);
    assert_eq!(
        (s.term, active(&s), s.nodes[0].check.as_str()),
        (1, Some("backend"), "none")
    );
    let (be, _t) = b.connect("orders", Some(("n7", 9))).await.unwrap();
    assert_eq!(be.addr(), addr);
    let r = b.connect("billing", None).await.unwrap_err();
    assert_eq!(r.code, Code::UnknownService);
}
