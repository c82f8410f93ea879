//! What the relay knows about each service's nodes and decisions, and the connections it carries
//! to them: the one place routing, severing, the API, the dashboard and the metrics read.
//!
//! Agents with [`FEATURE_BACKENDS`](postern_common::protocol::FEATURE_BACKENDS) send their view
//! of each service ([`ServiceState`]) every few seconds and on every change; each message
//! replaces that agent's previous one. From all the views the relay keeps the **best decision**:
//! the highest term any agent has named, kept after that agent leaves (a relay must not forget a
//! newer decision because the agent that made it went away). New connections are opened towards
//! its active node (`Open.node`, `Open.term`).
//!
//! A term names at most one node, whichever agent made it. Two different nodes at one term is
//! a **conflict**: it is logged at `error`, counted, and resolved deterministically (the lowest
//! node name among the agents reporting that term), so every relay routes the same way.
//!
//! Every carried connection registers here with its service and node ([`Cluster::register`]),
//! and holds the node's cancel token. When the best decision moves to another node, or to no
//! node, or traffic is disabled, the tokens of the other nodes fire at once and their
//! connections drop (what Switchboard does: the client sees the connection close, and its next
//! connection goes to the new node). One token per node, not per connection, keeps an idle
//! connection cheap; a fired token is replaced by a fresh one for later connections.
//!
//! Changes of (term, active node) go to a bounded log ([`EVENTS_KEPT`]) for
//! `/v0/cluster/events`, and every change bumps a [`watch`] channel for listeners.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use postern_common::protocol::ServiceState;
use postern_common::transport::TransportKind;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::registry::Generation;

/// How many decision changes each service keeps for `/v0/cluster/events`.
pub(crate) const EVENTS_KEPT: usize = 100;

/// How many distinct node names one term may collect before more are ignored (a term names
/// one node; more than one is already a conflict, so a few are enough to show it).
const NAMES_PER_TERM: usize = 8;

/// How many (node, transport) connection counters a service keeps.
const MAX_SERIES: usize = 256;

/// How long an operator's traffic switch made through this relay's API holds before the agents
/// confirm it; past that the agents' view counts again (an agent that never applied it must not
/// leave this relay disagreeing with every other).
const PENDING_TRAFFIC: Duration = Duration::from_secs(10);

/// The services' states and the connections carried to their nodes. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    services: Mutex<BTreeMap<String, View>>,
    changed: watch::Sender<u64>,
}

/// The decision the relay routes by for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Decision {
    /// The decision's term.
    pub(crate) term: u64,
    /// The node new connections go to.
    pub(crate) active: Option<String>,
    /// Why, in the agent's words.
    pub(crate) reason: String,
    /// The agent that reported it.
    pub(crate) agent: String,
    /// When the agent made it (ms since the epoch; 0 when unknown).
    pub(crate) decided_at_ms: u64,
    /// Whether new connections are taken.
    pub(crate) traffic_enabled: bool,
    /// The operator's message when traffic is disabled.
    pub(crate) message: String,
    /// When this relay last saw the active node or the traffic switch change (ms since the
    /// epoch).
    pub(crate) updated_at_ms: u64,
}

/// One change of a service's (term, active node), for `/v0/cluster/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct DecisionEvent {
    /// When the relay saw it (RFC 3339).
    pub(crate) at: String,
    /// The new term.
    pub(crate) term: u64,
    /// The previous active node.
    pub(crate) from: Option<String>,
    /// The new active node.
    pub(crate) to: Option<String>,
    /// Why, in the agent's words.
    pub(crate) reason: String,
    /// The agent that reported it.
    pub(crate) agent: String,
}

/// A connection's registration: keeps the node's connection count while it lives, and holds
/// the token that fires when the connection must be severed.
pub(crate) struct Registration {
    cluster: Cluster,
    /// Shared by every connection to the node (an idle connection holds one, so it is small).
    key: Arc<NodeKey>,
    /// Fires when the connection must be cut.
    pub(crate) cut: CancellationToken,
}

