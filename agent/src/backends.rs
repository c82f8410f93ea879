//! Which node a new stream goes to, and the one place the agent connects to backends.
//!
//! Every stream the relay opens asks [`Backends::connect`] for a connection to its service.
//! A service is one backend (`backend:` in agent.yaml, always taken as healthy) or several
//! nodes with health checks ([`crate::health`]) and a decision that names the active node
//! ([`crate::decide`]). This module holds what both produce ([`ServiceNodes`]), and from it:
//! * picks the node for a new stream: the active node of the newer of the agent's own decision
//!   and the one the relay sent in the open frame, when that node is healthy here; otherwise the
//!   stream waits up to `wait_for_node` for one, and is then refused with every node's reason;
//! * counts connections per node;
//! * cancels a node's [`Backend::severed`] token when its connections must end: the active node
//!   changed (connections to every other node end, except drained nodes that are still
//!   healthy), a node turned unhealthy, or an operator disabled traffic;
//! * reports each service's state ([`Backends::states`]) for the relay.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use postern_common::net;
use postern_common::protocol::{CheckResult, Code, Command, NodeState, Refusal, ServiceState};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{Config, Node, SHORTHAND_NODE, Service};
use crate::decide::{self, Candidate, Decider, Decision, LocalStore, Record};
use crate::health::{self, Outcome, Prober, Report};

/// Queued operator commands per service; more are dropped (with a warning).
const COMMAND_QUEUE: usize = 16;

/// The backends of every service this agent offers.
///
/// A reload ([`Backends::reconfigure`]) adds and removes services and replaces those whose
/// nodes or checks changed; the others keep their health and decisions.
#[derive(Debug)]
pub struct Backends {
    services: RwLock<BTreeMap<String, Arc<ServiceNodes>>>,
    changed: Arc<watch::Sender<u64>>,
}

/// A connection's node, held for the connection's life: it counts against the node's
/// connections until dropped. Small on purpose (every idle tunneled connection holds one): the
/// node's names live in the service's [`ServiceNodes`].
#[derive(Debug)]
pub struct Backend {
    svc: Arc<ServiceNodes>,
    index: usize,
    /// Cancelled when connections to this node must end (it turned unhealthy, another node
    /// became active, traffic was disabled). A forward ends its connection when this fires.
    pub severed: CancellationToken,
}

impl Backend {
    /// The service it serves.
    pub fn service(&self) -> &str {
        &self.svc.name
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.svc.nodes[self.index].config.name
    }

    /// Where it listens (`host:port`).
    pub fn addr(&self) -> &str {
        &self.svc.nodes[self.index].config.address
    }

