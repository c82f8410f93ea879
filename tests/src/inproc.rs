//! The relay, the agent and `connect` running in the test's own process and runtime, on
//! ephemeral ports they hand back.
//!
//! A panic in any of their tasks fails the test: [`crate::panics`] records it, and
//! `stop()` and drop check.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use postern_agent::config::{RelayTarget, TransportChoice, WebsocketSettings};
use postern_agent::connect::{Connect, Options};
use postern_agent::dial::Dialer;
use postern_agent::{Agent, Status};
use postern_relay::Relay;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, RelayConfig};
use crate::{TestPki, eventually, panics};

/// How long an agent may take to connect, and a relay to see it.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// A relay running in this process.
pub struct RelayRun {
    /// The QUIC address, if it listens for QUIC.
    pub quic: Option<SocketAddr>,
    /// The HTTP address, if configured.
    pub http: Option<SocketAddr>,
    /// Inspects the relay.
    pub handle: postern_relay::Handle,
    /// Service `listen` addresses (MySQL-native for MySQL services).
    pub services: Vec<(String, SocketAddr)>,
    /// Service `tls_listen` addresses (TLS-first).
    pub tls_services: Vec<(String, SocketAddr)>,
    task: Task,
}

impl RelayRun {
    /// Writes `config` to `path` and starts the relay in the environment `env` (e.g. Cloud
    /// Foundry's, to run it as an instance of an app).
    pub async fn start(path: &Path, config: &RelayConfig, env: &[(&str, &str)]) -> Self {
        panics::watch();
        let config = config.load_with(path, env);
        let names: Vec<String> = config.services.keys().cloned().collect();
        let relay = Relay::bind(config).await.expect("bind relay");
        let services = names
            .iter()
            .filter_map(|n| relay.service_addr(n).map(|a| (n.clone(), a)))
            .collect();
        let tls_services = names
            .iter()
            .filter_map(|n| relay.tls_service_addr(n).map(|a| (n.clone(), a)))
            .collect();
        let quic = relay.quic_addr();
        let http = relay.http_addr();
        let handle = relay.handle();
        let task = Task::spawn(|shutdown| relay.run(shutdown));
        Self {
            quic,
            http,
            handle,
            services,
            tls_services,
            task,
        }
    }

    /// The `listen` address of `service` (MySQL-native for MySQL services).
    pub fn service(&self, name: &str) -> SocketAddr {
        find(&self.services, name, "listener")
    }

    /// The TLS-first `tls_listen` address of `service`.
    pub fn tls_service(&self, name: &str) -> SocketAddr {
        find(&self.tls_services, name, "TLS-first listener")
    }

    /// Waits until agent `name` is registered.
    pub async fn wait_agent(&self, name: &str) {
        let h = self.handle.clone();
        eventually(CONNECT_WITHIN, &format!("agent {name} to register"), || {
            let found = h.agents().iter().any(|a| a.name == name);
            async move { found.then_some(()) }
        })
        .await
    }

    /// Stops the relay and waits for it; fails the test if a task of it panicked.
    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// An agent running in this process.
pub struct AgentRun {
    /// The agent's status.
    pub status: watch::Receiver<Status>,
    task: Task,
}

impl AgentRun {
    /// Writes `config` to `path` and starts the agent.
    pub fn start(path: &Path, config: &AgentConfig) -> Self {
        panics::watch();
        let agent = Agent::new(config.load(path));
        let status = agent.status();
        let task = Task::spawn(|shutdown| agent.run(shutdown));
        Self { status, task }
    }

    /// Waits until the agent is in session with a relay. The relay registers an agent before
    /// it welcomes it, so clients can be routed to it from then on.
    pub async fn wait_connected(&mut self) {
        tokio::time::timeout(
            CONNECT_WITHIN,
            self.status
                .wait_for(|s| matches!(s, Status::Connected { .. })),
        )
        .await
        .expect("agent connects in time")
        .expect("agent status channel open");
    }

    /// Whether the agent is in session now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.status.borrow(), Status::Connected { .. })
    }