/// Which node's count a [`Registration`] is in.
struct NodeKey {
    service: String,
    node: Option<String>,
}

/// What the dashboard, the API and the metrics see of one service.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceSnapshot {
    /// The best decision, once any agent reported one.
    pub(crate) best: Option<Decision>,
    /// Each connected agent's latest report, by agent name.
    pub(crate) reports: BTreeMap<String, ServiceState>,
    /// This relay's open connections by node (`None`: the node is not known).
    pub(crate) open: BTreeMap<Option<String>, u64>,
    /// Connections opened since start, by (node, agent transport).
    pub(crate) opened: BTreeMap<(Option<String>, &'static str), u64>,
    /// Changes of the active node away from a node.
    pub(crate) failovers: u64,
    /// Connections severed.
    pub(crate) severed: u64,
    /// Terms that named two different nodes.
    pub(crate) conflicts: u64,
    /// Recent decision changes, oldest first.
    pub(crate) events: Vec<DecisionEvent>,
}

impl ServiceSnapshot {
    /// The state of node `name` in the report of the agent the best decision came from, else in
    /// any report (the first agent by name).
    pub(crate) fn node(&self, name: &str) -> Option<&postern_common::protocol::NodeState> {
        let preferred = self
            .best
            .as_ref()
            .and_then(|b| self.reports.get(&b.agent))
            .into_iter();
        preferred
            .chain(self.reports.values())
            .find_map(|r| r.nodes.iter().find(|n| n.name == name))
    }

    /// Every node any agent reports, in the order of the first report that names it.
    pub(crate) fn node_names(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let preferred = self
            .best
            .as_ref()
            .and_then(|b| self.reports.get(&b.agent))
            .into_iter();
        preferred
            .chain(self.reports.values())
            .flat_map(|r| r.nodes.iter())
            .filter(|n| seen.insert(n.name.clone()))
            .map(|n| n.name.clone())
            .collect()
    }

    /// Whether the best decision names a node that some connected agent reports healthy.
    pub(crate) fn active_healthy(&self) -> bool {
        let Some(active) = self.best.as_ref().and_then(|b| b.active.as_deref()) else {
            return false;
        };
        self.best.as_ref().is_some_and(|b| b.traffic_enabled)
            && self
                .reports
                .values()
                .any(|r| r.nodes.iter().any(|n| n.name == active && n.healthy))
    }
}