    /// Deadline for connecting to it.
    pub fn connect_timeout(&self) -> Duration {
        self.svc.connect_timeout
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(n) = self.svc.nodes.get(self.index) {
            n.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Backends {
    /// The backends of `config`'s services; checks and decisions start with
    /// [`start`](Self::start).
    pub fn new(config: &Config) -> Self {
        Self::of(config.services.values())
    }

    /// The backends of `services`.
    pub fn of<'a>(services: impl IntoIterator<Item = &'a Service>) -> Self {
        let changed = Arc::new(watch::Sender::new(0));
        let services = services
            .into_iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Arc::new(ServiceNodes::new(s, changed.clone())),
                )
            })
            .collect();
        Self {
            services: RwLock::new(services),
            changed,
        }
    }

    fn get(&self, service: &str) -> Option<Arc<ServiceNodes>> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
            .cloned()
    }

    /// Applies a reloaded config: services that are new get their nodes, checks and decider;
    /// services that are gone stop their checks and end their connections; services whose
    /// nodes, check or decision settings changed start over with the new ones (their open
    /// connections stay with the node they have). Returns the services that were replaced or
    /// removed.
    pub fn reconfigure(&self, new: &Config, cancel: &CancellationToken) -> Vec<String> {
        let mut fresh = Vec::new();
        let mut dropped = Vec::new();
        {
            let mut services = self
                .services
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            services.retain(|name, svc| {
                let keep = new.services.get(name).is_some_and(|s| svc.same_backends(s));
                if !keep {
                    svc.retire(!new.services.contains_key(name));
                    dropped.push(name.clone());
                }
                keep
            });
            for (name, service) in &new.services {
                if !services.contains_key(name) {
                    services.insert(
                        name.clone(),
                        Arc::new(ServiceNodes::new(service, self.changed.clone())),
                    );
                    fresh.push(service);
                }
            }
        }
        self.start_with(fresh, &new.state_dir, &new.name, cancel);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        dropped
    }

    /// Starts every service's health checks and decider, until `cancel`.
    pub fn start(&self, config: &Config, cancel: &CancellationToken) {
        self.start_with(
            config.services.values(),
            &config.state_dir,
            &config.name,
            cancel,
        );
    }

    /// [`start`](Self::start) for `services` (those this was made [`of`](Self::of)), keeping
    /// decisions in `state_dir`, as agent `agent`.
    pub fn start_with<'a>(
        &self,
        services: impl IntoIterator<Item = &'a Service>,
        state_dir: &std::path::Path,
        agent: &str,
        cancel: &CancellationToken,
    ) {
        for service in services {
            let name = &service.name;
            let Some(svc) = self.get(name) else {
                continue;
            };
            let Some(check) = &service.check else {
                continue; // one backend: always healthy, term 1
            };
            // A reload that replaces or removes the service stops these.
            let cancel = &svc.checks_token(cancel);
            for (i, node) in service.nodes.iter().enumerate() {
                let prober = Prober::new(&check.kind, node);
                let recheck = svc.nodes[i].recheck.clone();
                let s = svc.clone();
                let span = info_span!("check", service = %name, node = %node.name);
                tokio::spawn(
                    health::watch(
                        prober,
                        check.clone(),
                        recheck,
                        move |r| s.on_report(i, r),
                        cancel.clone(),
                    )
                    .instrument(span),
                );
            }
            let Some(commands) = svc
                .commands_rx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            else {
                continue; // started before
            };
            let decider = Decider {
                svc: svc.clone(),
                local: LocalStore::new(state_dir, name),
                store: decide::store_for(service.decisions, name, agent, Some(check)),
                commands,
                round: check.interval,
                first_results: check
                    .timeout
                    .saturating_mul(2)
                    .saturating_add(check.interval),
            };
            tokio::spawn(
                decider
                    .run(cancel.clone())
                    .instrument(info_span!("decide", service = %name)),
            );
        }
    }

    /// Connects a new stream of `service` to its node: the active node of the newer of this
    /// agent's decision and `relay`'s (`(node, term)` from the open frame), waiting up to the
    /// service's `wait_for_node` for one that is healthy. The refusal says why, in words the
    /// client is shown.
    pub async fn connect(
        &self,
        service: &str,
        relay: Option<(&str, u64)>,
    ) -> Result<(Backend, TcpStream), Refusal> {
        let svc = self.get(service).ok_or_else(|| {
            Refusal::new(
                Code::UnknownService,
                format!("this agent does not offer service {service:?}"),
            )
        })?;
        let backend = svc.pick(relay).await?;
        match net::connect(backend.addr(), backend.connect_timeout()).await {
            Ok(tcp) => Ok((backend, tcp)),
            Err(e) => {
                let at = if svc.checked {
                    // Maybe the node just went: check it now rather than at the next round.
                    svc.nodes[backend.index].recheck.notify_one();
                    format!("{} (node {})", backend.addr(), backend.node())
                } else {
                    backend.addr().to_owned()
                };
                Err(Refusal::new(
                    Code::BackendUnavailable,
                    format!(
                        "service {service:?} is unavailable: cannot connect to backend {at}: {e}"
                    ),
                ))
            }
        }
    }

    /// The node a new connection of `service` goes to, chosen as for [`connect`](Self::connect)
    /// but without connecting: for the agent's own database logins (per-binding users), which
    /// connect with a MySQL driver. The lease counts as a connection to the node while held.
    pub async fn lease(
        &self,
        service: &str,
        relay: Option<(&str, u64)>,
    ) -> Result<Backend, Refusal> {
        let svc = self.get(service).ok_or_else(|| {
            Refusal::new(
                Code::UnknownService,
                format!("this agent does not offer service {service:?}"),
            )
        })?;
        svc.pick(relay).await
    }

    /// The state of `services` (those this agent offers), for the relay.
    pub fn states(&self, services: &[String]) -> Vec<ServiceState> {
        services
            .iter()
            .filter_map(|s| self.get(s))
            .map(|s| s.state())
            .collect()
    }

    /// Changes whenever a decision or a node's health changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Hands an operator's command to its service's decider. Commands for services this agent
    /// does not offer are ignored.
    pub fn command(&self, command: Command) {
        let service = match &command {
            Command::Traffic { service, .. }
            | Command::Drain { service, .. }
            | Command::Activate { service, .. } => service.clone(),
        };
        let Some(svc) = self.get(&service) else {
            return;
        };
        if !svc.checked {
            // One backend: no decider; traffic and drain still apply.
            if svc.apply(&command) {
                svc.bump();
            }
            return;
        }
        if let Err(e) = svc.commands.try_send(command) {
            warn!(service = %service, error = %e, "operator command dropped: too many queued");
        }
    }
}

