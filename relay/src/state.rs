//! What every task of a running relay shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use postern_common::events::Events;
use postern_common::mysql::server::{ConnIds, Gate, Greetings};
use postern_common::tls::{self, Material, TlsError};
use postern_common::transport::quic;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::listen::Running;
use crate::registry::Registry;

/// The TLS of the service listeners, made from the relay's certificate; a reload that renews
/// it replaces both for new handshakes.
#[derive(Clone)]
pub(crate) struct Acceptors {
    /// TLS-first listeners: a client certificate is required.
    pub(crate) tls: TlsAcceptor,
    /// MySQL-native listeners: the front end asks for the certificate itself.
    pub(crate) mysql: TlsAcceptor,
}

impl Acceptors {
    /// The acceptors of `material`.
    pub(crate) fn new(material: &Material) -> Result<Self, TlsError> {
        Ok(Self {
            tls: TlsAcceptor::from(Arc::new(tls::listener_server(material)?)),
            mysql: TlsAcceptor::from(Arc::new(tls::mysql_listener_server(material)?)),
        })
    }
}

/// State shared by every task of a relay.
pub(crate) struct Shared {
    /// The configuration in force: replaced whole by a reload ([`Shared::config`]).
    config: RwLock<Arc<Config>>,
    /// The connected agents.
    pub(crate) registry: Registry,
    /// The services' nodes and decisions, and the connections carried to them.
    pub(crate) cluster: Cluster,
    /// Who may use which service, and the revocation lists.
    pub(crate) access: Arc<Access>,
    /// The Open Service Broker API, when `broker` is configured.
    pub(crate) broker: Option<Arc<crate::broker::Broker>>,
    /// Per-service limits of authorised connections.
    limits: RwLock<HashMap<String, Arc<Semaphore>>>,
    /// The process-wide limit of connections and sessions (`max_connections`).
    pub(crate) connection_slots: Arc<Semaphore>,
    /// Per-service gates of MySQL-native connections still in their handshake.
    gates: RwLock<HashMap<String, Arc<Gate>>>,
    /// The greeting templates of MySQL services whose TLS ends here.
    pub(crate) greetings: Greetings,
    /// The connection ids this relay hands out in its own greetings.
    pub(crate) ids: ConnIds,
    /// Where refusals and opened and closed tunnels go.
    pub(crate) events: Events,
    /// Bytes carried, summed from the events sink for `/metrics`.
    pub(crate) traffic: crate::http::metrics::Traffic,
    /// The service listeners' TLS.
    acceptors: RwLock<Acceptors>,
    /// The QUIC endpoint, when `listen.quic` is set.
    pub(crate) quic: Option<quic::Server>,
    /// The service listeners that run, so a reload can add and stop them.
    pub(crate) listeners: Mutex<Vec<Running>>,
    /// Held by a reload from start to end: one at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
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
    /// The certificates this relay presents and trusts, with their expiry.
    pub(crate) fn certificates(&self) -> Vec<tls::expiry::Expiry> {
        tls::expiry::of_material(&self.config().tls, "relay")
    }

    /// The state of a relay with `config`, its listeners' TLS and its QUIC endpoint.
    pub(crate) fn new(
        config: Config,
        broker: Option<Arc<crate::broker::Broker>>,
        acceptors: Acceptors,
        quic: Option<quic::Server>,
    ) -> Self {
        let limits = config
            .services
            .values()
            .map(|s| (s.name.clone(), Arc::new(Semaphore::new(s.max_connections))))
            .collect();
        let gates = config
            .services
            .keys()
            .map(|name| (name.clone(), Arc::new(Gate::new())))
            .collect();
        Self {
            access: Arc::new(Access::new(&config)),
            broker,
            cluster: Cluster::new(config.services.keys()),
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            config: RwLock::new(Arc::new(config)),
            registry: Registry::default(),
            limits: RwLock::new(limits),
            gates: RwLock::new(gates),
            greetings: Greetings::new(),
            ids: ConnIds::new(),
            events: Events::new(),
            traffic: Default::default(),
            acceptors: RwLock::new(acceptors),
            quic,
            listeners: Mutex::default(),
            reloading: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            connections: TaskTracker::new(),
            tasks: TaskTracker::new(),
            next_conn: AtomicU64::new(0),
        }
    }

    /// The configuration in force. A connection takes it once and keeps it: a reload changes
    /// what later connections see.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `config` in force; returns the one it replaces.
    pub(crate) fn replace_config(&self, config: Config) -> Arc<Config> {
        let mut current = self.config.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, Arc::new(config))
    }

    /// The limit of authorised connections of `service`.
    pub(crate) fn limit(&self, service: &str) -> Option<Arc<Semaphore>> {
        self.limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
            .cloned()
    }

    /// The handshake gate of `service`.
    pub(crate) fn gate(&self, service: &str) -> Option<Arc<Gate>> {
        self.gates
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
            .cloned()
    }

    /// Makes the per-service limits and gates those of `config`: new services get theirs, gone
    /// ones lose them, and a changed `max_connections` moves the limit (a lower one takes
    /// effect as connections end: none is cut for it).
    pub(crate) fn resize(&self, old: &Config, config: &Config) {
        let mut limits = self.limits.write().unwrap_or_else(PoisonError::into_inner);
        limits.retain(|name, _| config.services.contains_key(name));
        for svc in config.services.values() {
            match (limits.get(&svc.name), old.services.get(&svc.name)) {
                (Some(limit), Some(before)) => {
                    resize(limit, before.max_connections, svc.max_connections)
                }
                _ => {
                    limits.insert(
                        svc.name.clone(),
                        Arc::new(Semaphore::new(svc.max_connections)),
                    );
                }
            }
        }
        drop(limits);
        let mut gates = self.gates.write().unwrap_or_else(PoisonError::into_inner);
        gates.retain(|name, _| config.services.contains_key(name));
        for name in config.services.keys() {
            gates.entry(name.clone()).or_default();
        }
        drop(gates);
        resize(
            &self.connection_slots,
            old.max_connections,
            config.max_connections,
        );
    }

    /// The service listeners' TLS for new handshakes.
    pub(crate) fn acceptors(&self) -> Acceptors {
        self.acceptors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `acceptors` those of new handshakes.
    pub(crate) fn set_acceptors(&self, acceptors: Acceptors) {
        *self
            .acceptors
            .write()
            .unwrap_or_else(PoisonError::into_inner) = acceptors;
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

/// Moves the limit of `semaphore` from `from` to `to` permits. Permits held stay held: a lower
/// limit takes away free ones now and the rest as they come back.
pub(crate) fn resize(semaphore: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        semaphore.add_permits(to - from);
    } else if from > to {
        let semaphore = semaphore.clone();
        let mut owed = from - to;
        owed -= semaphore.forget_permits(owed);
        if owed > 0 {
            // The rest are in use: take them as they are released.
            tokio::spawn(async move {
                if let Ok(p) = semaphore.acquire_many(owed as u32).await {
                    p.forget();
                }
            });
        }
    }
}
