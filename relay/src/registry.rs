//! The agents connected to this relay, and which of them serves each service.
//!
//! An agent identity has at most one live session: when the same identity connects again (a
//! restart, a new network path), the new session replaces the old one at once and the old one is
//! closed, so a restarted agent never waits for its ghost to time out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use postern_common::protocol::Control;
use postern_common::transport::{Session, TransportKind};
use serde::Serialize;
use tokio::sync::mpsc;

/// Connected agents, by identity name.
#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    agents: HashMap<String, Entry>,
    next_generation: u64,
}

struct Entry {
    session: Session,
    /// The services it was accepted for.
    services: Vec<String>,
    /// The services its hello offered (a reload may accept more of them, or fewer).
    offered: Vec<String>,
    /// Its control stream's outgoing messages, when it understands a drain
    /// (`FEATURE_DRAIN`): how a reload asks it for a new session.
    drains: Option<mpsc::Sender<Control>>,
    mysql_e2e: bool,
    generation: u64,
    since: SystemTime,
    /// The agent is shutting down: no new streams go to it.
    draining: bool,
    /// Its control stream's outgoing messages, when it takes operators' commands
    /// (`FEATURE_BACKENDS`).
    commands: Option<mpsc::Sender<Control>>,
    /// It makes per-binding database users (`FEATURE_USERS`).
    users: bool,
}

/// The agent [`Registry::route`] chose.
pub struct Route {
    /// Its identity name.
    pub agent: String,
    /// Its session.
    pub session: Session,
    /// Whether it serves end-to-end streams (it said so in its hello).
    pub mysql_e2e: bool,
    /// The transport of its session.
    pub transport: TransportKind,
}

/// A registration; pass it back to [`Registry::remove`] when the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// What the API and logs show about one agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    /// The agent's identity name.
    pub name: String,
    /// The services it serves through this relay.
    pub services: Vec<String>,
    /// The transport of its session.
    pub transport: TransportKind,
    /// The key exchange group its session's TLS handshake used (`X25519MLKEM768` unless the
    /// agent predates it).
    pub key_exchange: &'static str,
    /// Its address as seen by the relay.
    pub remote: String,
    /// Seconds since the Unix epoch when the session started.
    pub since: u64,
    /// Whether it reports node health and decisions, and takes commands.
    pub backends: bool,
}

impl Registry {
    /// Registers `session` for agent `name`, replacing any previous session. The previous one is
    /// closed at once, unless `take_over` says the agent is moving to a new session itself: then
    /// it only stops receiving new streams, and finishes the ones it has. `mysql_e2e`: the agent
    /// serves end-to-end streams.
    pub fn insert(
        &self,
        name: &str,
        session: Session,
        services: Vec<String>,
        take_over: bool,
        mysql_e2e: bool,
    ) -> Generation {
        let mut st = self.lock();
        st.next_generation += 1;
        let generation = st.next_generation;
        let old = st.agents.insert(
            name.to_owned(),
            Entry {
                session,
                offered: services.clone(),
                services,
                drains: None,
                mysql_e2e,
                generation,
                since: SystemTime::now(),
                draining: false,
                commands: None,
                users: false,
            },
        );
        drop(st);
        if let Some(old) = old {
            if take_over {
                tracing::info!(agent = name, from = %old.session.kind(), "agent moved to a new session; the previous one drains");
            } else {
                tracing::info!(
                    agent = name,
                    "agent reconnected: replacing its previous session"
                );
                old.session
                    .close("replaced by a new session of the same agent");
            }
        }
        Generation(generation)
    }

    /// Removes agent `name` if its current registration is still `generation`.
    pub fn remove(&self, name: &str, generation: Generation) {
        let mut st = self.lock();
        if st
            .agents
            .get(name)
            .is_some_and(|e| e.generation == generation.0)
        {
            st.agents.remove(name);
        }
    }

    /// Marks agent `name`'s registration `generation` as draining (the agent is shutting down):
    /// new streams go to other agents, while its open streams finish.
    pub fn drain(&self, name: &str, generation: Generation) {
        let mut st = self.lock();
        if let Some(e) = st
            .agents
            .get_mut(name)
            .filter(|e| e.generation == generation.0)
        {
            e.draining = true;
        }
    }

