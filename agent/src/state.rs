//! What every task of a running agent shares, and what the agent reports about itself.

use std::sync::Arc;

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
    pub(crate) config: Arc<Config>,
    pub(crate) dialer: Dialer,
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
