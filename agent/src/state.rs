//! What every task of a running agent shares, and what the agent reports about itself.

use std::sync::{Arc, PoisonError, RwLock};

use postern_common::transport::TransportKind;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::Backends;
use crate::config::Config;
use crate::dial::Dialer;
use crate::e2e::FrontEnd;

/// What the agent is doing, for tests, health checks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not connected (yet, or any more); the reason of the last failure.
    Disconnected(String),
    /// In session with a relay.
    Connected {
        /// The relay instance's name.
        relay_instance: String,
        /// The transport in use.
        transport: TransportKind,
        /// Services the relay accepted.
        accepted: Vec<String>,
    },
}

/// The state of a running agent, shared by its session loops and forwards.
pub(crate) struct AgentState {
    /// The config in force: replaced whole by a reload ([`AgentState::config`]).
    config: RwLock<Arc<Config>>,
    /// How relays are dialled (the agent's certificate among it): replaced with the config.
    dialer: RwLock<Arc<Dialer>>,
    /// Bumped by every reload that changes what the agent says in its hello (services,
    /// certificate, how it dials): each relay session then opens its successor, make before
    /// break, and finishes its own streams.
    pub(crate) rehello: watch::Sender<u64>,
    /// Bumped by every reload: the relays to hold sessions with may have changed.
    pub(crate) reloaded: watch::Sender<u64>,
    pub(crate) status: watch::Sender<Status>,
    /// The MySQL front end for services whose TLS ends here (templates, ids, handshake
    /// gates), with the agent's events sink: one for every relay session.
    pub(crate) front: FrontEnd,
    pub(crate) backends: Backends,
    /// Every stream being forwarded, whatever its session: shutdown waits for them.
    pub(crate) forwards: TaskTracker,
    /// Cancelled when shutdown's grace period is over: sessions still finishing their streams
    /// close, and the streams with them.
    pub(crate) abort: CancellationToken,
}

impl AgentState {
    pub(crate) fn new(
        config: Arc<Config>,
        dialer: Dialer,
        status: watch::Sender<Status>,
        front: FrontEnd,
        backends: Backends,
    ) -> Self {
        Self {
            config: RwLock::new(config),
            dialer: RwLock::new(Arc::new(dialer)),
            rehello: watch::Sender::new(0),
            reloaded: watch::Sender::new(0),
            status,
            front,
            backends,
            forwards: TaskTracker::new(),
            abort: CancellationToken::new(),
        }
    }

    /// The config in force now. A stream keeps the one it started with.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How relays are dialled now.
    pub(crate) fn dialer(&self) -> Arc<Dialer> {
        self.dialer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts a reloaded config and its dialer in force.
    pub(crate) fn replace(&self, config: Arc<Config>, dialer: Option<Dialer>) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
        if let Some(d) = dialer {
            *self.dialer.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(d);
        }
    }
}