    /// Lets agent `name`'s registration `generation` take operators' commands: they go to
    /// `commands`, its control stream's outgoing messages.
    pub fn set_commands(
        &self,
        name: &str,
        generation: Generation,
        commands: mpsc::Sender<Control>,
    ) {
        let mut st = self.lock();
        if let Some(e) = st
            .agents
            .get_mut(name)
            .filter(|e| e.generation == generation.0)
        {
            e.commands = Some(commands);
        }
    }

    /// Records what agent `name`'s registration `generation` offered in its hello, and where
    /// a drain reaches it (`None`: it does not understand one).
    pub fn set_hello(
        &self,
        name: &str,
        generation: Generation,
        offered: Vec<String>,
        drains: Option<mpsc::Sender<Control>>,
    ) {
        let mut st = self.lock();
        if let Some(e) = st
            .agents
            .get_mut(name)
            .filter(|e| e.generation == generation.0)
        {
            e.offered = offered;
            e.drains = drains;
        }
    }

    /// Brings the connected agents in line with a reloaded config's `agents` (name → the
    /// services it may offer) and `services` (those defined): an agent no longer listed is
    /// disconnected; one whose accepted services change (it offered one that is now allowed,
    /// or one it serves is no longer) is told to drain, and opens a new session whose welcome
    /// accepts the new set while this one finishes its streams (an agent that cannot drain is
    /// disconnected, and reconnects). Returns the names of the agents disconnected and of
    /// those asked for a new session.
    pub fn realign(
        &self,
        agents: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        services: &std::collections::BTreeMap<String, impl Sized>,
        drain: &Control,
    ) -> (Vec<String>, Vec<String>) {
        let mut st = self.lock();
        let mut dropped = Vec::new();
        let mut renewed = Vec::new();
        let mut closing = Vec::new();
        st.agents.retain(|name, e| {
            let Some(allowed) = agents.get(name) else {
                closing.push((
                    e.session.clone(),
                    "agent identity is no longer listed under agents in the relay config",
                ));
                dropped.push(name.clone());
                return false;
            };
            let accepted: Vec<String> = e
                .offered
                .iter()
                .filter(|s| allowed.contains(*s) && services.contains_key(*s))
                .cloned()
                .collect();
            if accepted == e.services {
                return true;
            }
            // Served no more: routed no more, whether or not the agent comes back at once.
            e.services.retain(|s| accepted.contains(s));
            let told = e
                .drains
                .as_ref()
                .is_some_and(|tx| tx.try_send(drain.clone()).is_ok());
            if !told {
                closing.push((e.session.clone(), "relay configuration changed"));
            }
            renewed.push(name.clone());
            true
        });
        drop(st);
        for (session, why) in closing {
            session.close(why);
        }
        dropped.sort();
        renewed.sort();
        (dropped, renewed)
    }

    /// Marks agent `name`'s registration `generation` as one that makes per-binding database
    /// users (its hello listed `FEATURE_USERS`).
    pub fn set_users(&self, name: &str, generation: Generation) {
        let mut st = self.lock();
        if let Some(e) = st
            .agents
            .get_mut(name)
            .filter(|e| e.generation == generation.0)
        {
            e.users = true;
        }
    }

    /// The session of an agent serving `service` that makes per-binding database users:
    /// agents for which `prefer` holds first, then the most recently connected.
    pub fn route_users(&self, service: &str, prefer: impl Fn(&str) -> bool) -> Option<Route> {
        let st = self.lock();
        st.agents
            .iter()
            .filter(|(_, e)| {
                e.users
                    && !e.draining
                    && !e.session.is_closed()
                    && e.services.iter().any(|s| s == service)
            })
            .max_by_key(|(n, e)| (prefer(n), e.generation))
            .map(|(n, e)| Route {
                agent: n.clone(),
                session: e.session.clone(),
                mysql_e2e: e.mysql_e2e,
                transport: e.session.kind(),
            })
    }