/// One service's nodes, their health, and its decision: what the health checks and the
/// decider write, and what new streams and the relay read.
#[derive(Debug)]
pub struct ServiceNodes {
    /// The service.
    pub(crate) name: String,
    /// Whether the nodes are checked (false: one backend, always healthy).
    checked: bool,
    check_name: &'static str,
    connect_timeout: Duration,
    wait_for_node: Duration,
    nodes: Vec<NodeSlot>,
    live: Mutex<Live>,
    changed: Arc<watch::Sender<u64>>,
    /// Wakes the decider (a node's health changed, a relay showed a newer term).
    pub(crate) wake: Notify,
    commands: mpsc::Sender<Command>,
    commands_rx: Mutex<Option<mpsc::Receiver<Command>>>,
    /// What the service was made from, to tell whether a reload changed it.
    config: Service,
    /// Ends its checks and decider (a child of the agent's token, once started).
    checks: Mutex<Option<CancellationToken>>,
}

/// A node's fixed parts.
#[derive(Debug)]
struct NodeSlot {
    config: Node,
    /// Asks its health check to run now.
    recheck: Arc<Notify>,
    connections: AtomicU64,
}

/// What changes, under one lock.
#[derive(Debug)]
struct Live {
    decision: Decision,
    traffic_enabled: bool,
    message: String,
    nodes: Vec<NodeLive>,
    /// The newest decision a relay showed in an open frame, when newer than ours.
    observed: Option<Decision>,
}

#[derive(Debug, Default)]
struct NodeLive {
    checked: bool,
    healthy: bool,
    draining: bool,
    last_check: Option<CheckResult>,
    consecutive_failures: u32,
    last_transition_ms: u64,
    last_transition: String,
    wsrep_local_index: Option<u32>,
    checks: u64,
    check_failures: u64,
    transitions: u64,
    severed: CancellationToken,
}

impl NodeLive {
    fn fit(&self) -> bool {
        self.healthy && !self.draining
    }
}

