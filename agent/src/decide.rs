//! Decisions: which node of a service new connections go to, numbered by a term.
//!
//! The rule ([`next`]) is pure: among healthy nodes that are not drained, the lowest
//! `wsrep_local_index` when known, else config order; and it is **sticky**: the active node
//! stays while it is healthy and not drained, so a recovered node gets traffic back only when
//! the current one fails or an operator activates it. Every change is a new term, and a term
//! never names two different nodes.
//!
//! The `Decider` of a service runs that rule whenever a node's health changes, an operator's
//! command arrives, a relay shows a newer term, or every check interval, and keeps the result
//! where the service's `decisions:` says:
//! * `local`: a file per service in the agent's `state_dir`, written (atomically, and synced)
//!   before the decision is announced, and read back at start, so terms keep growing and the
//!   choice stays the same across restarts. A newer term a relay shows in a stream's open
//!   frame is adopted when its node is fit here, and outbid otherwise.
//! * `cluster`: a row per service in the Galera cluster itself (`postern.decisions`), written by
//!   compare-and-set through the monitor user ([`ClusterStore`]). Galera's certification (and
//!   InnoDB's row locks) let exactly one of several agents win a term; the others re-read and
//!   adopt it. Every agent reads the row every round and adopts it while its node is fit here.
//!   Each row also names a successor and reserves the next term for it, so that when the
//!   active node dies the agents move to the successor without a write (Galera holds commits
//!   until it evicts a dead node, seconds later); see [`ClusterStore`].
//!
//! Operator commands (traffic on or off, drain, activate) are kept in the same local file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_common::protocol::Command;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backends::ServiceNodes;
use crate::config::{Decisions, Secret};

/// One decision: the node new connections go to, and its term.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Only grows; one term never names two nodes.
    pub term: u64,
    /// The active node; `None` when no node is fit.
    pub node: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub decided_at_ms: u64,
}

/// A node as the decision rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its name.
    pub name: String,
    /// Whether its checks say it is healthy.
    pub healthy: bool,
    /// Whether an operator drained it.
    pub draining: bool,
    /// Galera's `wsrep_local_index`, when known.
    pub wsrep_local_index: Option<u32>,
    /// The last check's detail (`503`, `timed out after 750ms`), for reasons.
    pub detail: String,
}

impl Candidate {
    /// Whether new connections may go to it.
    pub fn fit(&self) -> bool {
        self.healthy && !self.draining
    }
}

/// The change the rule asks for: the new active node (`None`: no fit node) and why; `None`
/// when the current decision stands. `activate`: an operator asked for this node (honoured
/// when it is fit).
pub fn next(
    current: &Decision,
    nodes: &[Candidate],
    activate: Option<&str>,
) -> Option<(Option<String>, String)> {
    if let Some(wanted) = activate
        && let Some(n) = nodes.iter().find(|n| n.name == wanted && n.fit())
    {
        return (current.node.as_deref() != Some(wanted))
            .then(|| (Some(n.name.clone()), format!("operator activated {wanted}")));
    }
    let active = current
        .node
        .as_deref()
        .and_then(|a| nodes.iter().find(|n| n.name == a));
    if active.is_some_and(Candidate::fit) {
        return None;
    }
    let best = choose(nodes);
    if best.map(|b| b.name.as_str()) == current.node.as_deref() {
        return None;
    }
    let why_not = match (&current.node, active) {
        (None, _) => None,
        (Some(a), None) => Some(format!("{a} is not a node of this service")),
        (Some(a), Some(n)) if n.draining && n.healthy => Some(format!("{a} drained")),
        (Some(a), Some(n)) => Some(format!("{a} unhealthy: {}", n.detail)),
    };
    let chosen = match best {
        None => no_fit_node(nodes),
        Some(b) => match b.wsrep_local_index {
            Some(i) => format!("{} chosen (lowest wsrep_local_index {i})", b.name),
            None => format!("{} chosen (first fit node in config order)", b.name),
        },
    };
    let reason = match why_not {
        Some(w) => format!("{w}; {chosen}"),
        None => chosen,
    };
    Some((best.map(|b| b.name.clone()), reason))
}

/// The node the rule picks when it must pick: the fit node with the lowest
/// `wsrep_local_index` (nodes with one come first), ties and unknowns in config order.
pub fn choose(nodes: &[Candidate]) -> Option<&Candidate> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.fit())
        .min_by_key(|(i, n)| (n.wsrep_local_index.is_none(), n.wsrep_local_index, *i))
        .map(|(_, n)| n)
}

