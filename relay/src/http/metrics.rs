//! `GET /metrics` (behind basic auth) in the OpenMetrics text format, which Prometheus reads,
//! made with the `prometheus-client` crate.
//!
//! Nothing here is bumped in the middle of a protocol: every value is read at scrape time from
//! where it already lives. Refusals are the events sink's counters; bytes are summed from its
//! `Closed` events by [`follow`]; connections, decisions, severing and conflicts come from
//! [`crate::cluster`]; node health from the agents' reports (their check and transition
//! counters are the agent's own totals, so a counter restarts with the agent, which Prometheus
//! reads as a reset); agent sessions from the registry. A registry is built per scrape, so a
//! service or node that goes away leaves no stale series behind.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use postern_common::events::{Event, Kind};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;

use crate::Shared;
use crate::cluster::transport_name;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bytes carried per (service, direction), summed from the events sink.
#[derive(Default)]
pub(crate) struct Traffic {
    bytes: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Traffic {
    fn add(&self, service: &str, direction: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        // Services are the configured ones (events name only those), so the map is bounded.
        *bytes.entry((service.to_owned(), direction)).or_default() += n;
    }

    fn snapshot(&self) -> BTreeMap<(String, &'static str), u64> {
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Reads the events sink for the byte counters until the relay aborts.
pub(crate) async fn follow(shared: Arc<Shared>) {
    let mut events = shared.events.subscribe();
    loop {
        let event = tokio::select! {
            _ = shared.abort.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(Event::Closed {
                tunnel, up, down, ..
            }) if shared.config().services.contains_key(&tunnel.service) => {
                shared.traffic.add(&tunnel.service, "up", up);
                shared.traffic.add(&tunnel.service, "down", down);
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "metrics fell behind the events sink");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `GET /metrics`.
pub(super) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut body = String::new();
    if encode(&mut body, &registry(&shared)).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    r
}

/// Every metric's current value.
pub(crate) fn registry(shared: &Shared) -> Registry {
    let mut reg = Registry::default();
    let counter = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let gauge = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Gauge>::default();
        reg.register(name, help, f.clone());
        f
    };
    // Counter names get `_total` from the encoder.
    let connections = counter(
        &mut reg,
        "postern_connections",
        "Client connections tunneled to a node, by service, node and the agent session's transport",
    );
    let current = gauge(
        &mut reg,
        "postern_connections_current",
        "Client connections this relay carries now, by service",
    );
    let bytes = counter(
        &mut reg,
        "postern_bytes",
        "Bytes carried by finished connections, by service and direction (up: client to backend)",
    );
    let refusals = counter(
        &mut reg,
        "postern_refusals",
        "Refused connections, sessions and streams, by where (origin) and why (reason)",
    );
    let up = gauge(
        &mut reg,
        "postern_node_up",
        "Whether the node is healthy (1) or not (0), as the agent reports it",
    );
    let checks = counter(
        &mut reg,
        "postern_node_checks",
        "Health checks the agent ran on the node since it started",
    );
    let check_failures = counter(
        &mut reg,
        "postern_node_check_failures",
        "Health checks of the node that failed, since the agent started",
    );
    let transitions = counter(
        &mut reg,
        "postern_node_transitions",
        "Times the node turned healthy or unhealthy, since the agent started",
    );
    let latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "postern_node_check_duration_seconds",
        "How long the node's last health check took",
        latency.clone(),
    );
    let failovers = counter(
        &mut reg,
        "postern_failovers",
        "Times the active node of the service changed away from a node",
    );
    let term = gauge(
        &mut reg,
        "postern_active_term",
        "The term of the decision this relay routes the service by",
    );
    let severed = counter(
        &mut reg,
        "postern_severed",
        "Connections this relay cut because their node was no longer active",
    );
    let conflicts = counter(
        &mut reg,
        "postern_decision_conflicts",
        "Terms for which agents named two different nodes (must stay 0)",
    );
    let sessions = gauge(
        &mut reg,
        "postern_agent_sessions",
        "Agent sessions connected to this relay, by transport",
    );
    let expiry = gauge(
        &mut reg,
        "postern_certificate_expiry_timestamp_seconds",
        "When each certificate the relay presents (role relay, intermediate) or trusts (role ca) expires, in seconds since the Unix epoch",
    );
    let clients_expiring = gauge(
        &mut reg,
        "postern_client_certificates_expiring",
        "Distinct client certificates verified in the last day that expire within 30 days (or have expired)",
    );
    let tasks = gauge(
        &mut reg,
        "postern_runtime_tasks",
        "Tasks alive in the relay's async runtime: flat under a steady load, back to its idle value when the load ends",
    );
    if let Some(n) = postern_common::procstat::runtime_tasks() {
        tasks
            .get_or_create(&Labels::new())
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let fds = gauge(
        &mut reg,
        "process_open_fds",
        "Open file descriptors of the relay process",
    );
    let rss = gauge(
        &mut reg,
        "process_resident_memory_bytes",
        "Resident memory of the relay process, in bytes",
    );
    if let Some(n) = postern_common::procstat::open_fds() {
        fds.get_or_create(&Labels::new())
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    if let Some(n) = postern_common::procstat::resident_bytes() {
        rss.get_or_create(&Labels::new())
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    for c in shared.certificates() {
        expiry
            .get_or_create(&labels(&[("role", c.role), ("name", &c.name)]))
            .set(c.unix());
    }
    clients_expiring.get_or_create(&Labels::new()).set(
        i64::try_from(postern_common::tls::expiry::clients_expiring(
            std::time::SystemTime::now(),
        ))
        .unwrap_or(i64::MAX),
    );

    for name in shared.config().services.keys() {
        let Some(snap) = shared.cluster.snapshot(name) else {
            continue;
        };
        let svc = [("service", name.as_str())];
        for ((node, transport), n) in &snap.opened {
            let node = node.as_deref().unwrap_or("");
            connections
                .get_or_create(&labels(&[
                    ("service", name),
                    ("node", node),
                    ("transport", transport),
                ]))
                .inc_by(*n);
        }
        current
            .get_or_create(&labels(&svc))
            .set(i64::try_from(snap.open.values().sum::<u64>()).unwrap_or(i64::MAX));
        for node in snap.node_names() {
            let Some(n) = snap.node(&node) else { continue };
            let l = labels(&[("service", name), ("node", &node)]);
            up.get_or_create(&l).set(i64::from(n.healthy));
            checks.get_or_create(&l).inc_by(n.checks);
            check_failures.get_or_create(&l).inc_by(n.check_failures);
            transitions.get_or_create(&l).inc_by(n.transitions);
            if let Some(c) = &n.last_check {
                latency.get_or_create(&l).set(c.latency_ms as f64 / 1000.0);
            }
        }
        failovers
            .get_or_create(&labels(&svc))
            .inc_by(snap.failovers);
        severed.get_or_create(&labels(&svc)).inc_by(snap.severed);
        conflicts
            .get_or_create(&labels(&svc))
            .inc_by(snap.conflicts);
        let t = snap.best.as_ref().map_or(0, |b| b.term);
        term.get_or_create(&labels(&svc))
            .set(i64::try_from(t).unwrap_or(i64::MAX));
    }
    for ((service, direction), n) in shared.traffic.snapshot() {
        bytes
            .get_or_create(&labels(&[("service", &service), ("direction", direction)]))
            .inc_by(n);
    }
    for (key, n) in shared.events.counters() {
        if key.kind != Kind::Refused {
            continue;
        }
        let reason = key.code.map_or("unknown", |c| c.as_str());
        refusals
            .get_or_create(&labels(&[
                ("origin", key.origin.as_str()),
                ("reason", reason),
            ]))
            .inc_by(n);
    }
    for transport in ["quic", "websocket"] {
        // Both transports always show, at 0 when no agent uses one.
        let _ = sessions.get_or_create(&labels(&[("transport", transport)]));
    }
    for agent in shared.registry.agents() {
        sessions
            .get_or_create(&labels(&[("transport", transport_name(agent.transport))]))
            .inc();
    }
    reg
}