    /// Sends `command` to every agent serving `service` that takes commands; returns the names
    /// of those it was queued for. An agent whose queue is full (its control stream stalls)
    /// is left out.
    pub fn command(&self, service: &str, command: &Control) -> Vec<String> {
        let st = self.lock();
        let mut sent: Vec<String> = st
            .agents
            .iter()
            .filter(|(_, e)| !e.session.is_closed() && e.services.iter().any(|s| s == service))
            .filter_map(|(n, e)| {
                let tx = e.commands.as_ref()?;
                tx.try_send(command.clone()).ok().map(|()| n.clone())
            })
            .collect();
        sent.sort();
        sent
    }

    /// The session of an agent serving `service`, the most recently connected first.
    pub fn route(&self, service: &str) -> Option<Route> {
        self.route_preferring(service, |_| false)
    }

    /// The session of an agent serving `service`: agents for which `prefer` (given the agent's
    /// name) holds first, then the most recently connected.
    pub fn route_preferring(&self, service: &str, prefer: impl Fn(&str) -> bool) -> Option<Route> {
        let st = self.lock();
        st.agents
            .iter()
            .filter(|(_, e)| {
                !e.draining && !e.session.is_closed() && e.services.iter().any(|s| s == service)
            })
            .max_by_key(|(n, e)| (prefer(n), e.generation))
            .map(|(n, e)| Route {
                agent: n.clone(),
                session: e.session.clone(),
                mysql_e2e: e.mysql_e2e,
                transport: e.session.kind(),
            })
    }