/// `no healthy node: n1 503, n2 timed out after 750ms, n3 drained`: why no node is fit.
pub fn no_fit_node(nodes: &[Candidate]) -> String {
    let why: Vec<String> = nodes
        .iter()
        .map(|n| {
            let what = if n.healthy && n.draining {
                "drained"
            } else if n.detail.is_empty() {
                "not checked yet"
            } else {
                n.detail.as_str()
            };
            format!("{} {what}", n.name)
        })
        .collect();
    format!("no healthy node: {}", why.join(", "))
}

/// What the agent keeps about a service across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The last decision announced.
    pub decision: Decision,
    /// Whether traffic is enabled (an operator's command).
    pub traffic_enabled: bool,
    /// The operator's message when it is not.
    #[serde(default)]
    pub message: String,
    /// The nodes an operator drained.
    #[serde(default)]
    pub draining: Vec<String>,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            decision: Decision::default(),
            traffic_enabled: true,
            message: String::new(),
            draining: Vec::new(),
        }
    }
}

/// Why a decision could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is not ours or is damaged.
    #[error("{path}: not a postern state file: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// No node is healthy, so the cluster's decision cannot be read or written.
    #[error("no healthy node to reach the cluster's decision table through")]
    NoNode,
    /// The cluster's decision table could not be read or written.
    #[error("decision table on node {node}: {source}")]
    Cluster {
        /// Through which node.
        node: String,
        /// Why.
        source: mysql_async::Error,
    },
    /// The cluster did not answer in time.
    #[error("decision table on node {0}: timed out")]
    ClusterTimeout(String),
    /// The node the decision table was reached through turned unhealthy meanwhile.
    #[error("decision table on node {0}: the node turned unhealthy; trying another")]
    NodeLeft(String),
}

/// The largest state file read.
const MAX_STATE_FILE: u64 = 64 * 1024;

/// A service's [`Record`] in a file in the state directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    path: PathBuf,
}