impl ServiceNodes {
    fn new(service: &Service, changed: Arc<watch::Sender<u64>>) -> Self {
        let checked = service.check.is_some();
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let nodes: Vec<NodeSlot> = service
            .nodes
            .iter()
            .map(|n| NodeSlot {
                config: n.clone(),
                recheck: Arc::new(Notify::new()),
                connections: AtomicU64::new(0),
            })
            .collect();
        let live_nodes = nodes
            .iter()
            .map(|_| NodeLive {
                // One backend is taken as healthy: there is nothing to check it with.
                checked: !checked,
                healthy: !checked,
                ..NodeLive::default()
            })
            .collect();
        let decision = if checked {
            Decision::default()
        } else {
            Decision {
                term: 1,
                node: Some(SHORTHAND_NODE.to_owned()),
                reason: "the service's one backend".into(),
                decided_at_ms: decide::now_ms(),
            }
        };
        Self {
            name: service.name.clone(),
            checked,
            check_name: service.check.as_ref().map_or("none", |c| c.kind.name()),
            connect_timeout: service.connect_timeout,
            wait_for_node: service.wait_for_node,
            nodes,
            live: Mutex::new(Live {
                decision,
                traffic_enabled: true,
                message: String::new(),
                nodes: live_nodes,
                observed: None,
            }),
            changed,
            wake: Notify::new(),
            commands,
            commands_rx: Mutex::new(Some(commands_rx)),
            config: service.clone(),
            checks: Mutex::new(None),
        }
    }