    /// A snapshot of the connected agents, sorted by name.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let st = self.lock();
        let mut out: Vec<AgentInfo> = st
            .agents
            .iter()
            .map(|(name, e)| AgentInfo {
                name: name.clone(),
                services: e.services.clone(),
                transport: e.session.kind(),
                key_exchange: e.session.key_exchange(),
                remote: e.session.remote().to_string(),
                since: e
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                backends: e.commands.is_some(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map inconsistent (every update is a
        // single insert or remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (Session, Session) {
        Session::memory_pair()
    }

    #[tokio::test]
    async fn a_reconnecting_agent_replaces_its_old_session_at_once() {
        let r = Registry::default();
        let (old, _old_peer) = session();
        let first = r.insert("db1", old.clone(), vec!["orders".into()], false, false);
        assert_eq!(r.route("orders").map(|x| x.session.id()), Some(old.id()));
        let (new, _new_peer) = session();
        let second = r.insert("db1", new.clone(), vec!["orders".into()], false, false);
        assert!(old.is_closed(), "the old session is closed at once");
        assert_eq!(r.route("orders").map(|x| x.session.id()), Some(new.id()));
        // The old session's task ending later must not remove the new registration.
        r.remove("db1", first);
        assert_eq!(r.agents().len(), 1);
        r.remove("db1", second);
        assert!(r.route("orders").is_none());
    }

    #[tokio::test]
    async fn a_take_over_keeps_the_old_session_for_its_streams() {
        let r = Registry::default();
        let (ws, _p1) = session();
        r.insert("db1", ws.clone(), vec!["orders".into()], false, false);
        let (quic, _p2) = session();
        r.insert("db1", quic.clone(), vec!["orders".into()], true, false);
        assert!(!ws.is_closed(), "the old session finishes its streams");
        assert_eq!(r.route("orders").map(|x| x.session.id()), Some(quic.id()));
    }

    #[tokio::test]
    async fn a_draining_agent_gets_no_new_streams_while_another_does() {
        let r = Registry::default();
        let (a, _pa) = session();
        let (b, _pb) = session();
        r.insert("db2", b.clone(), vec!["orders".into()], false, false);
        let g = r.insert("db1", a.clone(), vec!["orders".into()], false, false);
        assert_eq!(r.route("orders").map(|x| x.agent), Some("db1".into()));
        r.drain("db1", g);
        assert_eq!(r.route("orders").map(|x| x.agent), Some("db2".into()));
        assert!(r.route("billing").is_none());
    }

    #[tokio::test]
    async fn an_agent_that_reports_the_node_healthy_is_preferred() {
        let r = Registry::default();
        let (a, _pa) = session();
        let (b, _pb) = session();
        r.insert("db1", a, vec!["orders".into()], false, false);
        r.insert("db2", b, vec!["orders".into()], false, false);
        assert_eq!(r.route("orders").map(|x| x.agent), Some("db2".into()));
        let routed = r.route_preferring("orders", |agent| agent == "db1");
        assert_eq!(routed.map(|x| x.agent), Some("db1".into()));
    }

    #[tokio::test]
    async fn admin_streams_go_only_to_agents_that_make_users() {
        let r = Registry::default();
        let (a, _pa) = session();
        let (b, _pb) = session();
        let ga = r.insert("db1", a, vec!["orders".into()], false, false);
        r.insert("db2", b, vec!["orders".into()], false, false);
        assert!(r.route_users("orders", |_| false).is_none());
        r.set_users("db1", ga);
        let routed = r.route_users("orders", |_| false).map(|x| x.agent);
        assert_eq!(routed, Some("db1".into()));
        assert!(r.route_users("billing", |_| true).is_none());
        r.drain("db1", ga);
        assert!(r.route_users("orders", |_| true).is_none());
    }

    #[tokio::test]
    async fn a_reload_renews_agents_whose_services_change_and_drops_unlisted_ones() {
        use std::collections::{BTreeMap, BTreeSet};
        let r = Registry::default();
        let (a, _pa) = session();
        let (b, _pb) = session();
        let (c, _pc) = session();
        let ga = r.insert("db1", a.clone(), vec!["orders".into()], false, false);
        let (tx, mut rx) = mpsc::channel(4);
        r.set_hello("db1", ga, vec!["orders".into(), "billing".into()], Some(tx));
        r.insert("db2", b.clone(), vec!["orders".into()], false, false);
        let gc = r.insert("db3", c.clone(), vec!["orders".into()], false, false);
        r.set_hello("db3", gc, vec!["orders".into()], None);
        let allowed = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        let agents: BTreeMap<String, BTreeSet<String>> = [
            ("db1".to_owned(), allowed(&["orders", "billing"])),
            ("db3".to_owned(), allowed(&[])),
        ]
        .into();
        let services: BTreeMap<String, ()> =
            [("orders".to_owned(), ()), ("billing".to_owned(), ())].into();
        let drain = Control::Drain {
            reason: "relay configuration changed".into(),
            grace_ms: 1,
        };
        let (dropped, renewed) = r.realign(&agents, &services, &drain);
        assert_eq!(dropped, ["db2"], "not listed any more");
        assert!(b.is_closed());
        assert_eq!(renewed, ["db1", "db3"]);
        assert_eq!(
            rx.try_recv().ok(),
            Some(drain.clone()),
            "db1 is asked to drain"
        );
        assert!(!a.is_closed(), "db1 finishes its streams");
        assert!(c.is_closed(), "db3 cannot drain: it reconnects");
        assert!(r.route("orders").is_some_and(|x| x.agent == "db1"));
        // Until db1 comes back with a new session, the same config asks it again; db3 serves
        // nothing any more.
        let again = r.realign(&agents, &services, &drain);
        assert_eq!(again, (vec![], vec!["db1".to_owned()]));
        assert!(r.route("orders").is_some_and(|x| x.agent == "db1"));
    }

    #[tokio::test]
    async fn commands_go_to_every_agent_of_the_service_that_takes_them() {
        let r = Registry::default();
        let (a, _pa) = session();
        let (b, _pb) = session();
        let (c, _pc) = session();
        let ga = r.insert("db1", a, vec!["orders".into()], false, false);
        let gb = r.insert("db2", b, vec!["orders".into()], false, false);
        r.insert("db3", c, vec!["orders".into()], false, false);
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        r.set_commands("db1", ga, tx1);
        r.set_commands("db2", gb, tx2);
        let cmd = Control::Heartbeat { seq: 7 };
        assert_eq!(r.command("orders", &cmd), vec!["db1", "db2"]);
        assert_eq!(rx1.recv().await, Some(cmd.clone()));
        assert_eq!(rx2.recv().await, Some(cmd.clone()));
        assert!(r.command("billing", &cmd).is_empty());
    }
}
