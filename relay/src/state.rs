//! What every task of a running relay shares.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use postern_common::events::Events;
use postern_common::mysql::server::{ConnIds, Gate, Greetings};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::registry::Registry;

/// State shared by every task of a relay.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The connected agents.
    pub(crate) registry: Registry,
    /// The services' nodes and decisions, and the connections carried to them.
    pub(crate) cluster: Cluster,
    /// Who may use which service, and the revocation lists.
    pub(crate) access: Arc<Access>,
    /// The Open Service Broker API, when `broker` is configured.
    pub(crate) broker: Option<Arc<crate::broker::Broker>>,
    /// Per-service limits of authorised connections.
    pub(crate) limits: HashMap<String, Arc<Semaphore>>,
    /// The process-wide limit of connections and sessions (`max_connections`).
    pub(crate) connection_slots: Arc<Semaphore>,
    /// Per-service gates of MySQL-native connections still in their handshake.
    pub(crate) gates: HashMap<String, Gate>,
    /// The greeting templates of MySQL services whose TLS ends here.
    pub(crate) greetings: Greetings,
    /// The connection ids this relay hands out in its own greetings.
    pub(crate) ids: ConnIds,
    /// Where refusals and opened and closed tunnels go.
    pub(crate) events: Events,
    /// Bytes carried, summed from the events sink for `/metrics`.
    pub(crate) traffic: crate::http::metrics::Traffic,
    /// Cancelled when the relay starts to drain: listeners stop accepting, agents are told
    /// (so they open their next session elsewhere first), `connect` clients' new streams are
    /// refused as `shutting_down`. Open connections go on.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the grace period is over, or every connection has ended: sessions close.
    pub(crate) abort: CancellationToken,
    /// Client connections (and `connect` streams): draining waits for these.
    pub(crate) connections: TaskTracker,
    /// Sessions, listeners and housekeeping: they end at `abort`.
    pub(crate) tasks: TaskTracker,
    next_conn: AtomicU64,
}

impl Shared {
    /// The state of a relay with `config`.
    pub(crate) fn new(config: Config, broker: Option<Arc<crate::broker::Broker>>) -> Self {
        let limits = config
            .services
            .values()
            .map(|s| (s.name.clone(), Arc::new(Semaphore::new(s.max_connections))))
            .collect();
        let gates = config
            .services
            .keys()
            .map(|name| (name.clone(), Gate::new()))
            .collect();
        Self {
            access: Arc::new(Access::new(&config)),
            broker,
            cluster: Cluster::new(config.services.keys()),
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            registry: Registry::default(),
            limits,
            gates,
            greetings: Greetings::new(),
            ids: ConnIds::new(),
            events: Events::new(),
            traffic: Default::default(),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            connections: TaskTracker::new(),
            tasks: TaskTracker::new(),
            next_conn: AtomicU64::new(0),
        }
    }

    /// Numbers client connections; the count is also how many this relay has opened.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// How many client connections this relay has sent to an agent so far.
    pub(crate) fn connections_opened(&self) -> u64 {
        self.next_conn.load(Ordering::Relaxed)
    }
}
