//! What failover tests watch: every relay's view of the decision (`/v0/backends` and
//! `/v0/cluster/events`), polled in the background while a test moves nodes around, so that a
//! test can assert afterwards that no term ever named two nodes and that the relays agreed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, active_of};
use crate::galera::Galera;

/// How often a [`DecisionWatch`] polls each relay.
const POLL: Duration = Duration::from_millis(50);

/// One observation: what relay `relay` showed at `at` (since the watch started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The relay's index.
    pub relay: usize,
    /// When.
    pub at: Duration,
    /// Where: `backends` or `events`.
    pub source: &'static str,
    /// The term.
    pub term: u64,
    /// The node the term names (`None`: no healthy node).
    pub node: Option<String>,
}

/// Polls `/v0/backends` and `/v0/cluster/events` of several relays until stopped.
pub struct DecisionWatch {
    seen: Arc<Mutex<Vec<Seen>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl DecisionWatch {
    /// Starts polling `apis` (one per relay, indexed as given) for `service` (`None`: the
    /// relay's only service).
    pub fn start(apis: Vec<Api>, service: Option<&str>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let service = service.map(str::to_owned);
        let (s, e, token) = (seen.clone(), errors.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            while !token.is_cancelled() {
                for (relay, api) in apis.iter().enumerate() {
                    let svc = service.as_deref();
                    let path = |p: &str| match svc {
                        Some(s) => format!("{p}?service={s}"),
                        None => p.to_owned(),
                    };
                    let r = api.get(&path("/v0/backends")).await;
                    let at = started.elapsed();
                    match serde_json::from_str::<Vec<crate::api::Backend>>(&r.body) {
                        Ok(b) if r.status == 200 => {
                            let actives = b.iter().filter(|x| x.active).count();
                            if actives > 1 {
                                e.lock().unwrap().push(format!(
                                    "relay {relay} at {at:?}: {actives} active backends: {b:?}"
                                ));
                            } else {
                                let (term, node) = active_of(&b);
                                s.lock().unwrap().push(Seen {
                                    relay,
                                    at,
                                    source: "backends",
                                    term,
                                    node,
                                });
                            }
                        }
                        _ => e.lock().unwrap().push(format!(
                            "relay {relay} at {at:?}: /v0/backends {} {}",
                            r.status, r.body
                        )),
                    }
                    let r = api.get(&path("/v0/cluster/events")).await;
                    match serde_json::from_str::<Vec<crate::api::Event>>(&r.body) {
                        Ok(events) if r.status == 200 => {
                            let mut s = s.lock().unwrap();
                            for ev in events {
                                s.push(Seen {
                                    relay,
                                    at,
                                    source: "events",
                                    term: ev.term,
                                    node: ev.to,
                                });
                            }
                        }
                        _ => e.lock().unwrap().push(format!(
                            "relay {relay} at {at:?}: /v0/cluster/events {} {}",
                            r.status, r.body
                        )),
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        });
        Self {
            seen,
            errors,
            stop,
            task: Some(task),
        }
    }

    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The latest `(term, node)` relay `relay` showed in `/v0/backends`.
    pub fn latest(&self, relay: usize) -> Option<(u64, Option<String>)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.relay == relay && s.source == "backends")
            .map(|s| (s.term, s.node.clone()))
    }

    /// Waits until every one of `relays` shows `node` as active in `/v0/backends`, all at one
    /// term (within `within`); returns that term.
    pub async fn wait_all(&self, relays: usize, node: Option<&str>, within: Duration) -> u64 {
        let what = format!("every relay to show {node:?} active at one term");
        crate::eventually(within, &what, || {
            let views: Vec<_> = (0..relays).map(|r| self.latest(r)).collect();
            let agreed = views.iter().all(|v| {
                v.as_ref().is_some_and(|(t, n)| {
                    n.as_deref() == node && Some(*t) == views[0].as_ref().map(|v| v.0)
                })
            });
            async move { agreed.then(|| views[0].as_ref().map_or(0, |v| v.0)) }
        })
        .await
    }

    /// Stops polling and asserts that what every relay showed is consistent: no term named two
    /// different nodes (from any relay, in backends or events), no relay's term went down, no
    /// poll failed, and no relay showed several active backends.
    pub async fn stop_and_check(mut self) -> Vec<Seen> {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("the watch task");
        }
        let errors = self.errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "the relays' API failed: {errors:#?}");
        let seen = self.seen();
        assert_consistent(&seen);
        seen
    }
}

impl Drop for DecisionWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Asserts no term names two different nodes, and each relay's terms never go down in
/// `/v0/backends`.
pub fn assert_consistent(seen: &[Seen]) {
    let mut by_term: BTreeMap<u64, (Option<String>, &Seen)> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.node.is_some()) {
        match by_term.get(&s.term) {
            Some((node, first)) if *node != s.node => panic!(
                "term {} names two nodes: {node:?} ({first:?}) and {:?} ({s:?})",
                s.term, s.node
            ),
            Some(_) => {}
            None => {
                by_term.insert(s.term, (s.node.clone(), s));
            }
        }
    }
    let relays: std::collections::BTreeSet<usize> = seen.iter().map(|s| s.relay).collect();
    for r in relays {
        let mut last = 0;
        for s in seen
            .iter()
            .filter(|s| s.relay == r && s.source == "backends")
        {
            assert!(
                s.term >= last,
                "relay {r}'s term went down from {last} to {}: {s:?}",
                s.term
            );
            last = s.term;
        }
    }
}

/// The node a fresh decision picks in `g`: the lowest `wsrep_local_index` among `candidates`
/// (all nodes when empty).
pub fn lowest_index(g: &Galera, candidates: &[&str]) -> String {
    let names = g.names();
    names
        .iter()
        .filter(|n| candidates.is_empty() || candidates.contains(&n.as_str()))
        .filter_map(|n| g.local_index(n).map(|i| (i, n.clone())))
        .min()
        .map(|(_, n)| n)
        .expect("a galera node with a wsrep_local_index")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(relay: usize, term: u64, node: &str) -> Seen {
        Seen {
            relay,
            at: Duration::ZERO,
            source: "backends",
            term,
            node: Some(node.into()),
        }
    }

    #[test]
    fn one_node_per_term_passes() {
        assert_consistent(&[seen(0, 1, "n1"), seen(1, 1, "n1"), seen(0, 2, "n2")]);
    }

    #[test]
    #[should_panic(expected = "term 2 names two nodes")]
    fn two_nodes_for_one_term_fail() {
        assert_consistent(&[seen(0, 2, "n2"), seen(1, 2, "n3")]);
    }

    #[test]
    #[should_panic(expected = "term went down")]
    fn a_term_going_down_fails() {
        assert_consistent(&[seen(0, 3, "n2"), seen(0, 2, "n2")]);
    }
}