#[derive(Default)]
struct View {
    reports: BTreeMap<String, Report>,
    best: Option<Decision>,
    /// The nodes named at `names_term` (more than one is a conflict).
    names: BTreeSet<String>,
    names_term: u64,
    /// The last term a conflict was counted for (one count per term, not per report).
    conflict_term: Option<u64>,
    conflicts: u64,
    failovers: u64,
    severed: u64,
    events: VecDeque<DecisionEvent>,
    nodes: HashMap<Option<String>, Carried>,
    opened: BTreeMap<(Option<String>, &'static str), u64>,
    /// An operator's traffic switch through this relay, until the agents confirm it.
    pending: Option<(bool, String, SystemTime)>,
}

struct Report {
    generation: Generation,
    state: ServiceState,
}

/// The connections this relay carries to one node.
struct Carried {
    /// Open and holding `cut`.
    open: u64,
    /// Severed, and not yet ended (their registrations hold fired tokens).
    severed_open: u64,
    cut: CancellationToken,
    key: Arc<NodeKey>,
}

impl Carried {
    fn new(service: &str, node: Option<String>) -> Self {
        Self {
            open: 0,
            severed_open: 0,
            cut: CancellationToken::new(),
            key: Arc::new(NodeKey {
                service: service.to_owned(),
                node,
            }),
        }
    }
}

impl Cluster {
    /// The state of `services` (the configured ones; reports of others are ignored).
    pub(crate) fn new<'a>(services: impl IntoIterator<Item = &'a String>) -> Self {
        let services = services
            .into_iter()
            .map(|s| (s.clone(), View::default()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                services: Mutex::new(services),
                changed: watch::channel(0).0,
            }),
        }
    }

    /// Makes the services those of a reloaded config: new ones start with no reports; gone
    /// ones are forgotten, and every connection carried to them is cut now (their clients see
    /// the connection close). Returns how many were cut.
    pub(crate) fn retain_services(&self, services: &BTreeSet<&String>) -> u64 {
        let mut views = self.lock();
        let mut cut = 0;
        views.retain(|name, view| {
            if services.contains(name) {
                return true;
            }
            for carried in view.nodes.values() {
                carried.cut.cancel();
                cut += carried.open;
            }
            false
        });
        for name in services {
            views.entry((*name).clone()).or_default();
        }
        drop(views);
        self.inner.changed.send_modify(|v| *v += 1);
        cut
    }

    /// A receiver that sees a new value whenever any service's state changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Takes agent `agent`'s report (registration `generation`) for the services it was
    /// `accepted` for: each replaces the agent's previous report of that service; services the
    /// message leaves out are forgotten for this agent; services it was not accepted for are
    /// ignored.
    pub(crate) fn report(
        &self,
        agent: &str,
        generation: Generation,
        accepted: &[String],
        states: Vec<ServiceState>,
    ) {
        let mut states: BTreeMap<String, ServiceState> = states
            .into_iter()
            .filter(|s| accepted.contains(&s.service))
            .map(|s| (s.service.clone(), s))
            .collect();
        let mut services = self.lock();
        for name in accepted {
            let Some(view) = services.get_mut(name) else {
                continue;
            };
            match states.remove(name) {
                Some(state) => {
                    view.reports
                        .insert(agent.to_owned(), Report { generation, state });
                }
                None => {
                    view.reports.remove(agent);
                }
            }
            view.settle(name);
        }
        drop(services);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    /// Forgets agent `agent`'s reports, if they are still those of registration `generation`
    /// (its session ended). The best decision stays.
    pub(crate) fn forget(&self, agent: &str, generation: Generation) {
        let mut services = self.lock();
        for (name, view) in services.iter_mut() {
            if view
                .reports
                .get(agent)
                .is_some_and(|r| r.generation == generation)
            {
                view.reports.remove(agent);
                view.settle(name);
            }
        }
        drop(services);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    /// An operator switched traffic through this relay's API: applied here at once (so
    /// disabling severs now), until the agents confirm it.
    pub(crate) fn set_traffic(&self, service: &str, enabled: bool, message: &str) {
        let mut services = self.lock();
        if let Some(view) = services.get_mut(service) {
            view.pending = Some((enabled, message.to_owned(), SystemTime::now()));
            view.settle(service);
        }
        drop(services);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    /// The (term, active node) new connections to `service` ask for: the best decision's, or
    /// `(0, None)` before any agent reported one.
    pub(crate) fn route(&self, service: &str) -> (u64, Option<String>) {
        self.lock()
            .get(service)
            .and_then(|v| v.best.as_ref())
            .map(|b| (b.term, b.active.clone()))
            .unwrap_or((0, None))
    }

    /// The operator's message when traffic to `service` is disabled, `None` while it flows.
    pub(crate) fn traffic_disabled(&self, service: &str) -> Option<String> {
        self.lock()
            .get(service)
            .and_then(|v| v.best.as_ref())
            .filter(|b| !b.traffic_enabled)
            .map(|b| b.message.clone())
    }

    /// Whether agent `agent` reports `node` of `service` healthy and not draining.
    pub(crate) fn healthy_at(&self, service: &str, agent: &str, node: &str) -> bool {
        self.lock()
            .get(service)
            .and_then(|v| v.reports.get(agent))
            .is_some_and(|r| {
                r.state
                    .nodes
                    .iter()
                    .any(|n| n.name == node && n.healthy && !n.draining)
            })
    }

    /// The name of the node of `service` at `address` as agent `agent` reports it.
    pub(crate) fn node_at(&self, service: &str, agent: &str, address: &str) -> Option<String> {
        let services = self.lock();
        let report = services.get(service)?.reports.get(agent)?;
        report
            .state
            .nodes
            .iter()
            .find(|n| n.address == address)
            .map(|n| n.name.clone())
    }

    /// Registers a connection to `node` of `service` (carried over an agent session of
    /// `transport`), opened when the relay asked for `asked` (term, node). If the decision
    /// moved away from `node` while the connection was being opened, or traffic is now
    /// disabled, the registration is born severed.
    pub(crate) fn register(
        &self,
        service: &str,
        node: Option<String>,
        asked: (u64, Option<String>),
        transport: TransportKind,
    ) -> Registration {
        let mut services = self.lock();
        let (key, cut) = match services.get_mut(service) {
            Some(view) => {
                let key = (node.clone(), transport_name(transport));
                // Node names come from agents; a bound keeps a confused one from growing this.
                if view.opened.len() < MAX_SERIES || view.opened.contains_key(&key) {
                    *view.opened.entry(key).or_default() += 1;
                }
                let late = view.best.as_ref().is_some_and(|b| {
                    !b.traffic_enabled
                        || ((b.term, b.active.as_ref()) != (asked.0, asked.1.as_ref())
                            && b.active != node)
                });
                let carried = view
                    .nodes
                    .entry(node.clone())
                    .or_insert_with(|| Carried::new(service, node));
                let key = carried.key.clone();
                let cut = if late {
                    carried.severed_open += 1;
                    view.severed += 1;
                    let cut = CancellationToken::new();
                    cut.cancel();
                    cut
                } else {
                    carried.open += 1;
                    carried.cut.clone()
                };
                (key, cut)
            }
            // The service was removed (a reload) while this connection was being opened: it is
            // born cut.
            None => {
                let cut = CancellationToken::new();
                cut.cancel();
                (
                    Arc::new(NodeKey {
                        service: service.to_owned(),
                        node,
                    }),
                    cut,
                )
            }
        };
        Registration {
            cluster: self.clone(),
            key,
            cut,
        }
    }

    /// What the API shows of `service`.
    pub(crate) fn snapshot(&self, service: &str) -> Option<ServiceSnapshot> {
        let services = self.lock();
        let view = services.get(service)?;
        Some(ServiceSnapshot {
            best: view.best.clone(),
            reports: view
                .reports
                .iter()
                .map(|(a, r)| (a.clone(), r.state.clone()))
                .collect(),
            open: view
                .nodes
                .iter()
                .filter(|(_, c)| c.open + c.severed_open > 0)
                .map(|(n, c)| (n.clone(), c.open + c.severed_open))
                .collect(),
            opened: view.opened.clone(),
            failovers: view.failovers,
            severed: view.severed,
            conflicts: view.conflicts,
            events: view.events.iter().cloned().collect(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, View>> {
        // Every update leaves the maps consistent between statements, so a poisoned lock is
        // safe to keep using.
        self.inner
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut services = self.cluster.lock();
        if let Some(carried) = services
            .get_mut(&self.key.service)
            .and_then(|v| v.nodes.get_mut(&self.key.node))
        {
            // Severing moves a node's open connections to `severed_open` under this lock, and
            // fires their token: the token says which count this one is in.
            if self.cut.is_cancelled() {
                carried.severed_open = carried.severed_open.saturating_sub(1);
            } else {
                carried.open = carried.open.saturating_sub(1);
            }
        }
    }
}

impl View {
    /// Recomputes the best decision from the reports, records a change, and severs the
    /// connections the new decision no longer allows.
    fn settle(&mut self, service: &str) {
        let now = SystemTime::now();
        let top = self.reports.values().map(|r| r.state.term).max();
        let stored = self.best.as_ref().map(|b| b.term);
        let Some(term) = top.max(stored) else {
            return;
        };
        // Agents at the top term, by name (so the choice is the same on every relay).
        let at_top: Vec<(&String, &ServiceState)> = self
            .reports
            .iter()
            .filter(|(_, r)| r.state.term == term)
            .map(|(a, r)| (a, &r.state))
            .collect();
        let old = self.best.clone();
        let mut new = match at_top.first() {
            // No connected agent knows the best term: keep it.
            None => match old.clone() {
                Some(b) => b,
                None => return,
            },
            Some(_) => {
                if self.names_term != term {
                    self.names.clear();
                    self.names_term = term;
                    if let Some(n) = old
                        .as_ref()
                        .filter(|b| b.term == term)
                        .and_then(|b| b.active.clone())
                    {
                        self.names.insert(n);
                    }
                }
                for (_, s) in &at_top {
                    if let Some(n) = &s.active
                        && self.names.len() < NAMES_PER_TERM
                    {
                        self.names.insert(n.clone());
                    }
                }
                if self.names.len() > 1 && self.conflict_term != Some(term) {
                    self.conflict_term = Some(term);
                    self.conflicts += 1;
                    let named: Vec<String> = at_top
                        .iter()
                        .map(|(a, s)| format!("{a}: {}", s.active.as_deref().unwrap_or("no node")))
                        .collect();
                    error!(service, term, nodes = ?self.names, agents = ?named, "decision conflict: one term names two different nodes; routing to the lowest node name");
                }
                let active = at_top.iter().filter_map(|(_, s)| s.active.clone()).min();
                let (agent, from) = at_top
                    .iter()
                    .find(|(_, s)| s.active == active)
                    .copied()
                    .unwrap_or(at_top[0]);
                let disabled = at_top.iter().find(|(_, s)| !s.traffic_enabled);
                Decision {
                    term,
                    active,
                    reason: from.reason.clone(),
                    agent: agent.clone(),
                    decided_at_ms: from.decided_at_ms,
                    traffic_enabled: disabled.is_none(),
                    message: disabled.map(|(_, s)| s.message.clone()).unwrap_or_default(),
                    updated_at_ms: old.as_ref().map_or(0, |b| b.updated_at_ms),
                }
            }
        };
        // An operator's switch holds until an agent at the top term confirms it, or expires.
        if let Some((enabled, message, since)) = &self.pending {
            let confirmed = at_top.iter().any(|(_, s)| s.traffic_enabled == *enabled);
            let expired = now.duration_since(*since).unwrap_or_default() > PENDING_TRAFFIC;
            if confirmed || expired {
                self.pending = None;
            } else {
                new.traffic_enabled = *enabled;
                new.message = if *enabled {
                    String::new()
                } else {
                    message.clone()
                };
            }
        }
        let moved = old
            .as_ref()
            .is_none_or(|o| (o.term, &o.active) != (new.term, &new.active));
        let switched = old.as_ref().is_some_and(|o| {
            (o.traffic_enabled, &o.message) != (new.traffic_enabled, &new.message)
        });
        if moved || switched {
            new.updated_at_ms = unix_ms(now);
        }
        if moved {
            let from = old.as_ref().and_then(|o| o.active.clone());
            // Traffic switched off by an operator is not a failover.
            if from.is_some() && from != new.active && new.traffic_enabled {
                self.failovers += 1;
            }
            info!(service, term = new.term, from = from.as_deref().unwrap_or("none"), to = new.active.as_deref().unwrap_or("none"), reason = %new.reason, agent = %new.agent, "decision");
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(DecisionEvent {
                at: rfc3339(new.updated_at_ms),
                term: new.term,
                from,
                to: new.active.clone(),
                reason: new.reason.clone(),
                agent: new.agent.clone(),
            });
        }
        let changed_node = old.as_ref().is_some_and(|o| o.active != new.active)
            || old
                .as_ref()
                .is_some_and(|o| o.traffic_enabled && !new.traffic_enabled);
        let sever_all = !new.traffic_enabled || new.active.is_none();
        self.best = Some(new);
        if changed_node || (moved && sever_all) {
            self.sever(service, sever_all);
        }
    }

    /// Cuts the connections to every node but the active one (all of them when `all`).
    fn sever(&mut self, service: &str, all: bool) {
        let active = self.best.as_ref().and_then(|b| b.active.clone());
        let traffic = self.best.as_ref().is_none_or(|b| b.traffic_enabled);
        // A node an operator drains, while it stays healthy, keeps its connections until they
        // end (as the agent keeps them); only disabling traffic ends them too.
        let drained: BTreeSet<&str> = self
            .reports
            .values()
            .flat_map(|r| r.state.nodes.iter())
            .filter(|n| n.draining && n.healthy)
            .map(|n| n.name.as_str())
            .collect();
        let mut cut = 0;
        for (node, carried) in self.nodes.iter_mut() {
            // Connections whose node is unknown are cut only when everything is.
            let keep = (!all && (node.is_none() || *node == active))
                || (traffic && node.as_deref().is_some_and(|n| drained.contains(n)));
            if keep || carried.open == 0 {
                continue;
            }
            carried.cut.cancel();
            carried.cut = CancellationToken::new();
            cut += carried.open;
            carried.severed_open += carried.open;
            carried.open = 0;
        }
        self.nodes.retain(|_, c| c.open + c.severed_open > 0);
        if cut > 0 {
            self.severed += cut;
            warn!(
                service,
                severed = cut,
                active = active.as_deref().unwrap_or("none"),
                "severed connections to nodes that are no longer active"
            );
        }
    }
}

/// A transport's name in metrics.
pub(crate) fn transport_name(kind: TransportKind) -> &'static str {
    kind.as_str()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ms` since the Unix epoch as an RFC 3339 UTC timestamp with milliseconds; 0 (never) is Go's
/// zero time, `0001-01-01T00:00:00Z`, as Switchboard shows it.
pub(crate) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if ms == 0 {
        return "0001-01-01T00:00:00Z".into();
    }
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::protocol::NodeState;
    use postern_common::transport::Session;

    fn state(term: u64, active: Option<&str>) -> ServiceState {
        ServiceState {
            service: "orders".into(),
            term,
            active: active.map(str::to_owned),
            reason: format!("term {term}"),
            decided_at_ms: 1,
            traffic_enabled: true,
            message: String::new(),
            nodes: ["n1", "n2", "n3"]
                .iter()
                .enumerate()
                .map(|(i, n)| NodeState {
                    name: (*n).into(),
                    address: format!("10.0.0.{i}:3306"),
                    healthy: true,
                    check: "tcp".into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Registrations come from the registry: a real one, with real (in-memory) sessions.
    struct Agents {
        registry: crate::registry::Registry,
        _peers: Vec<Session>,
    }

    impl Agents {
        fn new() -> Self {
            Self {
                registry: Default::default(),
                _peers: Vec::new(),
            }
        }
        fn connect(&mut self, name: &str) -> Generation {
            let (ours, peer) = Session::memory_pair();
            self._peers.push(peer);
            self.registry
                .insert(name, ours, vec!["orders".into()], false, false)
        }
    }

    fn services() -> Vec<String> {
        vec!["orders".into()]
    }

    fn accepted() -> Vec<String> {
        services()
    }

    #[tokio::test]
    async fn the_highest_term_wins_and_stays_after_its_agent_leaves() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let (a, b) = (agents.connect("a"), agents.connect("b"));
        assert_eq!(c.route("orders"), (0, None));
        c.report("a", a, &accepted(), vec![state(3, Some("n1"))]);
        assert_eq!(c.route("orders"), (3, Some("n1".into())));
        c.report("b", b, &accepted(), vec![state(5, Some("n2"))]);
        assert_eq!(c.route("orders"), (5, Some("n2".into())));
        // A lower term changes nothing.
        c.report("a", a, &accepted(), vec![state(4, Some("n1"))]);
        assert_eq!(c.route("orders"), (5, Some("n2".into())));
        c.forget("b", b);
        assert_eq!(
            c.route("orders"),
            (5, Some("n2".into())),
            "kept after b left"
        );
        c.forget("a", a);
        let snap = c.snapshot("orders").unwrap();
        assert!(snap.reports.is_empty());
        assert_eq!(snap.best.unwrap().agent, "b");
        assert_eq!(snap.conflicts, 0);
        // Moves: (3,n1) -> (5,n2); the lower term made no event.
        let moves: Vec<_> = snap
            .events
            .iter()
            .map(|e| (e.term, e.from.clone(), e.to.clone()))
            .collect();
        assert_eq!(
            moves,
            vec![
                (3, None, Some("n1".into())),
                (5, Some("n1".into()), Some("n2".into()))
            ]
        );
        assert_eq!(snap.failovers, 1);
        assert!(c.snapshot("billing").is_none());
    }

    #[tokio::test]
    async fn a_stale_registration_does_not_forget_a_newer_session() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let old = agents.connect("a");
        let new = agents.connect("a");
        c.report("a", new, &accepted(), vec![state(2, Some("n1"))]);
        c.forget("a", old);
        assert_eq!(c.snapshot("orders").unwrap().reports.len(), 1);
    }

    #[tokio::test]
    async fn two_nodes_at_one_term_is_a_conflict_counted_once_and_resolved_to_the_lowest_name() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let (a, b) = (agents.connect("a"), agents.connect("b"));
        c.report("a", a, &accepted(), vec![state(5, Some("n2"))]);
        c.report("b", b, &accepted(), vec![state(5, Some("n1"))]);
        assert_eq!(c.route("orders"), (5, Some("n1".into())));
        for _ in 0..3 {
            c.report("a", a, &accepted(), vec![state(5, Some("n2"))]);
        }
        assert_eq!(c.snapshot("orders").unwrap().conflicts, 1);
        // Across time: the agent that named n3 at term 6 leaves; another names n2 at term 6.
        c.report("a", a, &accepted(), vec![state(6, Some("n3"))]);
        c.forget("a", a);
        c.report("b", b, &accepted(), vec![state(6, Some("n2"))]);
        assert_eq!(c.snapshot("orders").unwrap().conflicts, 2);
        // No node at a term is not a conflict.
        c.report("b", b, &accepted(), vec![state(7, Some("n2"))]);
        c.report("b", b, &accepted(), vec![state(7, None)]);
        assert_eq!(c.snapshot("orders").unwrap().conflicts, 2);
        assert_eq!(c.route("orders"), (7, None));
    }

    #[tokio::test]
    async fn the_decision_log_is_bounded() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let a = agents.connect("a");
        for term in 1..=(EVENTS_KEPT as u64 + 50) {
            let node = if term % 2 == 0 { "n1" } else { "n2" };
            c.report("a", a, &accepted(), vec![state(term, Some(node))]);
        }
        let snap = c.snapshot("orders").unwrap();
        assert_eq!(snap.events.len(), EVENTS_KEPT);
        assert_eq!(snap.events.last().unwrap().term, EVENTS_KEPT as u64 + 50);
    }

    #[tokio::test]
    async fn a_new_active_node_severs_the_connections_to_the_others() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let a = agents.connect("a");
        c.report("a", a, &accepted(), vec![state(1, Some("n1"))]);
        let asked = c.route("orders");
        let on_n1 = c.register(
            "orders",
            Some("n1".into()),
            asked.clone(),
            TransportKind::Quic,
        );
        let unknown = c.register("orders", None, asked.clone(), TransportKind::Quic);
        assert!(!on_n1.cut.is_cancelled());
        assert_eq!(c.snapshot("orders").unwrap().open[&Some("n1".into())], 1);
        // The same decision again severs nothing.
        c.report("a", a, &accepted(), vec![state(1, Some("n1"))]);
        assert!(!on_n1.cut.is_cancelled());
        c.report("a", a, &accepted(), vec![state(2, Some("n2"))]);
        assert!(on_n1.cut.is_cancelled(), "n1's connection is cut at once");
        assert!(
            !unknown.cut.is_cancelled(),
            "an unknown node is cut only with everything"
        );
        // A connection opened on n1 while the decision moved is born severed.
        let late = c.register("orders", Some("n1".into()), asked, TransportKind::Quic);
        assert!(late.cut.is_cancelled());
        let on_n2 = c.register(
            "orders",
            Some("n2".into()),
            c.route("orders"),
            TransportKind::Quic,
        );
        assert!(!on_n2.cut.is_cancelled());
        // No node at all: everything goes.
        c.report("a", a, &accepted(), vec![state(2, None)]);
        assert!(on_n2.cut.is_cancelled() && unknown.cut.is_cancelled());
        let snap = c.snapshot("orders").unwrap();
        assert_eq!(snap.severed, 4);
        drop((on_n1, on_n2, unknown, late));
        assert!(c.snapshot("orders").unwrap().open.is_empty());
    }

    #[tokio::test]
    async fn a_drained_node_keeps_its_connections_until_traffic_is_disabled() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let a = agents.connect("a");
        c.report("a", a, &accepted(), vec![state(1, Some("n2"))]);
        let on_n2 = c.register(
            "orders",
            Some("n2".into()),
            c.route("orders"),
            TransportKind::Quic,
        );
        // The operator drains n2 while n1 is down: no node is active, n2's connection goes on.
        let mut drained = state(1, None);
        drained.nodes[0].healthy = false;
        drained.nodes[1].draining = true;
        c.report("a", a, &accepted(), vec![drained.clone()]);
        assert_eq!(c.route("orders"), (1, None));
        assert!(
            !on_n2.cut.is_cancelled(),
            "a drained node's connection finishes"
        );
        // Disabling traffic ends it.
        drained.traffic_enabled = false;
        drained.message = "maintenance".into();
        c.report("a", a, &accepted(), vec![drained]);
        assert!(on_n2.cut.is_cancelled());
    }

    #[tokio::test]
    async fn disabling_traffic_severs_at_once_and_holds_until_the_agent_confirms() {
        let c = Cluster::new(&services());
        let mut agents = Agents::new();
        let a = agents.connect("a");
        c.report("a", a, &accepted(), vec![state(1, Some("n1"))]);
        let conn = c.register(
            "orders",
            Some("n1".into()),
            c.route("orders"),
            TransportKind::Websocket,
        );
        c.set_traffic("orders", false, "maintenance");
        assert!(conn.cut.is_cancelled());
        let best = c.snapshot("orders").unwrap().best.unwrap();
        assert!(!best.traffic_enabled);
        assert_eq!(best.message, "maintenance");
        // The agent has not applied it yet: its report does not undo the switch.
        c.report("a", a, &accepted(), vec![state(1, Some("n1"))]);
        assert!(!c.snapshot("orders").unwrap().best.unwrap().traffic_enabled);
        let mut off = state(1, None);
        off.traffic_enabled = false;
        off.message = "maintenance".into();
        c.report("a", a, &accepted(), vec![off]);
        // Confirmed; now the agent's view counts again.
        c.report("a", a, &accepted(), vec![state(1, Some("n1"))]);
        assert!(c.snapshot("orders").unwrap().best.unwrap().traffic_enabled);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "0001-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }
}
