//! The end-to-end test harness: real `mariadbd` instances, certificates made by Postern's own
//! PKI code, relays and agents in-process or as real processes, all on ephemeral ports.
//!
//! Nothing here sleeps for readiness: every wait polls a real condition with a deadline
//! ([`eventually`]).

pub mod client;
pub mod mariadb;
pub mod pki;
pub mod procs;
pub mod router;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use postern_agent::config::{RelayTarget, TransportChoice, WebsocketSettings};
use postern_agent::connect::{Connect, Options};
use postern_agent::dial::Dialer;
use postern_agent::{Agent, Status};
use postern_common::transport::addr::RelayUrl;
use postern_relay::Relay;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use mariadb::MariaDb;
pub use pki::TestPki;

/// Installs a test log subscriber once (RUST_LOG controls it; quiet by default).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it returns `Some`, or panics after `within` with `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A relay running in this process.
pub struct RelayRun {
    /// The QUIC address.
    pub quic: SocketAddr,
    /// The HTTP address, if configured.
    pub http: Option<SocketAddr>,
    /// Inspects the relay.
    pub handle: postern_relay::Handle,
    /// Service `listen` addresses (MySQL-native for MySQL services).
    pub services: Vec<(String, SocketAddr)>,
    /// Service `tls_listen` addresses (TLS-first).
    pub tls_services: Vec<(String, SocketAddr)>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RelayRun {
    /// Parses `yaml` (written as `dir/relay.yaml`) and starts the relay.
    pub async fn start(dir: &Path, yaml: &str) -> Self {
        Self::start_on(dir, yaml, None).await
    }

    /// Starts the relay as instance `platform` of a Cloud Foundry app.
    pub async fn start_on(
        dir: &Path,
        yaml: &str,
        platform: Option<postern_relay::config::CfInstance>,
    ) -> Self {
        let path = dir.join("relay.yaml");
        std::fs::write(&path, yaml).expect("write relay.yaml");
        let mut config = postern_relay::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        if let Some(p) = &platform {
            config.instance = p.name();
        }
        config.platform = platform;
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
        let quic = relay.quic_addr().expect("the test relay listens for QUIC");
        let http = relay.http_addr();
        let handle = relay.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self {
            quic,
            http,
            handle,
            services,
            tls_services,
            shutdown,
            task,
        }
    }

    /// The `listen` address of `service` (MySQL-native for MySQL services).
    pub fn service(&self, name: &str) -> SocketAddr {
        self.services
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("service {name} has no listener"))
    }

    /// The TLS-first `tls_listen` address of `service`.
    pub fn tls_service(&self, name: &str) -> SocketAddr {
        self.tls_services
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("service {name} has no TLS-first listener"))
    }

    /// Waits until agent `name` is registered.
    pub async fn wait_agent(&self, name: &str) {
        let h = self.handle.clone();
        eventually(
            Duration::from_secs(10),
            &format!("agent {name} to register"),
            || {
                let found = h.agents().iter().any(|a| a.name == name);
                async move { found.then_some(()) }
            },
        )
        .await
    }

    /// Stops the relay and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// An agent running in this process.
pub struct AgentRun {
    /// The agent's status.
    pub status: watch::Receiver<Status>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AgentRun {
    /// Parses `yaml` (written as `dir/agent.yaml`) and starts the agent.
    pub fn start(dir: &Path, yaml: &str) -> Self {
        let path = dir.join("agent.yaml");
        std::fs::write(&path, yaml).expect("write agent.yaml");
        let config = postern_agent::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let agent = Agent::new(config);
        let status = agent.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        Self {
            status,
            shutdown,
            task,
        }
    }

    /// Waits until the agent is in session with a relay.
    pub async fn wait_connected(&mut self) {
        let status = &mut self.status;
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| matches!(s, Status::Connected { .. })),
        )
        .await
        .expect("agent connects within 10s")
        .expect("agent status channel open");
    }

    /// Stops the agent and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A `connect` listener running in this process.
pub struct ConnectRun {
    /// Where local clients connect.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl ConnectRun {
    /// Starts `connect` for `service` as client `client`, over QUIC to `relay`.
    pub async fn start(pki: &TestPki, relay: SocketAddr, client: &str, service: &str) -> Self {
        let target = RelayTarget {
            quic: Some(
                format!("quic://{relay}")
                    .parse::<RelayUrl>()
                    .expect("relay url"),
            ),
            websocket: None,
        };
        Self::start_with(
            pki,
            target,
            TransportChoice::Auto,
            WebsocketSettings::default(),
            client,
            service,
        )
        .await
        .expect("connect binds")
    }

    /// Starts `connect` with any relay target and transport settings.
    pub async fn start_with(
        pki: &TestPki,
        target: RelayTarget,
        transport: TransportChoice,
        websocket: WebsocketSettings,
        client: &str,
        service: &str,
    ) -> anyhow::Result<Self> {
        let dialer = Dialer::new(
            pki.client_material(client),
            Some("localhost".into()),
            transport,
            websocket,
        )
        .map_err(anyhow::Error::msg)?;
        let opts = Options {
            dialer,
            relay: target,
            service: service.into(),
            listen: "127.0.0.1:0".parse().expect("literal"),
            mysql: true,
        };
        let connect = Connect::bind(opts).await?;
        let addr = connect.local_addr();
        let shutdown = CancellationToken::new();
        tokio::spawn(connect.run(shutdown.clone()));
        Ok(Self { addr, shutdown })
    }
}

impl Drop for ConnectRun {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Relay YAML for one service `svc` served by agent `agent`, usable by `clients`, with a
/// MySQL-native and a TLS-first listener on ephemeral ports and a 1 s heartbeat (so dead peers
/// are found quickly). Further service keys can be appended (indented by four spaces).
pub fn relay_yaml(pki: &TestPki, agent: &str, svc: &str, clients: &[&str]) -> String {
    format!(
        "listen:\n  quic: 127.0.0.1:0\n  http: 127.0.0.1:0\n{tls}heartbeat_interval: 1s\nhandshake_timeout: 5s\nagents:\n  {agent}:\n    services: [{svc}]\nservices:\n  {svc}:\n    listen: 127.0.0.1:0\n    tls_listen: 127.0.0.1:0\n    clients: [{clients}]\n",
        tls = pki.tls_yaml("server-relay"),
        clients = clients.join(", "),
    )
}

/// Agent YAML dialling `relay` and offering `svc` at `backend`.
pub fn agent_yaml(
    pki: &TestPki,
    agent: &str,
    relay: SocketAddr,
    svc: &str,
    backend: &str,
) -> String {
    format!(
        "relay: quic://{relay}\nserver_name: localhost\n{tls}services:\n  {svc}:\n    backend: {backend}\n    connect_timeout: 2s\n",
        tls = pki.tls_yaml(&format!("agent-{agent}")),
    )
}

/// A minimal HTTP/1.1 GET: returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