impl LocalStore {
    /// The store of `service` in `state_dir`.
    pub fn new(state_dir: &Path, service: &str) -> Self {
        Self {
            path: state_dir.join(format!("{service}.json")),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the record; `None` when there is none yet.
    pub async fn load(&self) -> Result<Option<Record>, StoreError> {
        let path = self.path.clone();
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let text = match tokio::fs::metadata(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
            Ok(m) if m.len() > MAX_STATE_FILE => {
                return Err(StoreError::Corrupt {
                    path,
                    why: format!("larger than {MAX_STATE_FILE} bytes"),
                });
            }
            Ok(_) => tokio::fs::read(&path).await.map_err(io)?,
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                why: e.to_string(),
            })
    }

    /// Writes the record: to a temporary file, synced, renamed over the old one, and the
    /// directory synced, so a crash leaves the old record or the new one, never a mix.
    pub async fn save(&self, record: &Record) -> Result<(), StoreError> {
        let path = self.path.clone();
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomic(&p, &bytes)).await;
        match written {
            Ok(r) => r.map_err(|source| StoreError::Io { path, source }),
            Err(e) => Err(StoreError::Io {
                path,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Server error codes that mean "another writer won": a Galera certification failure or an
/// InnoDB deadlock (1213), a lock wait timeout (1205).
const LOST_RACE: [u16; 2] = [1213, 1205];

/// The decision table in the Galera cluster: one row per service, written by compare-and-set
/// through the monitor user on a node that is healthy here (so in the Primary component).
///
/// ```sql
/// CREATE TABLE postern.decisions (
///   service VARCHAR(64) NOT NULL PRIMARY KEY, term BIGINT UNSIGNED NOT NULL,
///   node VARCHAR(64) NULL, next_node VARCHAR(64) NULL, reason VARCHAR(512) NOT NULL DEFAULT '',
///   agent VARCHAR(128) NOT NULL DEFAULT '', decided_at TIMESTAMP(3) NOT NULL)
/// ```
///
/// `next_node` is the **successor**: the row at term `T` also reserves term `T + 1` for that
/// node, so an agent that finds the active node unfit while the successor is fit adopts
/// `(T + 1, next_node)` from the last row it read, without writing anything ([`take_over`]),
/// and then makes it the row. A write that names another node skips the reserved term
/// ([`next_term`]). So a killed node is left as soon as an agent notices, not after Galera has
/// evicted it (until then the cluster holds every commit, this table's included).
///
/// The monitor user needs `CREATE, SELECT, INSERT, UPDATE ON postern.*` (the schema and table
/// are created when missing).
pub struct ClusterStore {
    service: String,
    agent: String,
    user: String,
    password: Secret,
    timeout: Duration,
    conn: Option<(String, mysql_async::Conn)>,
    /// The row as last read or written.
    last: Option<Row>,
}

/// A service's row in the decision table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// The decision.
    pub decision: Decision,
    /// The successor: the node term `decision.term + 1` names, if any takes it.
    pub next: Option<String>,
}

/// The result of a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// This agent's write made the new term.
    Won,
    /// Another writer got there first: re-read and adopt.
    Lost,
}

const SCHEMA: &str = "CREATE DATABASE IF NOT EXISTS postern";
const TABLE: &str = "CREATE TABLE IF NOT EXISTS postern.decisions (\
     service VARCHAR(64) NOT NULL PRIMARY KEY, \
     term BIGINT UNSIGNED NOT NULL, \
     node VARCHAR(64) NULL, \
     next_node VARCHAR(64) NULL, \
     reason VARCHAR(512) NOT NULL DEFAULT '', \
     agent VARCHAR(128) NOT NULL DEFAULT '', \
     decided_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB";
const SELECT: &str = "SELECT term, node, next_node, reason, \
     CAST(UNIX_TIMESTAMP(decided_at) * 1000 AS UNSIGNED) FROM postern.decisions WHERE service = ?";
const INSERT: &str = "INSERT IGNORE INTO postern.decisions \
     (service, term, node, next_node, reason, agent, decided_at) \
     VALUES (?, ?, ?, ?, ?, ?, NOW(3))";
const UPDATE: &str = "UPDATE postern.decisions SET term = ?, node = ?, next_node = ?, reason = ?, \
     agent = ?, \
     decided_at = NOW(3) WHERE service = ? AND term = ?";

impl ClusterStore {
    /// The store of `service`, written as `agent`, logging in as `user`; every operation
    /// within `timeout`.
    pub fn new(
        service: &str,
        agent: &str,
        user: &str,
        password: &Secret,
        timeout: Duration,
    ) -> Self {
        Self {
            service: service.to_owned(),
            agent: agent.to_owned(),
            user: user.to_owned(),
            password: password.clone(),
            timeout,
            conn: None,
            last: None,
        }
    }

    /// The row as last read or written (a committed row, if perhaps an old one).
    pub fn last(&self) -> Option<&Row> {
        self.last.as_ref()
    }

    /// Reads the service's row through one of `svc`'s healthy nodes (the active one
    /// preferred); `None` when there is none yet.
    pub async fn read(&mut self, svc: &ServiceNodes) -> Result<Option<Row>, StoreError> {
        let service = self.service.clone();
        type Raw = (u64, Option<String>, Option<String>, String, Option<u64>);
        let row = self
            .run(svc, move |conn| {
                Box::pin(async move {
                    use mysql_async::prelude::Queryable;
                    let row: Option<Raw> = conn.exec_first(SELECT, (service,)).await?;
                    Ok(row.map(|(term, node, next, reason, at)| Row {
                        decision: Decision {
                            term,
                            node,
                            reason,
                            decided_at_ms: at.unwrap_or_default(),
                        },
                        next,
                    }))
                })
            })
            .await?;
        if row.is_some() {
            self.last.clone_from(&row);
        }
        Ok(row)
    }

    /// Writes `new` through one of `svc`'s healthy nodes if the row's term is still
    /// `expected` (`None`: there is no row yet).
    pub async fn cas(
        &mut self,
        svc: &ServiceNodes,
        expected: Option<u64>,
        new: &Row,
    ) -> Result<Cas, StoreError> {
        let (service, agent) = (self.service.clone(), self.agent.clone());
        let (new, next) = (new.decision.clone(), new.next.clone());
        let reason: String = new.reason.chars().take(500).collect();
        let (term, node, next_node) = (new.term, new.node.clone(), next.clone());
        let written = self
            .run(svc, move |conn| {
                Box::pin(async move {
                    use mysql_async::prelude::Queryable;
                    match expected {
                        None => {
                            conn.exec_drop(INSERT, (service, term, node, next_node, reason, agent))
                                .await?
                        }
                        Some(old) => {
                            conn.exec_drop(
                                UPDATE,
                                (term, node, next_node, reason, agent, service, old),
                            )
                            .await?
                        }
                    }
                    Ok(conn.affected_rows())
                })
            })
            .await;
        match written {
            Ok(1) => {
                self.last = Some(Row {
                    decision: new,
                    next,
                });
                Ok(Cas::Won)
            }
            Ok(_) => Ok(Cas::Lost),
            Err(StoreError::Cluster {
                source: mysql_async::Error::Server(e),
                ..
            }) if LOST_RACE.contains(&e.code) => Ok(Cas::Lost),
            Err(e) => Err(e),
        }
    }

    /// Runs `op` on a connection to one of the service's healthy nodes (keeping the current
    /// one while its node is healthy), the active node first.
    ///
    /// Logging in is bounded by the timeout. The operation itself is not cut short while its
    /// node stays healthy, up to [`STALL_LIMIT`]: after a node dies abruptly, Galera holds every
    /// commit (and every causal read) until the others evict it, and the write that decides
    /// the next term goes through the moment they have; cutting it off and trying again later
    /// would only add to the failover time. It is given up at once when its node turns
    /// unhealthy (a hung or partitioned node), so the next try goes through another one. A
    /// failed or abandoned connection is dropped.
    async fn run<T>(
        &mut self,
        svc: &ServiceNodes,
        op: impl for<'c> FnOnce(
            &'c mut mysql_async::Conn,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<T, mysql_async::Error>> + Send + 'c>,
        >,
    ) -> Result<T, StoreError> {
        let mut changed = svc.subscribe();
        let nodes = svc.healthy_addresses();
        let (name, mut conn) = match self.conn.take() {
            Some((n, c)) if nodes.iter().any(|(m, _)| *m == n) => (n, c),
            _ => {
                let (name, addr) = nodes.first().ok_or(StoreError::NoNode)?;
                let opts = crate::health::mysql_opts(addr, &self.user, &self.password);
                match tokio::time::timeout(self.timeout, connect(opts)).await {
                    Ok(Ok(c)) => (name.clone(), c),
                    Ok(Err(source)) => {
                        return Err(StoreError::Cluster {
                            node: name.clone(),
                            source,
                        });
                    }
                    Err(_) => return Err(StoreError::ClusterTimeout(name.clone())),
                }
            }
        };
        let node_left = async {
            while svc.node_healthy(&name) {
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let limit = STALL_LIMIT.max(self.timeout);
        let result = tokio::select! {
            r = tokio::time::timeout(limit, op(&mut conn)) => r,
            () = node_left => return Err(StoreError::NodeLeft(name)),
        };
        match result {
            Ok(Ok(v)) => {
                self.conn = Some((name, conn));
                Ok(v)
            }
            Ok(Err(source)) => {
                // A server error leaves the connection usable; anything else does not.
                if matches!(source, mysql_async::Error::Server(_)) {
                    self.conn = Some((name.clone(), conn));
                }
                Err(StoreError::Cluster { node: name, source })
            }
            Err(_) => Err(StoreError::ClusterTimeout(name)),
        }
    }
}

/// The longest a read or write of the decision table may take while the node it goes through
/// stays healthy: Galera's default eviction of a dead node (`evs.suspect_timeout` 5 s) with
/// room to spare.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Server errors for a missing schema (1049) or table (1146).
const NO_TABLE: [u16; 2] = [1049, 1146];

/// Logs in for the decision table, and creates the table when it is missing. Nothing here
/// waits for the cluster (DDL does, in Galera, so it runs only when the table is missing).
async fn connect(opts: mysql_async::Opts) -> Result<mysql_async::Conn, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    let mut c = mysql_async::Conn::new(opts).await?;
    match c
        .query_drop("SELECT next_node FROM postern.decisions LIMIT 0")
        .await
    {
        Err(mysql_async::Error::Server(e)) if NO_TABLE.contains(&e.code) => {
            c.query_drop(SCHEMA).await?;
            c.query_drop(TABLE).await?;
        }
        other => other?,
    }
    // From here on, reads see every write the cluster committed before them (Galera only;
    // elsewhere the variable is unknown and reads are local anyway). Set last: such a read
    // waits for the cluster.
    let _ = c.query_drop("SET SESSION wsrep_sync_wait = 1").await;
    Ok(c)
}

/// How soon a decision that could not be kept is tried again (the first time).
const RETRY: Duration = Duration::from_millis(50);

/// Where a service's decisions are kept.
pub(crate) enum Store {
    /// Only in the state file.
    Local,
    /// In the cluster's table (the state file keeps the operator's commands and a copy).
    Cluster(Box<ClusterStore>),
}

/// Makes and keeps a service's decisions (see the module doc).
pub(crate) struct Decider {
    pub(crate) svc: Arc<ServiceNodes>,
    pub(crate) local: LocalStore,
    pub(crate) store: Store,
    pub(crate) commands: mpsc::Receiver<Command>,
    /// How often the rule runs without a reason (and the cluster's row is read).
    pub(crate) round: Duration,
    /// How long after start nodes without a first result are taken as unhealthy.
    pub(crate) first_results: Duration,
}

impl Decider {
    /// Restores the service's record, then decides until `cancel`.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let service = self.svc.name.clone();
        match self.local.load().await {
            Ok(Some(record)) => {
                info!(%service, term = record.decision.term, node = ?record.decision.node, traffic_enabled = record.traffic_enabled, "restored the last decision");
                self.svc.restore(&record);
            }
            Ok(None) => {}
            // Terms still never go back for relays: an open frame with a newer term is outbid.
            Err(e) => {
                error!(%service, error = %e, "cannot read the last decision; starting from term 0")
            }
        }
        let started = Instant::now();
        let mut last_error = String::new();
        // After a failure the next try comes soon (the cluster may have just settled), then
        // less and less often, up to once a round.
        let mut pause = self.round;
        loop {
            let mut activate = None;
            tokio::select! {
                _ = cancel.cancelled() => return,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Activate { node, .. }) => activate = Some(node),
                    Some(cmd) => {
                        if self.svc.apply(&cmd) {
                            self.save_flags().await;
                        }
                    }
                    None => return,
                },
                _ = self.svc.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            if !self.svc.all_checked() && started.elapsed() < self.first_results {
                if let Some(node) = activate {
                    warn!(%service, %node, "cannot activate a node before every node was checked once");
                }
                continue;
            }
            let result = match &mut self.store {
                Store::Local => self.decide_local(activate.as_deref()).await,
                Store::Cluster(_) => self.decide_cluster(activate.as_deref()).await,
            };
            match result {
                Ok(()) => {
                    last_error.clear();
                    pause = self.round;
                }
                Err(e) => {
                    pause = if last_error.is_empty() {
                        RETRY.min(self.round)
                    } else {
                        pause.saturating_mul(2).min(self.round)
                    };
                    // Once per kind of failure, not once per round.
                    let text = e.to_string();
                    if text != last_error {
                        error!(%service, error = %text, "cannot keep the decision");
                        last_error = text;
                    }
                }
            }
        }
    }

    async fn decide_local(&mut self, activate: Option<&str>) -> Result<(), StoreError> {
        let (own, candidates, observed) = self.svc.snapshot();
        // A relay knows a newer term (from an earlier life of this agent): start from it.
        let current = match observed {
            Some(o) if o.term > own.term => o,
            _ => own.clone(),
        };
        let new = match next(&current, &candidates, activate) {
            // A relay's newer decision names a node that is not fit here: outbid it, keeping
            // this agent's own node while that one is fit (no needless move).
            Some(_)
                if current != own
                    && activate.is_none()
                    && own
                        .node
                        .as_ref()
                        .is_some_and(|n| candidates.iter().any(|c| c.name == *n && c.fit())) =>
            {
                Decision {
                    term: current.term.saturating_add(1),
                    node: own.node.clone(),
                    reason: format!(
                        "term {} from a relay names {}, not fit here; {} stays",
                        current.term,
                        current.node.as_deref().unwrap_or("no node"),
                        own.node.as_deref().unwrap_or_default()
                    ),
                    decided_at_ms: now_ms(),
                }
            }
            Some((node, reason)) => Decision {
                term: current.term.saturating_add(1),
                node,
                reason,
                decided_at_ms: now_ms(),
            },
            None if current != own => Decision {
                reason: format!("adopted term {} from a relay", current.term),
                ..current
            },
            None => return Ok(()),
        };
        let mut record = self.svc.record();
        record.decision = new.clone();
        self.local.save(&record).await?;
        self.svc.announce(new, &own);
        Ok(())
    }

    async fn decide_cluster(&mut self, activate: Option<&str>) -> Result<(), StoreError> {
        let Store::Cluster(cluster) = &mut self.store else {
            return Ok(());
        };
        // The active node is unfit and the last row read names a fit successor: take it over
        // now, before the cluster can take a write (see [`ClusterStore`]).
        if activate.is_none() {
            let (own, candidates, observed) = self.svc.snapshot();
            if let Some(new) = cluster
                .last()
                .and_then(|row| take_over(row, &own, observed.as_ref(), &candidates))
            {
                let mut record = self.svc.record();
                record.decision = new.clone();
                let _ = self.local.save(&record).await;
                self.svc.announce(new, &own);
            }
        }
        // A lost race is settled by reading again; two tries are plenty (a third writer
        // racing both means the next round settles it).
        for _ in 0..3 {
            let (own, candidates, observed) = self.svc.snapshot();
            let row = cluster.read(&self.svc).await?;
            let current = row.as_ref().map(|r| r.decision.clone()).unwrap_or_default();
            // This agent knows a newer term than the row (it took over the successor, or the
            // table was re-created): that one is written, unless it must move anyway.
            let ahead = row.is_some() && own.term > current.term;
            let base = if ahead { &own } else { &current };
            let wanted = next(base, &candidates, activate)
                .or_else(|| ahead.then(|| (own.node.clone(), own.reason.clone())));
            let Some((node, reason)) = wanted else {
                if let Some(row) = &row
                    && !same(&row.decision, &own)
                {
                    let mut record = self.svc.record();
                    record.decision = row.decision.clone();
                    // The cluster has it; the local copy is a convenience.
                    let _ = self.local.save(&record).await;
                    self.svc.announce(row.decision.clone(), &own);
                }
                return Ok(());
            };
            let mut known = vec![&own];
            known.extend(observed.as_ref());
            let new = Row {
                next: successor(&candidates, node.as_deref()),
                decision: Decision {
                    term: next_term(row.as_ref(), node.as_deref(), &known),
                    node,
                    reason,
                    decided_at_ms: now_ms(),
                },
            };
            match cluster
                .cas(&self.svc, row.map(|r| r.decision.term), &new)
                .await?
            {
                Cas::Won => {
                    if !same(&new.decision, &own) {
                        let mut record = self.svc.record();
                        record.decision = new.decision.clone();
                        let _ = self.local.save(&record).await;
                        self.svc.announce(new.decision, &own);
                    }
                    return Ok(());
                }
                Cas::Lost => {
                    info!(service = %self.svc.name, term = new.decision.term, "another agent decided first; reading its decision");
                }
            }
        }
        Ok(())
    }

    async fn save_flags(&self) {
        if let Err(e) = self.local.save(&self.svc.record()).await {
            error!(service = %self.svc.name, error = %e, "cannot keep the operator's command (it applies until the agent restarts)");
        }
    }
}

/// Whether two decisions are the same term and node (reasons and times may differ).
fn same(a: &Decision, b: &Decision) -> bool {
    a.term == b.term && a.node == b.node
}

/// The successor a row naming `active` reserves the next term for: the node the rule would
/// pick if `active` were gone.
pub fn successor(nodes: &[Candidate], active: Option<&str>) -> Option<String> {
    let others: Vec<Candidate> = nodes
        .iter()
        .filter(|n| Some(n.name.as_str()) != active)
        .cloned()
        .collect();
    choose(&others).map(|n| n.name.clone())
}

/// The decision an agent adopts from `row` (a committed row it read) without writing: the
/// successor at the reserved term, when the row's node is not fit here and the successor is,
/// and nothing newer than the row is known (`own`, `observed`).
pub fn take_over(
    row: &Row,
    own: &Decision,
    observed: Option<&Decision>,
    nodes: &[Candidate],
) -> Option<Decision> {
    let newest = own.term.max(observed.map_or(0, |o| o.term));
    if newest > row.decision.term {
        return None;
    }
    let active = row.decision.node.as_deref()?;
    let active = nodes.iter().find(|n| n.name == active);
    if active.is_some_and(Candidate::fit) {
        return None;
    }
    let next = row.next.as_deref()?;
    nodes.iter().find(|n| n.name == next && n.fit())?;
    let gone = row.decision.node.as_deref().unwrap_or_default();
    let why = match active {
        Some(n) if n.draining && n.healthy => format!("{gone} drained"),
        Some(n) => format!("{gone} unhealthy: {}", n.detail),
        None => format!("{gone} is not a node of this service"),
    };
    Some(Decision {
        term: row.decision.term.saturating_add(1),
        node: Some(next.to_owned()),
        reason: format!(
            "{why}; {next} takes over (the successor term {} named)",
            row.decision.term
        ),
        decided_at_ms: now_ms(),
    })
}

/// The term a new decision naming `node` writes over `row` (`None`: there is none yet), above
/// every term in `known`: the reserved `row.term + 1` only for the row's successor (and only
/// if no known decision gives that term another node), else `row.term + 2` or higher.
pub fn next_term(row: Option<&Row>, node: Option<&str>, known: &[&Decision]) -> u64 {
    let newest = known.iter().map(|d| d.term).max().unwrap_or(0);
    let Some(row) = row else {
        return newest.saturating_add(1);
    };
    let reserved = row.decision.term.saturating_add(1);
    let successor = node.is_some() && node == row.next.as_deref();
    let clear = known
        .iter()
        .all(|d| d.term < reserved || (d.term == reserved && d.node.as_deref() == node));
    if successor && clear {
        reserved
    } else {
        reserved.saturating_add(1).max(newest.saturating_add(1))
    }
}

/// The decider's store for a service kept as `decisions`.
pub(crate) fn store_for(
    decisions: Decisions,
    service: &str,
    agent: &str,
    check: Option<&crate::config::HealthCheck>,
) -> Store {
    match (decisions, check.map(|c| &c.kind)) {
        (Decisions::Cluster, Some(crate::config::CheckKind::Mysql { user, password })) => {
            let timeout = check.map_or(Duration::from_secs(2), |c| {
                c.timeout.max(Duration::from_secs(2))
            });
            Store::Cluster(Box::new(ClusterStore::new(
                service, agent, user, password, timeout,
            )))
        }
        _ => Store::Local,
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, healthy: bool, index: Option<u32>) -> Candidate {
        Candidate {
            name: name.into(),
            healthy,
            draining: false,
            wsrep_local_index: index,
            detail: if healthy {
                "200 healthy".into()
            } else {
                "503".into()
            },
        }
    }

    fn at(term: u64, node: Option<&str>) -> Decision {
        Decision {
            term,
            node: node.map(str::to_owned),
            ..Decision::default()
        }
    }

    #[test]
    fn the_lowest_index_wins_else_config_order() {
        let nodes = [
            node("n1", true, Some(2)),
            node("n2", true, Some(0)),
            node("n3", true, None),
        ];
        let (to, why) = next(&at(0, None), &nodes, None).unwrap();
        assert_eq!(to.as_deref(), Some("n2"));
        assert_eq!(why, "n2 chosen (lowest wsrep_local_index 0)");
        let nodes = [
            node("n1", false, None),
            node("n2", true, None),
            node("n3", true, None),
        ];
        let (to, why) = next(&at(0, None), &nodes, None).unwrap();
        assert_eq!(to.as_deref(), Some("n2"));
        assert_eq!(why, "n2 chosen (first fit node in config order)");
    }

    #[test]
    fn the_active_node_stays_while_fit() {
        // n1 has the lower index but n2 is active and healthy: no failback.
        let nodes = [node("n1", true, Some(0)), node("n2", true, Some(1))];
        assert_eq!(next(&at(4, Some("n2")), &nodes, None), None);
        let nodes = [node("n1", true, Some(0)), node("n2", false, Some(1))];
        let (to, why) = next(&at(4, Some("n2")), &nodes, None).unwrap();
        assert_eq!(to.as_deref(), Some("n1"));
        assert_eq!(
            why,
            "n2 unhealthy: 503; n1 chosen (lowest wsrep_local_index 0)"
        );
    }

    #[test]
    fn drain_moves_away_and_activate_moves_back() {
        let mut nodes = vec![node("n1", true, Some(0)), node("n2", true, Some(1))];
        nodes[0].draining = true;
        let (to, why) = next(&at(1, Some("n1")), &nodes, None).unwrap();
        assert_eq!(to.as_deref(), Some("n2"));
        assert!(why.starts_with("n1 drained; n2 chosen"), "{why}");
        // A drained or unhealthy node cannot be activated; a fit one can.
        assert_eq!(next(&at(2, Some("n2")), &nodes, Some("n1")), None);
        nodes[0].draining = false;
        let (to, why) = next(&at(2, Some("n2")), &nodes, Some("n1")).unwrap();
        assert_eq!(
            (to.as_deref(), why.as_str()),
            (Some("n1"), "operator activated n1")
        );
        assert_eq!(next(&at(3, Some("n1")), &nodes, Some("n1")), None);
    }

    #[test]
    fn no_fit_node_names_every_reason() {
        let mut nodes = vec![node("n1", false, None), node("n2", true, None)];
        nodes[1].draining = true;
        nodes[0].detail = "503 not synced".into();
        let (to, why) = next(&at(1, Some("n2")), &nodes, None).unwrap();
        assert_eq!(to, None);
        assert_eq!(
            why,
            "n2 drained; no healthy node: n1 503 not synced, n2 drained"
        );
        assert_eq!(next(&at(2, None), &nodes, None), None, "none stays none");
    }

    fn row(term: u64, node: Option<&str>, next: Option<&str>) -> Row {
        Row {
            decision: at(term, node),
            next: next.map(str::to_owned),
        }
    }

    #[test]
    fn the_successor_is_the_next_pick_without_the_active_node() {
        let nodes = [
            node("n1", true, Some(0)),
            node("n2", true, Some(2)),
            node("n3", true, Some(1)),
        ];
        assert_eq!(successor(&nodes, Some("n1")).as_deref(), Some("n3"));
        assert_eq!(successor(&nodes, Some("n3")).as_deref(), Some("n1"));
        assert_eq!(successor(&nodes[..1], Some("n1")), None);
    }

    #[test]
    fn an_unfit_active_node_is_taken_over_by_a_fit_successor() {
        let r = row(4, Some("n1"), Some("n3"));
        let mut nodes = vec![
            node("n1", false, Some(0)),
            node("n2", true, Some(2)),
            node("n3", true, Some(1)),
        ];
        let own = at(4, Some("n1"));
        let got = take_over(&r, &own, None, &nodes).expect("a take-over");
        assert_eq!((got.term, got.node.as_deref()), (5, Some("n3")));
        assert!(
            got.reason.starts_with("n1 unhealthy: 503; n3 takes over"),
            "{}",
            got.reason
        );
        // Already taken over, or something newer known: nothing to do.
        assert_eq!(take_over(&r, &got, None, &nodes), None);
        assert_eq!(take_over(&r, &own, Some(&at(6, Some("n2"))), &nodes), None);
        // The successor is not fit here: the slow path (a write) decides.
        nodes[2].healthy = false;
        assert_eq!(take_over(&r, &own, None, &nodes), None);
        // The active node is fit: nothing moves.
        nodes[0].healthy = true;
        nodes[2].healthy = true;
        assert_eq!(take_over(&r, &own, None, &nodes), None);
    }

    #[test]
    fn the_reserved_term_is_only_ever_the_successors() {
        let r = row(4, Some("n1"), Some("n3"));
        let own = at(4, Some("n1"));
        assert_eq!(next_term(Some(&r), Some("n3"), &[&own]), 5);
        assert_eq!(next_term(Some(&r), Some("n2"), &[&own]), 6, "skips term 5");
        assert_eq!(next_term(Some(&r), None, &[&own]), 6);
        // Taken over already: the write keeps that term.
        assert_eq!(next_term(Some(&r), Some("n3"), &[&at(5, Some("n3"))]), 5);
        // A known term 5 with another node (a re-created table) is never reused.
        assert_eq!(next_term(Some(&r), Some("n3"), &[&at(5, Some("n2"))]), 6);
        assert_eq!(next_term(Some(&r), Some("n3"), &[&at(9, Some("n2"))]), 10);
        assert_eq!(next_term(None, Some("n1"), &[&at(3, None)]), 4);
        assert_eq!(
            next_term(Some(&row(4, Some("n1"), None)), Some("n3"), &[]),
            6
        );
    }

    #[tokio::test]
    async fn records_survive_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(&dir.path().join("nested"), "orders");
        assert_eq!(store.load().await.unwrap(), None);
        let record = Record {
            decision: Decision {
                term: 7,
                node: Some("n2".into()),
                reason: "n1 unhealthy".into(),
                decided_at_ms: 1,
            },
            traffic_enabled: false,
            message: "maintenance".into(),
            draining: vec!["n3".into()],
        };
        store.save(&record).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(record));
        std::fs::write(store.path(), b"{not json").unwrap();
        assert!(matches!(
            store.load().await,
            Err(StoreError::Corrupt { .. })
        ));
    }
}
