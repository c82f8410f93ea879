//! Health checks of a service's database nodes: what one check finds ([`Probe`]), how results
//! turn into healthy and unhealthy ([`Tracker`]), and the loop that checks one node (`watch`).
//!
//! Detection is tiered, so that a node that says it is unwell leaves at once and a node that
//! merely hangs leaves soon after:
//! * an explicit "unhealthy" answer (an http 503, `"healthy": false`, a Galera node that is not
//!   Synced) makes the node unhealthy at once;
//! * a timeout or an error counts towards `fall`, and the next check runs at once instead of
//!   after `interval`, so a hung node is down within `interval + fall * timeout`;
//! * a failed node needs `rise` passed checks in a row to be healthy again;
//! * the first result after start decides at once (there is no history to weigh).
//!
//! A failed client connection to a node asks for an immediate re-check through the node's
//! `recheck` notify.

mod http;
mod mysql;
mod tcp;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CheckKind, HealthCheck, Node};

pub(crate) use mysql::opts as mysql_opts;

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node is fit to take connections.
    Up,
    /// The node said it is not (acts at once).
    Down,
    /// The check could not tell: a timeout or an error (counts towards `fall`).
    Failed,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Up, down or failed.
    pub outcome: Outcome,
    /// What the node answered, or why the check failed, in a few words (`503 not synced`,
    /// `timed out after 750ms`, `wsrep_local_state 1 (Joining)`).
    pub detail: String,
    /// Galera's `wsrep_local_index`, when the check read it.
    pub wsrep_local_index: Option<u32>,
}

impl Probe {
    /// A passed check.
    pub fn up(detail: impl Into<String>, wsrep_local_index: Option<u32>) -> Self {
        Self {
            outcome: Outcome::Up,
            detail: detail.into(),
            wsrep_local_index,
        }
    }

    /// An explicit unhealthy answer.
    pub fn down(detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Down,
            detail: detail.into(),
            wsrep_local_index: None,
        }
    }

    /// A check that could not tell.
    pub fn failed(detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed,
            detail: detail.into(),
            wsrep_local_index: None,
        }
    }
}

/// The longest detail kept from a node's answer.
const MAX_DETAIL: usize = 120;

/// `text` cut to its first line and at most [`MAX_DETAIL`] characters.
pub(crate) fn first_line(text: &str) -> String {
    let line = text.trim().lines().next().unwrap_or_default().trim();
    line.chars().take(MAX_DETAIL).collect()
}

/// Turns check results into healthy or unhealthy, with `rise` and `fall`.
#[derive(Debug, Clone)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    healthy: Option<bool>,
    failures: u32,
    successes: u32,
}

impl Tracker {
    /// A node with no result yet.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: None,
            failures: 0,
            successes: 0,
        }
    }

    /// Takes one result; `Some(healthy)` when the node's health changed (or was first known).
    pub fn record(&mut self, outcome: Outcome) -> Option<bool> {
        let before = self.healthy;
        match outcome {
            Outcome::Up => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if before.is_none() || self.successes >= self.rise {
                    self.healthy = Some(true);
                }
            }
            Outcome::Down => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.healthy = Some(false);
            }
            Outcome::Failed => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                if before.is_none() || self.failures >= self.fall {
                    self.healthy = Some(false);
                }
            }
        }
        (self.healthy != before).then_some(self.healthy == Some(true))
    }

    /// Whether the node is healthy (false before the first result).
    pub fn healthy(&self) -> bool {
        self.healthy == Some(true)
    }

    /// Checks failed in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the next check should run at once: a healthy node whose check just failed
    /// without an answer (a hang or an error), so that `fall` is reached quickly.
    pub fn recheck_now(&self, outcome: Outcome) -> bool {
        outcome == Outcome::Failed && self.healthy()
    }
}

/// Checks one node, the way its service's check says.
pub(crate) enum Prober {
    /// Connect.
    Tcp(String),
    /// `GET` the health endpoint.
    Http(crate::config::HttpTarget),
    /// Log in and read the Galera state (one connection kept open).
    Mysql(mysql::Monitor),
}

impl Prober {
    /// The prober of `node` for `kind`.
    pub(crate) fn new(kind: &CheckKind, node: &Node) -> Self {
        match (kind, &node.http) {
            (CheckKind::Http, Some(target)) => Self::Http(target.clone()),
            (CheckKind::Mysql { user, password }, _) => {
                Self::Mysql(mysql::Monitor::new(&node.address, user, password))
            }
            // An http check without a target cannot come from a validated config; checking
            // the port is the next best thing.
            (CheckKind::Tcp | CheckKind::Http, _) => Self::Tcp(node.address.clone()),
        }
    }