    /// The transport of the current session, if any.
    pub fn transport(&self) -> Option<postern_common::transport::TransportKind> {
        match &*self.status.borrow() {
            Status::Connected { transport, .. } => Some(*transport),
            Status::Disconnected(_) => None,
        }
    }

    /// Stops the agent and waits for it; fails the test if a task of it panicked.
    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// How `connect` reaches the relay.
#[derive(Debug, Clone)]
pub struct ConnectTo {
    /// The relay's addresses.
    pub target: RelayTarget,
    /// Which transport to use.
    pub transport: TransportChoice,
    /// WebSocket settings.
    pub websocket: WebsocketSettings,
}

impl ConnectTo {
    /// Over QUIC to `relay`.
    pub fn quic(relay: SocketAddr) -> Self {
        Self {
            target: RelayTarget {
                quic: Some(format!("quic://{relay}").parse().expect("relay url")),
                websocket: None,
            },
            transport: TransportChoice::Quic,
            websocket: WebsocketSettings::default(),
        }
    }

    /// Over WebSocket to `url`.
    pub fn websocket(url: &str) -> Self {
        Self {
            target: RelayTarget {
                quic: None,
                websocket: Some(url.parse().expect("relay url")),
            },
            transport: TransportChoice::Websocket,
            websocket: WebsocketSettings::default(),
        }
    }
}

/// A `connect` listener running in this process.
pub struct ConnectRun {
    /// Where local clients connect.
    pub addr: SocketAddr,
    task: Task,
}

impl ConnectRun {
    /// Starts `connect` for MySQL service `service` as client `client`, over QUIC to `relay`.
    pub async fn start(pki: &TestPki, relay: SocketAddr, client: &str, service: &str) -> Self {
        Self::start_with(pki, ConnectTo::quic(relay), client, service, true)
            .await
            .expect("connect binds")
    }

    /// Starts `connect` for `service` as `client` over `to`; `mysql`: refusals are MySQL ERR
    /// packets (false for `protocol: tcp` services).
    pub async fn start_with(
        pki: &TestPki,
        to: ConnectTo,
        client: &str,
        service: &str,
        mysql: bool,
    ) -> anyhow::Result<Self> {
        panics::watch();
        let dialer = Dialer::new(
            pki.client_material(client),
            Some("localhost".into()),
            to.transport,
            to.websocket,
        )
        .map_err(anyhow::Error::msg)?;
        let opts = Options {
            dialer,
            relay: to.target,
            service: service.into(),
            listen: "127.0.0.1:0".parse().expect("literal"),
            mysql,
        };
        let connect = Connect::bind(opts).await?;
        let addr = connect.local_addr();
        let task = Task::spawn(|shutdown| connect.run(shutdown));
        Ok(Self { addr, task })
    }

    /// The `mariadb` client aimed at this port (plaintext: the tunnel is encrypted).
    pub fn cli(&self) -> crate::client::Cli {
        crate::client::Cli::at(self.addr.port())
    }

    /// A mysql_async URL for root at this port. `prefer_socket=false`: by default mysql_async
    /// asks a local server for its Unix socket and moves the connection there, which would take
    /// it out of the tunnel.
    pub fn url(&self) -> String {
        format!(
            "mysql://root@127.0.0.1:{}/mysql?prefer_socket=false",
            self.addr.port()
        )
    }

    /// Stops `connect`; fails the test if a task of it panicked.
    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// A spawned run with its shutdown token. Dropping it asks the run to stop and fails the test
/// if a task of the runtime panicked.
struct Task {
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Task {
    fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(shutdown.clone()));
        Self {
            shutdown,
            handle: Some(handle),
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take()
            && let Err(e) = h.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        panics::check();
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.shutdown.cancel();
        panics::check();
    }
}

fn find(list: &[(String, SocketAddr)], name: &str, what: &str) -> SocketAddr {
    list.iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| *a)
        .unwrap_or_else(|| panic!("service {name} has no {what}"))
}