    /// The token its checks and decider run under: a child of `cancel`, made once.
    fn checks_token(&self, cancel: &CancellationToken) -> CancellationToken {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| cancel.child_token())
            .clone()
    }

    /// Whether `service` has the nodes, check and decision settings this was made from.
    fn same_backends(&self, service: &Service) -> bool {
        let (a, b) = (&self.config, service);
        a.nodes == b.nodes
            && a.check == b.check
            && a.wait_for_node == b.wait_for_node
            && a.decisions == b.decisions
            && a.connect_timeout == b.connect_timeout
    }

    /// Taken out by a reload: its checks and decider stop; with `gone` (the service is no longer
    /// offered) its open connections end too.
    fn retire(&self, gone: bool) {
        if let Some(t) = self
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            t.cancel();
        }
        if gone {
            let mut live = self.lock();
            live.traffic_enabled = false;
            live.message = format!("service {:?} is no longer offered by this agent", self.name);
            for n in &mut live.nodes {
                std::mem::take(&mut n.severed).cancel();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the relay sessions and waiting streams that something changed.
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.config.name == name)
    }

    /// The node for a new stream (see [`Backends::connect`]).
    async fn pick(self: &Arc<Self>, relay: Option<(&str, u64)>) -> Result<Backend, Refusal> {
        let deadline = Instant::now() + self.wait_for_node;
        let mut changed = self.changed.subscribe();
        // One backend: the relay's view of other agents' nodes does not apply.
        let relay = relay.filter(|_| self.checked);
        loop {
            let why = {
                let mut live = self.lock();
                if !live.traffic_enabled {
                    let message = if live.message.is_empty() {
                        "traffic is disabled by an operator".to_owned()
                    } else {
                        live.message.clone()
                    };
                    return Err(Refusal::new(Code::BackendUnavailable, message));
                }
                let own_term = live.decision.term;
                let node = match relay {
                    Some((node, term)) if term > own_term => {
                        let newer = live.observed.as_ref().is_none_or(|o| o.term < term);
                        if newer {
                            live.observed = Some(Decision {
                                term,
                                node: Some(node.to_owned()),
                                reason: "seen in an open frame".into(),
                                decided_at_ms: decide::now_ms(),
                            });
                            self.wake.notify_one();
                        }
                        Some(node.to_owned())
                    }
                    _ => live.decision.node.clone(),
                };
                if let Some(i) = node.as_deref().and_then(|n| self.index_of(n))
                    && live.nodes[i].fit()
                {
                    return Ok(self.lease(i, &live));
                }
                decide::no_fit_node(&candidates(&self.nodes, &live))
            };
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        tokio::time::sleep_until(deadline).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Refusal::new(
                        Code::BackendUnavailable,
                        format!("service {:?} is unavailable: {why}", self.name),
                    ));
                }
            }
            if Instant::now() >= deadline {
                // One last look happens at the top of the loop only while time is left.
                let live = self.lock();
                let why = decide::no_fit_node(&candidates(&self.nodes, &live));
                return Err(Refusal::new(
                    Code::BackendUnavailable,
                    format!("service {:?} is unavailable: {why}", self.name),
                ));
            }
        }
    }

    fn lease(self: &Arc<Self>, index: usize, live: &Live) -> Backend {
        let slot = &self.nodes[index];
        slot.connections.fetch_add(1, Ordering::Relaxed);
        Backend {
            svc: self.clone(),
            index,
            severed: live.nodes[index].severed.clone(),
        }
    }

    /// Takes one health check result of node `index`.
    fn on_report(&self, index: usize, report: Report) {
        let Some(slot) = self.nodes.get(index) else {
            return;
        };
        let node = &slot.config.name;
        let now = decide::now_ms();
        let mut changed = false;
        {
            let mut live = self.lock();
            let n = &mut live.nodes[index];
            let ok = report.probe.outcome == Outcome::Up;
            n.checks = n.checks.saturating_add(1);
            if !ok {
                n.check_failures = n.check_failures.saturating_add(1);
            }
            n.last_check = Some(CheckResult {
                ok,
                detail: report.probe.detail.clone(),
                latency_ms: u64::try_from(report.latency.as_millis()).unwrap_or(u64::MAX),
                at_ms: now,
            });
            n.consecutive_failures = report.consecutive_failures;
            // Like Switchboard: a failed check keeps the last known index.
            if ok && n.wsrep_local_index != report.probe.wsrep_local_index {
                n.wsrep_local_index = report.probe.wsrep_local_index;
                changed = true;
            }
            if !n.checked {
                n.checked = true;
                changed = true;
            }
            n.healthy = report.healthy;
            if let Some(healthy) = report.transition {
                n.transitions = n.transitions.saturating_add(1);
                n.last_transition_ms = now;
                let word = if healthy { "healthy" } else { "unhealthy" };
                n.last_transition = format!("{word}: {}", report.probe.detail);
                changed = true;
                info!(service = %self.name, %node, healthy, detail = %report.probe.detail, "node turned {word}");
                if !healthy {
                    // Its connections end now, whatever the decision does next.
                    std::mem::take(&mut n.severed).cancel();
                }
            }
        }
        if changed {
            self.wake.notify_one();
            self.bump();
        }
    }

    /// Whether every node has had its first check.
    pub(crate) fn all_checked(&self) -> bool {
        self.lock().nodes.iter().all(|n| n.checked)
    }

    /// The current decision, the nodes as the rule sees them, and a newer term a relay showed.
    pub(crate) fn snapshot(&self) -> (Decision, Vec<Candidate>, Option<Decision>) {
        let live = self.lock();
        (
            live.decision.clone(),
            candidates(&self.nodes, &live),
            live.observed.clone(),
        )
    }

    /// Changes whenever a decision or a node's health changes (of any service).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether node `name` is healthy now.
    pub(crate) fn node_healthy(&self, name: &str) -> bool {
        self.index_of(name)
            .is_some_and(|i| self.lock().nodes[i].healthy)
    }

    /// `(name, address)` of the healthy nodes, the active one first: where the cluster's
    /// decision table is reached.
    pub(crate) fn healthy_addresses(&self) -> Vec<(String, String)> {
        let live = self.lock();
        let mut out: Vec<(String, String)> = self
            .nodes
            .iter()
            .zip(&live.nodes)
            .filter(|(_, l)| l.healthy)
            .map(|(s, _)| (s.config.name.clone(), s.config.address.clone()))
            .collect();
        if let Some(active) = &live.decision.node {
            out.sort_by_key(|(n, _)| n != active);
        }
        out
    }

    /// What is kept across restarts.
    pub(crate) fn record(&self) -> Record {
        let live = self.lock();
        Record {
            decision: live.decision.clone(),
            traffic_enabled: live.traffic_enabled,
            message: live.message.clone(),
            draining: self
                .nodes
                .iter()
                .zip(&live.nodes)
                .filter(|(_, l)| l.draining)
                .map(|(s, _)| s.config.name.clone())
                .collect(),
        }
    }

    /// Takes back what was kept (at start, before any decision).
    pub(crate) fn restore(&self, record: &Record) {
        {
            let mut live = self.lock();
            live.decision = record.decision.clone();
            live.traffic_enabled = record.traffic_enabled;
            live.message = record.message.clone();
            for (slot, l) in self.nodes.iter().zip(live.nodes.iter_mut()) {
                l.draining = record.draining.contains(&slot.config.name);
            }
        }
        self.bump();
    }

    /// Applies a traffic or drain command; whether anything changed.
    pub(crate) fn apply(&self, command: &Command) -> bool {
        let mut live = self.lock();
        let changed = match command {
            Command::Traffic {
                enabled, message, ..
            } => {
                let changed = live.traffic_enabled != *enabled || live.message != *message;
                live.traffic_enabled = *enabled;
                live.message = if *enabled {
                    String::new()
                } else {
                    message.clone()
                };
                if !*enabled {
                    for n in &mut live.nodes {
                        std::mem::take(&mut n.severed).cancel();
                    }
                }
                info!(service = %self.name, enabled, %message, "operator set traffic");
                changed
            }
            Command::Drain { node, drain, .. } => match self.index_of(node) {
                Some(i) => {
                    let changed = live.nodes[i].draining != *drain;
                    live.nodes[i].draining = *drain;
                    info!(service = %self.name, %node, drain, "operator drained a node");
                    changed
                }
                None => {
                    warn!(service = %self.name, %node, "drain of a node this service does not have");
                    false
                }
            },
            Command::Activate { .. } => false,
        };
        drop(live);
        if changed {
            self.bump();
        }
        changed
    }

    /// Makes `new` the decision (already kept where the service keeps decisions), logs it,
    /// and ends the connections that must end.
    pub(crate) fn announce(&self, new: Decision, old: &Decision) {
        info!(service = %self.name, term = new.term, from = ?old.node, to = ?new.node, reason = %new.reason, "decision");
        {
            let mut live = self.lock();
            if live.observed.as_ref().is_some_and(|o| o.term <= new.term) {
                live.observed = None;
            }
            if new.node != old.node {
                let active = new.node.clone();
                for (slot, n) in self.nodes.iter().zip(live.nodes.iter_mut()) {
                    let keep = active.as_deref() == Some(slot.config.name.as_str())
                        || (n.draining && n.healthy);
                    if !keep {
                        std::mem::take(&mut n.severed).cancel();
                    }
                }
            }
            live.decision = new;
        }
        self.bump();
    }

    /// The service's state for the relay.
    fn state(&self) -> ServiceState {
        let live = self.lock();
        let nodes = self
            .nodes
            .iter()
            .zip(&live.nodes)
            .map(|(slot, n)| NodeState {
                name: slot.config.name.clone(),
                address: slot.config.address.clone(),
                healthy: n.healthy,
                draining: n.draining,
                check: self.check_name.to_owned(),
                last_check: n.last_check.clone(),
                consecutive_failures: n.consecutive_failures,
                last_transition_ms: n.last_transition_ms,
                last_transition: n.last_transition.clone(),
                connections: slot.connections.load(Ordering::Relaxed),
                wsrep_local_index: n.wsrep_local_index,
                checks: n.checks,
                check_failures: n.check_failures,
                transitions: n.transitions,
            })
            .collect();
        ServiceState {
            service: self.name.clone(),
            term: live.decision.term,
            active: live.decision.node.clone().filter(|_| live.traffic_enabled),
            reason: live.decision.reason.clone(),
            decided_at_ms: live.decision.decided_at_ms,
            traffic_enabled: live.traffic_enabled,
            message: live.message.clone(),
            nodes,
        }
    }
}

fn candidates(slots: &[NodeSlot], live: &Live) -> Vec<Candidate> {
    slots
        .iter()
        .zip(&live.nodes)
        .map(|(s, n)| Candidate {
            name: s.config.name.clone(),
            healthy: n.healthy,
            draining: n.draining,
            wsrep_local_index: n.wsrep_local_index,
            detail: n
                .last_check
                .as_ref()
                .map(|c| c.detail.clone())
                .unwrap_or_default(),
        })
        .collect()
}
