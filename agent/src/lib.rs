//! The Postern agent: runs next to the database, dials out to the relay, and connects the
//! relay's streams to local backends. Also home of `connect`, the client side for laptops.
//!
//! * [`session`]: the relay session (dial, hello, heartbeats, reconnect with backoff).
//! * [`forward`]: one stream from the relay to a backend; for services whose TLS ends here,
//!   the MySQL front end with the policy the relay sent (`e2e`).
//! * [`connect`]: a local port leading to a service through the relay.

pub mod cli;
pub mod config;
pub mod connect;
pub mod dial;
mod e2e;
pub mod forward;
pub mod session;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use session::Status;

/// A configured agent.
pub struct Agent {
    config: Arc<Config>,
    status: watch::Sender<Status>,
}

impl Agent {
    /// Prepares an agent; nothing is dialled until [`run`](Self::run).
    pub fn new(config: Config) -> Self {
        let (status, _) = watch::channel(Status::Disconnected("not started".into()));
        Self {
            config: Arc::new(config),
            status,
        }
    }

    /// Watches the agent's status.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        session::run(self.config, self.status, shutdown).await;
    }
}