    /// Ends the check's connection, if it keeps one (the mysql check's login).
    pub(crate) async fn close(self) {
        if let Self::Mysql(m) = self {
            m.close().await;
        }
    }

    /// Runs one check, within `timeout` (a check that takes longer failed).
    pub(crate) async fn probe(&mut self, timeout: Duration) -> Probe {
        let run = async {
            match self {
                Self::Tcp(addr) => tcp::probe(addr).await,
                Self::Http(target) => http::probe(target).await,
                Self::Mysql(m) => m.probe().await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(p) => p,
            Err(_) => {
                if let Self::Mysql(m) = self {
                    // The connection is in an unknown state: the next check opens a new one.
                    m.reset();
                }
                Probe::failed(format!(
                    "timed out after {}",
                    postern_common::config::HumanDuration(timeout)
                ))
            }
        }
    }
}

/// One check's result with what it did to the node.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// What the check found.
    pub(crate) probe: Probe,
    /// How long it took.
    pub(crate) latency: Duration,
    /// Whether the node is healthy now.
    pub(crate) healthy: bool,
    /// `Some` when this check changed the node's health (or first decided it).
    pub(crate) transition: Option<bool>,
    /// Checks failed in a row.
    pub(crate) consecutive_failures: u32,
}

/// Checks one node until `cancel`: every `interval` while all is well, at once after a check
/// that failed without an answer while the node still counts as healthy, and at once when
/// `recheck` is notified (a client could not connect to it). Each result goes to `report`.
pub(crate) async fn watch(
    mut prober: Prober,
    check: HealthCheck,
    recheck: Arc<Notify>,
    mut report: impl FnMut(Report),
    cancel: CancellationToken,
) {
    let mut tracker = Tracker::new(check.rise, check.fall);
    loop {
        let started = Instant::now();
        let probe = tokio::select! {
            p = prober.probe(check.timeout) => p,
            _ = cancel.cancelled() => return,
        };
        let latency = started.elapsed();
        let outcome = probe.outcome;
        let transition = tracker.record(outcome);
        report(Report {
            probe,
            latency,
            healthy: tracker.healthy(),
            transition,
            consecutive_failures: tracker.failures(),
        });
        if tracker.recheck_now(outcome) {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(check.interval) => {}
            _ = recheck.notified() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_result_decides_at_once() {
        let mut t = Tracker::new(2, 2);
        assert!(!t.healthy());
        assert_eq!(t.record(Outcome::Up), Some(true));
        let mut t = Tracker::new(2, 2);
        assert_eq!(t.record(Outcome::Failed), Some(false));
        let mut t = Tracker::new(2, 2);
        assert_eq!(t.record(Outcome::Down), Some(false));
    }

    #[test]
    fn failures_count_to_fall_and_an_explicit_down_acts_at_once() {
        let mut t = Tracker::new(2, 3);
        t.record(Outcome::Up);
        assert_eq!(t.record(Outcome::Failed), None);
        assert!(t.recheck_now(Outcome::Failed));
        assert_eq!(t.record(Outcome::Failed), None);
        assert_eq!(t.failures(), 2);
        assert_eq!(t.record(Outcome::Failed), Some(false));
        assert!(
            !t.recheck_now(Outcome::Failed),
            "a down node is checked at the interval"
        );

        let mut t = Tracker::new(2, 3);
        t.record(Outcome::Up);
        t.record(Outcome::Failed);
        assert_eq!(t.record(Outcome::Up), None, "a pass resets the count");
        assert_eq!(t.failures(), 0);
        assert_eq!(t.record(Outcome::Down), Some(false));
        assert!(!t.recheck_now(Outcome::Down));
    }

    #[test]
    fn recovery_takes_rise_passes_in_a_row() {
        let mut t = Tracker::new(3, 1);
        t.record(Outcome::Down);
        assert_eq!(t.record(Outcome::Up), None);
        assert_eq!(t.record(Outcome::Up), None);
        assert_eq!(t.record(Outcome::Failed), None);
        assert_eq!(t.record(Outcome::Up), None);
        assert_eq!(t.record(Outcome::Up), None);
        assert_eq!(t.record(Outcome::Up), Some(true));
        assert_eq!(t.record(Outcome::Up), None);
    }

    #[test]
    fn details_are_one_short_line() {
        assert_eq!(first_line("  not synced\nmore"), "not synced");
        assert_eq!(first_line(&"x".repeat(500)).len(), MAX_DETAIL);
    }
}
