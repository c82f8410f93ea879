//! One relay (or a fleet), an agent and a private MariaDB, with certificates, started the way a
//! test says; every e2e module sets up through this, so no test types out a stack by hand.
//!
//! ```ignore
//! let s = Stack::builder()
//!     .clients(["alice", "bob"])
//!     .mariadb()
//!     .handshake_timeout(Duration::from_secs(2))
//!     .relay(|r| r.service_mut("orders").max_handshakes = Some(1))
//!     .start()
//!     .await;
//! let out = s.cli(Some("alice")).ok("SELECT 1");
//! s.stop().await;
//! ```
//!
//! Defaults: service `orders` for client `alice`, offered by agent `db1`; relay and agent
//! in-process, over QUIC, 1 s heartbeats, 5 s handshake deadline; every port ephemeral. With
//! [`Transport::Websocket`] the agent and `connect` go through nginx (TLS-terminating, as a
//! platform router) to the relays' HTTP listeners; with [`Transport::DirectWebsocket`] straight
//! to the relay's. Relays read their config in the environment the test gives
//! ([`StackBuilder::relay_env`], and Cloud Foundry's with [`StackBuilder::cloud_foundry`]),
//! never the test machine's own.
//!
//! For failover, a stack's MySQL services can have several nodes instead of one MariaDB:
//! [`StackBuilder::galera`] (a real three-node cluster, the agent's `mysql` check logging in as
//! [`MONITOR_USER`]) or [`StackBuilder::http_nodes`] (plain
//! `mariadbd`s, each with a [`HealthServer`] the test switches, the agent's `http` check). Each
//! node answers `SELECT @@wsrep_node_name` with its name (`n1`, `n2`, ...), so
//! [`Stack::which_node`] tells where a new connection lands. [`StackBuilder::api`] turns on the
//! relays' `/v0/*`, dashboard and metrics, read with [`Stack::api`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mysql_async::OptsBuilder;
use postern_common::pki::Kind;
use postern_relay::config::{Protocol, TlsTermination};

use crate::api::Api;
use crate::client::{Cli, driver_opts};
use crate::config::{
    AgentConfig, AgentTransport, Check, CheckKind, RelayConfig, RelaySpec, ServiceNode, ServiceTls,
};
use crate::galera::{APP_PASSWORD, APP_USER, Galera, MONITOR_PASSWORD, MONITOR_USER};
use crate::health::HealthServer;
use crate::inproc::{AgentRun, ConnectRun, ConnectTo, RelayRun};
use crate::procs::{AgentProc, LogMark, RelayProc};
use crate::router::{Nginx, Upstreams};
use crate::{MariaDb, TestPki, panics};

/// How agents and `connect` reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC, straight to the relay.
    Quic,
    /// WebSocket through nginx (which ends the outer TLS, as a platform router does).
    Websocket,
    /// WebSocket straight to the (first) relay's HTTP listener, in the clear (`ws://`).
    DirectWebsocket,
}

/// Where a part runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// In the test's process and runtime.
    InProcess,
    /// As the real binary (to kill it or read its log).
    Process,
    /// Not started.
    Off,
}

type RelayEdit = Box<dyn FnOnce(&mut RelayConfig)>;
type AgentEdit = Box<dyn FnOnce(&mut AgentConfig)>;

/// What to start; see [`Stack::builder`].
pub struct StackBuilder {
    pki: Option<TestPki>,
    services: Vec<(String, Backend)>,
    offline: Vec<String>,
    clients: Vec<String>,
    agent_name: String,
    mariadb: Option<Vec<String>>,
    db: Option<MariaDb>,
    transport: Transport,
    relay_mode: Mode,
    agent_mode: Mode,
    instances: u32,
    app_guid: Option<String>,
    relay_env: Vec<(String, String)>,
    heartbeat: Duration,
    handshake_timeout: Duration,
    agent_terminated: Vec<String>,
    revoked: Vec<String>,
    relay_edits: Vec<RelayEdit>,
    agent_edits: Vec<AgentEdit>,
    nodes: Option<Nodes>,
    api: bool,
    health_listen: bool,
    agent_env: Vec<(String, String)>,
}

/// The nodes behind MySQL services, instead of one MariaDB.
#[derive(Debug, Clone, Copy)]
enum Nodes {
    /// A three-node Galera cluster, `mysql` check.
    Galera,
    /// That many plain `mariadbd`s with a health endpoint each, `http` check.
    Http(usize),
}

/// The broker's password in stacks with [`StackBuilder::broker`].
pub const BROKER_PASSWORD: &str = "broker-password-for-tests";
/// The password of the plan's MySQL user in stacks with [`StackBuilder::broker`] (the test
/// creates the user).
pub const BROKER_APP_PASSWORD: &str = "app-password-for-tests";

/// The username of the relays' API in stacks with [`StackBuilder::api`].
pub const API_USER: &str = "admin";

/// A plain `mariadbd` node with a health endpoint the test controls
/// ([`StackBuilder::http_nodes`]).
pub struct HttpNode {
    /// `n1`, `n2`, ... (also its `@@wsrep_node_name`).
    pub name: String,
    /// The database.
    pub db: MariaDb,
    /// Its health endpoint (galera-agent's `/api/v1/status`).
    pub health: HealthServer,
}

/// What a service's agent connects to.
#[derive(Debug, Clone)]
enum Backend {
    /// The stack's MariaDB.
    Mariadb,
    /// Any TCP server (`protocol: tcp`).
    Tcp(SocketAddr),
}

impl StackBuilder {
    /// Uses `pki` (e.g. one the test prepared a revocation list in) instead of a fresh one.
    pub fn pki(mut self, pki: TestPki) -> Self {
        self.pki = Some(pki);
        self
    }

    /// Gives the relay a revocation list (`tls.crl`, [`TestPki::revoke`]) that revokes the
    /// certificates of `clients` from the start; revoke more later with `stack.pki.revoke`.
    pub fn revoked<const N: usize>(mut self, clients: [&str; N]) -> Self {
        self.revoked = clients.iter().map(|c| (*c).to_owned()).collect();
        self
    }

    /// Adds MySQL service `name`, offered by the agent with the MariaDB as backend (the first
    /// service is the one [`Stack::cli`], [`Stack::connect`] and [`Stack::port`] use).
    pub fn service(mut self, name: &str) -> Self {
        self.services.push((name.to_owned(), Backend::Mariadb));
        self
    }

    /// Adds `protocol: tcp` service `name`, offered by the agent with `backend`.
    pub fn tcp_service(mut self, name: &str, backend: SocketAddr) -> Self {
        self.services.push((name.to_owned(), Backend::Tcp(backend)));
        self
    }

    /// Adds MySQL service `name` at the relay that no agent offers.
    pub fn offline_service(mut self, name: &str) -> Self {
        self.offline.push(name.to_owned());
        self
    }

    /// The client identities allowed on every service (certificates issued for each; other
    /// identities get certificates on first use, and are refused).
    pub fn clients<const N: usize>(mut self, names: [&str; N]) -> Self {
        self.clients = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Starts a private MariaDB as the backend of MySQL services.
    pub fn mariadb(self) -> Self {
        self.mariadb_with(&[])
    }

    /// Starts a private MariaDB with extra `mariadbd` options.
    pub fn mariadb_with(mut self, options: &[&str]) -> Self {
        self.mariadb = Some(options.iter().map(|o| (*o).to_owned()).collect());
        self
    }

    /// Uses `db` (started by the test) as the backend of MySQL services.
    pub fn with_mariadb(mut self, db: MariaDb) -> Self {
        self.db = Some(db);
        self
    }

    /// How the agent (and [`Stack::connect`]) reach the relay.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Runs the relay as the real binary (to kill it, restart it or read its log).
    pub fn relay_process(mut self) -> Self {
        self.relay_mode = Mode::Process;
        self
    }

    /// Runs the agent as the real binary (to kill it, restart it or read its log).
    pub fn agent_process(mut self) -> Self {
        self.agent_mode = Mode::Process;
        self
    }

    /// Extra environment for the agent process ([`agent_process`](Self::agent_process)), e.g.
    /// a `NOTIFY_SOCKET` the test reads.
    pub fn agent_env<const N: usize>(mut self, env: [(&str, &str); N]) -> Self {
        self.agent_env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    /// Serves MySQL services from a real three-node Galera cluster (`n1`..`n3`) instead of one
    /// MariaDB: the agent gets the nodes, a `mysql` check as the monitor user (password in a
    /// file) and its own `state_dir`; the cluster has the monitor user and the application
    /// user [`APP_USER`] (database `app`).
    pub fn galera(mut self) -> Self {
        self.nodes = Some(Nodes::Galera);
        self
    }

    /// Serves MySQL services from `n` plain `mariadbd` nodes (`n1`..), each with a
    /// [`HealthServer`] (answering healthy at first) that the agent's `http` check reads through
    /// the node's `health_url`; the agent gets its own `state_dir`.
    pub fn http_nodes(mut self, n: usize) -> Self {
        self.nodes = Some(Nodes::Http(n));
        self
    }

    /// Turns on every relay's API (`/v0/*`, the dashboard, `/metrics`) for [`API_USER`] with a
    /// password in a file; [`Stack::api`] is a client with those credentials.
    pub fn api(mut self) -> Self {
        self.api = true;
        self
    }

    /// Gives the (one) relay a `health_listen` port ([`Stack::health_addr`]).
    pub fn health_listen(mut self) -> Self {
        self.health_listen = true;
        self
    }

    /// Turns on the relays' service broker (`/v2/`, user [`crate::broker::BROKER_USER`],
    /// password [`BROKER_PASSWORD`]), signing with the test CA, keeping bindings in the store at
    /// `store_url` (`None`: the default SQLite file next to the config). Every service becomes a
    /// plan handing out `plan` (its `broker` entry, e.g. `{"database": "appdb", "username":
    /// "app", "password_file": …}` or `{"users": "per_binding"}`); `host` is 127.0.0.1. When the
    /// QUIC port is pinned by an earlier edit, the credentials name it for sidecars.
    pub fn broker(mut self, store_url: Option<String>, plan: serde_json::Value) -> Self {
        self.relay_edits.push(Box::new(move |r: &mut RelayConfig| {
            let dir = r.tls.ca.parent().expect("ca dir").to_path_buf();
            let password = dir.join("broker-password");
            std::fs::write(&password, BROKER_PASSWORD).expect("write broker password");
            // The root's key stays offline: the broker signs with an intermediate.
            let root = postern_common::pki::Ca::load(&dir).expect("load the test CA");
            let (broker_ca, broker_key) = root.intermediate("broker", 1).expect("intermediate");
            std::fs::write(dir.join("intermediate-broker.pem"), &broker_ca.cert_pem)
                .expect("write intermediate");
            std::fs::write(dir.join("intermediate-broker-key.pem"), broker_key)
                .expect("write intermediate key");
            let app_password = dir.join("app-password");
            std::fs::write(&app_password, BROKER_APP_PASSWORD).expect("write app password");
            let mut b = serde_json::json!({
                "username": crate::broker::BROKER_USER,
                "password_file": password,
                "signing": {
                    "cert": dir.join("intermediate-broker.pem"),
                    "key_file": dir.join("intermediate-broker-key.pem"),
                },
                "host": "127.0.0.1",
            });
            if let Some(url) = &store_url {
                let file = dir.join("broker-store-url");
                std::fs::write(&file, url).expect("write store url");
                b["store_file"] = file.display().to_string().into();
            }
            if let Some(q) = r.listen.quic.as_ref().filter(|q| !q.ends_with(":0")) {
                b["relays"] = serde_json::json!([format!("quic://{q}")]);
                b["server_name"] = "localhost".into();
            }
            r.extra.insert("broker".into(), b);
            for svc in r.services.values_mut() {
                let mut p = plan.clone();
                if p.get("username").is_some() && p.get("password_file").is_none() {
                    p["password_file"] = app_password.display().to_string().into();
                }
                svc.broker = Some(p);
            }
        }));
        self
    }

    /// Starts no agent (the test starts its own from [`Stack::agent_config`], or none).
    pub fn no_agent(mut self) -> Self {
        self.agent_mode = Mode::Off;
        self
    }

    /// Runs `n` relay instances of one Cloud Foundry app `app_guid`, named `relay` (each reads
    /// `VCAP_APPLICATION` and `CF_INSTANCE_INDEX` from its environment, in-process or as a
    /// [process](Self::relay_process)), with the agent holding a session with each
    /// (`websocket.cloud_foundry`). Implies WebSocket.
    pub fn cloud_foundry(mut self, app_guid: &str, n: u32) -> Self {
        self.app_guid = Some(app_guid.to_owned());
        self.instances = n;
        self.transport = Transport::Websocket;
        self
    }

    /// Starts the relays with `env` in their environment (e.g. `PORT`, or Cloud Foundry's
    /// variables), read as the relay reads it; [`cloud_foundry`](Self::cloud_foundry) adds its
    /// own.
    pub fn relay_env<const N: usize>(mut self, env: [(&str, &str); N]) -> Self {
        self.relay_env
            .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// The relay's `heartbeat_interval` (default 1 s).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// The relay's `handshake_timeout` (default 5 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Where TLS of MySQL service `service` ends. At the agent, the agent presents a service
    /// certificate `server-SERVICE` that carries the relay's names, and the relay has no
    /// TLS-first listener for the service.
    pub fn tls_termination(mut self, service: &str, at: TlsTermination) -> Self {
        self.agent_terminated.retain(|s| s != service);
        if at == TlsTermination::Agent {
            self.agent_terminated.push(service.to_owned());
        }
        self
    }

    /// Changes the relay's config before it starts.
    pub fn relay(mut self, edit: impl FnOnce(&mut RelayConfig) + 'static) -> Self {
        self.relay_edits.push(Box::new(edit));
        self
    }

    /// Changes the agent's config before it starts.
    pub fn agent(mut self, edit: impl FnOnce(&mut AgentConfig) + 'static) -> Self {
        self.agent_edits.push(Box::new(edit));
        self
    }

    /// Starts everything; returns once the agent (if any) is in session with every relay.
    pub async fn start(mut self) -> Stack {
        crate::init_logging();
        panics::watch();
        if self.services.is_empty() {
            self.services.push(("orders".into(), Backend::Mariadb));
        }
        let pki = self.pki.take().unwrap_or_default();
        pki.issue(Kind::Agent, &self.agent_name);
        for c in &self.clients {
            pki.issue(Kind::Client, c);
        }
        if !self.revoked.is_empty() {
            let bases: Vec<String> = self
                .revoked
                .iter()
                .map(|c| pki.issue(Kind::Client, c))
                .collect();
            let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
            let crl = pki.revoke(&bases);
            self.relay_edits.insert(
                0,
                Box::new(move |r: &mut RelayConfig| r.tls.crl = Some(crl)),
            );
        }
        for s in &self.agent_terminated {
            // Clients dial the relay, so the service certificate carries the relay's names.
            pki.issue_server(s);
        }
        let db = match &self.mariadb {
            _ if self.db.is_some() => self.db.take(),
            Some(options) => {
                let options: Vec<&str> = options.iter().map(String::as_str).collect();
                Some(MariaDb::start_with(&options).await)
            }
            None => None,
        };

        let (galera, http_nodes) = match self.nodes {
            None => (None, Vec::new()),
            Some(Nodes::Galera) => {
                let g = Galera::start().await;
                g.create_monitor_user(MONITOR_USER, MONITOR_PASSWORD);
                g.create_app_user(APP_USER, APP_PASSWORD);
                (Some(g), Vec::new())
            }
            Some(Nodes::Http(n)) => {
                let mut nodes = Vec::new();
                for i in 0..n {
                    let name = format!("n{}", i + 1);
                    let db = MariaDb::start_with(&[&format!("--wsrep-node-name={name}")]).await;
                    let health = HealthServer::start(u32::try_from(i).expect("few nodes")).await;
                    nodes.push(HttpNode { name, db, health });
                }
                (None, nodes)
            }
        };
        let monitor_password = pki.dir().join("monitor-password");
        std::fs::write(&monitor_password, MONITOR_PASSWORD).expect("write monitor password");
        let api_password = format!("api-{:016x}", rand::random::<u64>());
        if self.api {
            let file = pki.dir().join("api-password");
            std::fs::write(&file, &api_password).expect("write api password");
            self.relay_edits.insert(
                0,
                Box::new(move |r: &mut RelayConfig| {
                    r.api(API_USER, &file);
                }),
            );
        }
        if self.health_listen {
            assert_eq!(self.instances, 1, "health_listen with one relay instance");
            let port = crate::mariadb::free_port();
            self.relay_edits.insert(
                0,
                Box::new(move |r: &mut RelayConfig| {
                    r.health_listen = Some(format!("127.0.0.1:{port}"));
                }),
            );
        }

        let relay_config = self.relay_config(&pki);
        let mut relays = Vec::new();
        for index in 0..self.instances {
            let path = pki.dir().join(format!("relay-{index}.yaml"));
            let mut env = self.relay_env.clone();
            if let Some(guid) = &self.app_guid {
                // What Cloud Foundry tells instance `index` of app "relay".
                env.push((
                    "VCAP_APPLICATION".into(),
                    format!(r#"{{"application_id":"{guid}","application_name":"relay"}}"#),
                ));
                env.push(("CF_INSTANCE_INDEX".into(), index.to_string()));
            }
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            relays.push(match self.relay_mode {
                Mode::Process => {
                    RelayNode::Process(RelayProc::start_env(&path, &relay_config, &env).await)
                }
                _ => RelayNode::InProcess(RelayRun::start(&path, &relay_config, &env).await),
            });
        }
        let nginx = match self.transport {
            Transport::Websocket => {
                let (cert, key) = pki.files("server-relay");
                let up = Upstreams {
                    relays: relays
                        .iter()
                        .map(|r| r.http().expect("relay with an HTTP listener"))
                        .collect(),
                    app_guid: self.app_guid.clone(),
                };
                Some(Nginx::start(&cert, &key, up).await)
            }
            Transport::Quic | Transport::DirectWebsocket => None,
        };
        let mut stack = Stack {
            agent: None,
            relays,
            nginx,
            db,
            relay_config,
            transport: self.transport,
            services: self.services.iter().map(|(n, _)| n.clone()).collect(),
            agent_name: self.agent_name.clone(),
            agent_terminated: self.agent_terminated.clone(),
            backends: self.services.clone(),
            files: AtomicU32::new(0),
            galera,
            http_nodes,
            monitor_password,
            api_password: self.api.then_some(api_password),
            pki,
        };
        let mut agent_config = stack.agent_config();
        if self.app_guid.is_some() {
            agent_config.websocket_mut().cloud_foundry = true;
        }
        for edit in self.agent_edits.drain(..) {
            edit(&mut agent_config);
        }
        stack.agent = match self.agent_mode {
            Mode::Off => None,
            Mode::InProcess => {
                let mut run = stack.start_agent(&agent_config);
                run.wait_connected().await;
                Some(AgentNode::InProcess(run))
            }
            Mode::Process => {
                let env: Vec<(&str, &str)> = self
                    .agent_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                Some(AgentNode::Process(
                    stack.start_agent_process(&agent_config, &env),
                ))
            }
        };
        if stack.agent.is_some() && (self.agent_mode == Mode::Process || self.instances > 1) {
            for relay in &stack.relays {
                relay.wait_agent(&stack.agent_name).await;
            }
        }
        stack
    }

    fn relay_config(&mut self, pki: &TestPki) -> RelayConfig {
        let mut r = RelayConfig::new(pki);
        r.heartbeat_interval = Some(self.heartbeat);
        r.handshake_timeout = Some(self.handshake_timeout);
        let offered: Vec<&str> = self.services.iter().map(|(n, _)| n.as_str()).collect();
        r.agent(&self.agent_name, &offered);
        let clients: Vec<&str> = self.clients.iter().map(String::as_str).collect();
        for (name, backend) in &self.services {
            let svc = r.service(name, &clients);
            if matches!(backend, Backend::Tcp(_)) {
                // Its `listen` is TLS-first already.
                svc.protocol = Some(Protocol::Tcp);
                svc.tls_listen = None;
            }
            if self.agent_terminated.contains(name) {
                svc.tls_termination = Some(TlsTermination::Agent);
                svc.tls_listen = None;
            }
        }
        for name in &self.offline {
            r.service(name, &clients).tls_listen = None;
        }
        for edit in self.relay_edits.drain(..) {
            edit(&mut r);
        }
        r
    }
}

/// A running stack. Parts stop when it is dropped (or with [`Stack::stop`], which also waits
/// for them); a panic in any in-process task fails the test.
pub struct Stack {
    /// The agent the builder started, if any.
    pub agent: Option<AgentNode>,
    /// The relay instances (usually one).
    pub relays: Vec<RelayNode>,
    /// The router in front of the relays ([`Transport::Websocket`]).
    pub nginx: Option<Nginx>,
    /// The private MariaDB, if one was asked for.
    pub db: Option<MariaDb>,
    /// The relay config as started (edit a clone and start another relay from it).
    pub relay_config: RelayConfig,
    transport: Transport,
    services: Vec<String>,
    agent_name: String,
    agent_terminated: Vec<String>,
    backends: Vec<(String, Backend)>,
    files: AtomicU32,
    /// The Galera cluster ([`StackBuilder::galera`]).
    pub galera: Option<Galera>,
    /// The plain nodes with health endpoints ([`StackBuilder::http_nodes`]).
    pub http_nodes: Vec<HttpNode>,
    monitor_password: PathBuf,
    api_password: Option<String>,
    /// Certificates, and the directory that holds configs and logs. Dropped last.
    pub pki: TestPki,
}

impl Stack {
    /// A builder with the defaults (see the module docs).
    pub fn builder() -> StackBuilder {
        StackBuilder {
            pki: None,
            services: Vec::new(),
            offline: Vec::new(),
            clients: vec!["alice".into()],
            agent_name: "db1".into(),
            mariadb: None,
            db: None,
            transport: Transport::Quic,
            relay_mode: Mode::InProcess,
            agent_mode: Mode::InProcess,
            instances: 1,
            app_guid: None,
            relay_env: Vec::new(),
            heartbeat: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            agent_terminated: Vec::new(),
            revoked: Vec::new(),
            relay_edits: Vec::new(),
            agent_edits: Vec::new(),
            nodes: None,
            api: false,
            health_listen: false,
            agent_env: Vec::new(),
        }
    }

    /// The (first) relay.
    pub fn relay(&self) -> &RelayNode {
        &self.relays[0]
    }

    /// The (first) relay, to kill or restart it.
    pub fn relay_mut(&mut self) -> &mut RelayNode {
        &mut self.relays[0]
    }

    /// The private MariaDB.
    pub fn db(&self) -> &MariaDb {
        self.db.as_ref().expect("a stack with .mariadb()")
    }

    /// The in-process agent.
    pub fn agent(&self) -> &AgentRun {
        match &self.agent {
            Some(AgentNode::InProcess(a)) => a,
            _ => panic!("this stack has no in-process agent"),
        }
    }

    /// The in-process agent, to wait on its status.
    pub fn agent_mut(&mut self) -> &mut AgentRun {
        match &mut self.agent {
            Some(AgentNode::InProcess(a)) => a,
            _ => panic!("this stack has no in-process agent"),
        }
    }

    /// The agent process ([`StackBuilder::agent_process`]), to read its log.
    pub fn agent_proc(&self) -> &AgentProc {
        match &self.agent {
            Some(AgentNode::Process(a)) => a,
            _ => panic!("this stack has no agent process: use .agent_process()"),
        }
    }

    /// The agent process ([`StackBuilder::agent_process`]), to kill or restart it.
    pub fn agent_proc_mut(&mut self) -> &mut AgentProc {
        match &mut self.agent {
            Some(AgentNode::Process(a)) => a,
            _ => panic!("this stack has no agent process: use .agent_process()"),
        }
    }

    /// The router ([`Transport::Websocket`]).
    pub fn nginx_mut(&mut self) -> &mut Nginx {
        self.nginx
            .as_mut()
            .expect("a stack with Transport::Websocket")
    }

    /// The relay's MySQL-native listener port of the first service.
    pub fn port(&self) -> u16 {
        self.relay().mysql(&self.services[0]).port()
    }

    /// The WebSocket URL: through the router, or straight to the (first) relay's HTTP
    /// listener with [`Transport::DirectWebsocket`].
    pub fn ws_url(&self) -> String {
        if self.transport == Transport::DirectWebsocket {
            let http = self.relay().http().expect("a relay with an HTTP listener");
            return format!("ws://localhost:{}", http.port());
        }
        let nginx = self
            .nginx
            .as_ref()
            .expect("a stack with Transport::Websocket");
        format!("wss://localhost:{}/v1/tunnel", nginx.addr.port())
    }

    /// How agents and `connect` reach the (first) relay with this stack's transport.
    pub fn relay_spec(&self) -> RelaySpec {
        match self.transport {
            Transport::Quic => RelaySpec::quic(self.relay().quic()),
            Transport::Websocket | Transport::DirectWebsocket => RelaySpec::Url(self.ws_url()),
        }
    }

    /// How `connect` reaches the (first) relay with this stack's transport.
    pub fn connect_to(&self) -> ConnectTo {
        match self.transport {
            Transport::Quic => ConnectTo::quic(self.relay().quic()),
            Transport::Websocket | Transport::DirectWebsocket => {
                ConnectTo::websocket(&self.ws_url())
            }
        }
    }

    /// `connect` to the first service as `client`.
    pub async fn connect(&self, client: &str) -> ConnectRun {
        self.connect_service(client, &self.services[0]).await
    }

    /// `connect` to `service` as `client` (MySQL refusals unless it is a `tcp` service).
    pub async fn connect_service(&self, client: &str, service: &str) -> ConnectRun {
        let mysql = !self
            .backends
            .iter()
            .any(|(n, b)| n == service && matches!(b, Backend::Tcp(_)));
        ConnectRun::start_with(&self.pki, self.connect_to(), client, service, mysql)
            .await
            .expect("connect starts")
    }

    /// The `mariadb` client at the relay's MySQL listener of the first service, with TLS
    /// verifying the relay and presenting `client-NAME` (issued if needed: allowed or not) if
    /// `client` is given.
    pub fn cli(&self, client: Option<&str>) -> Cli {
        let cert = client.map(|c| self.pki.issue(Kind::Client, c));
        Cli::at(self.port()).tls(&self.pki, cert.as_deref())
    }

    /// mysql_async options for root at the relay's MySQL listener of the first service, with
    /// TLS and `client`'s certificate.
    pub fn mysql_opts(&self, client: &str) -> OptsBuilder {
        let cert = self.pki.issue(Kind::Client, client);
        driver_opts(&self.pki, self.port(), &cert, "root", "")
    }

    /// The config the builder gives the agent: this stack's transport to the first relay, the
    /// agent's certificate, every service with its backend.
    pub fn agent_config(&self) -> AgentConfig {
        self.agent_config_as(&self.agent_name)
    }

    /// [`agent_config`](Self::agent_config) for another agent, `name` (its certificate issued
    /// on first use; the relay must list it: `r.agent(name, ..)`).
    pub fn agent_config_as(&self, name: &str) -> AgentConfig {
        let mut a = AgentConfig::new(&self.pki, name, self.relay_spec());
        if self.transport != Transport::Quic {
            a.transport = Some(AgentTransport::Websocket);
            a.websocket_mut().ping_interval = Some(Duration::from_secs(2));
        }
        let nodes = self.service_nodes();
        if nodes.is_some() {
            a.state_dir = Some(self.pki.dir().join(format!("state-{name}")));
        }
        for (name, backend) in &self.backends {
            if let (Some((nodes, check)), Backend::Mariadb) = (&nodes, backend) {
                a.nodes_service(name, nodes.clone(), check.clone());
                continue;
            }
            let addr = match backend {
                Backend::Mariadb => self
                    .db
                    .as_ref()
                    .map_or_else(|| "127.0.0.1:9".to_owned(), MariaDb::backend),
                Backend::Tcp(addr) => addr.to_string(),
            };
            let svc = a.service(name, &addr);
            if self.agent_terminated.contains(name) {
                let (cert, key) = self.pki.files(&format!("server-{name}"));
                svc.tls = Some(ServiceTls { cert, key });
            }
        }
        a
    }

    /// The nodes and check the agent gets for MySQL services, if the stack has nodes.
    fn service_nodes(&self) -> Option<(Vec<ServiceNode>, Check)> {
        if let Some(g) = &self.galera {
            let nodes = g
                .nodes()
                .iter()
                .map(|n| ServiceNode {
                    name: n.name.clone(),
                    address: n.backend(),
                    health_url: None,
                })
                .collect();
            let check = Check {
                kind: Some(CheckKind::Mysql),
                user: Some(MONITOR_USER.into()),
                password_file: Some(self.monitor_password.clone()),
                ..Check::default()
            };
            return Some((nodes, check));
        }
        if self.http_nodes.is_empty() {
            return None;
        }
        let nodes = self
            .http_nodes
            .iter()
            .map(|n| ServiceNode {
                name: n.name.clone(),
                address: n.db.backend(),
                health_url: Some(n.health.url()),
            })
            .collect();
        let check = Check {
            kind: Some(CheckKind::Http),
            ..Check::default()
        };
        Some((nodes, check))
    }

    /// The Galera cluster ([`StackBuilder::galera`]).
    pub fn galera(&self) -> &Galera {
        self.galera.as_ref().expect("a stack with .galera()")
    }

    /// The Galera cluster, to stop, kill or start nodes.
    pub fn galera_mut(&mut self) -> &mut Galera {
        self.galera.as_mut().expect("a stack with .galera()")
    }

    /// Plain node `name` ([`StackBuilder::http_nodes`]).
    pub fn http_node(&self, name: &str) -> &HttpNode {
        self.http_nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no http node {name}"))
    }

    /// Plain node `name`, to kill it.
    pub fn http_node_mut(&mut self, name: &str) -> &mut HttpNode {
        self.http_nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no http node {name}"))
    }

    /// The node names, in config order (`n1`, ...).
    pub fn node_names(&self) -> Vec<String> {
        match &self.galera {
            Some(g) => g.names(),
            None => self.http_nodes.iter().map(|n| n.name.clone()).collect(),
        }
    }

    /// The file that holds the monitor user's password.
    pub fn monitor_password_file(&self) -> &std::path::Path {
        &self.monitor_password
    }

    /// mysql_async options for the application user (Galera: [`APP_USER`], database `app`;
    /// plain nodes: root) at relay `relay`'s MySQL listener of the first service, with TLS and
    /// `client`'s certificate.
    pub fn app_opts(&self, relay: usize, client: &str) -> OptsBuilder {
        let cert = self.pki.issue(Kind::Client, client);
        let port = self.relays[relay].mysql(&self.services[0]).port();
        if self.galera.is_some() {
            driver_opts(&self.pki, port, &cert, APP_USER, APP_PASSWORD).db_name(Some("app"))
        } else {
            driver_opts(&self.pki, port, &cert, "root", "")
        }
    }

    /// A new connection through relay `relay` as `client` (see [`app_opts`](Self::app_opts)).
    pub async fn app_conn(
        &self,
        relay: usize,
        client: &str,
    ) -> Result<mysql_async::Conn, mysql_async::Error> {
        mysql_async::Conn::new(self.app_opts(relay, client)).await
    }

    /// Where a new connection through relay `relay` (as `alice`) lands: the node's name, or the
    /// error the client got.
    pub async fn which_node(&self, relay: usize) -> Result<String, String> {
        let mut conn = self
            .app_conn(relay, "alice")
            .await
            .map_err(|e| e.to_string())?;
        let name = node_name(&mut conn).await.map_err(|e| e.to_string())?;
        let _ = conn.disconnect().await;
        Ok(name)
    }

    /// Polls until new connections through relay `relay` land on `node` (within `within`);
    /// returns how long that took.
    pub async fn wait_node(&self, relay: usize, node: &str, within: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        let mut last = Err(String::new());
        loop {
            let got = self.which_node(relay).await;
            if got.as_deref() == Ok(node) {
                return started.elapsed();
            }
            if started.elapsed() >= within {
                panic!(
                    "new connections through relay {relay} did not land on {node} within \
                     {within:?}; last: {got:?} (before: {last:?})"
                );
            }
            last = got;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client of relay `relay`'s API with the stack's credentials ([`StackBuilder::api`]).
    pub fn api(&self, relay: usize) -> Api {
        let http = self.relays[relay]
            .http()
            .expect("a relay with an HTTP listener");
        let password = self.api_password.as_deref().expect("a stack with .api()");
        Api::new(http, API_USER, password)
    }

    /// The service broker of relay instance `relay` ([`StackBuilder::broker`]).
    pub fn osb(&self, relay: usize) -> crate::broker::Osb {
        let http = self.relays[relay]
            .http()
            .expect("a relay with an HTTP listener");
        crate::broker::Osb::new(Api::new(http, crate::broker::BROKER_USER, BROKER_PASSWORD))
    }

    /// The relay's `health_listen` address ([`StackBuilder::health_listen`]).
    pub fn health_addr(&self) -> SocketAddr {
        self.relay_config
            .health_listen
            .as_deref()
            .expect("a stack with .health_listen()")
            .parse()
            .expect("health_listen address")
    }

    /// Starts another agent in-process with `config` (not waiting for it to connect).
    pub fn start_agent(&self, config: &AgentConfig) -> AgentRun {
        AgentRun::start(&self.file("agent", "yaml"), config)
    }

    /// Starts another agent as a process with `config` and extra environment `env`.
    pub fn start_agent_process(&self, config: &AgentConfig, env: &[(&str, &str)]) -> AgentProc {
        AgentProc::start(&self.file("agent", "yaml"), config, env)
    }

    /// A path in the stack's directory that no other part uses: `STEM-N.EXT`.
    pub fn file(&self, stem: &str, ext: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.pki.dir().join(format!("{stem}-{n}.{ext}"))
    }

    /// Stops the agent and the relays and waits for them; fails the test if any in-process
    /// task panicked or a process's log shows a panic.
    pub async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
        for relay in self.relays.drain(..) {
            relay.stop().await;
        }
        panics::check();
    }
}

/// `SELECT @@wsrep_node_name` on `conn`: the node it is connected to.
pub async fn node_name(conn: &mut mysql_async::Conn) -> Result<String, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    let name: Option<String> = conn.query_first("SELECT @@wsrep_node_name").await?;
    Ok(name.unwrap_or_default())
}

/// A relay of the stack: in-process, or the real binary.
pub enum RelayNode {
    /// In this process.
    InProcess(RelayRun),
    /// A child process.
    Process(RelayProc),
}

impl RelayNode {
    /// Where agents and `connect` reach it over QUIC.
    pub fn quic(&self) -> SocketAddr {
        match self {
            Self::InProcess(r) => r.quic,
            Self::Process(r) => r.quic,
        }
        .expect("a relay that listens for QUIC")
    }

    /// Its HTTP address, if any.
    pub fn http(&self) -> Option<SocketAddr> {
        match self {
            Self::InProcess(r) => r.http,
            Self::Process(r) => r.http,
        }
    }

    /// The `listen` address of `service` (MySQL-native for MySQL services).
    pub fn mysql(&self, service: &str) -> SocketAddr {
        match self {
            Self::InProcess(r) => r.service(service),
            Self::Process(r) => r.listener(service, "mysql"),
        }
    }

    /// The TLS-first address of `service` (`tls_listen`; `listen` of a `tcp` service).
    pub fn tls(&self, service: &str) -> SocketAddr {
        match self {
            Self::InProcess(r) => r
                .tls_services
                .iter()
                .find(|(n, _)| n == service)
                .map(|(_, a)| *a)
                .unwrap_or_else(|| r.service(service)),
            Self::Process(r) => r
                .listeners
                .iter()
                .find(|(n, k, _)| n == service && k == "tls")
                .map(|(_, _, a)| *a)
                .unwrap_or_else(|| r.listener(service, "mysql")),
        }
    }

    /// Inspects the in-process relay.
    pub fn handle(&self) -> &postern_relay::Handle {
        match self {
            Self::InProcess(r) => &r.handle,
            Self::Process(_) => panic!("the relay runs as a process: it has no handle"),
        }
    }

    /// The relay process ([`StackBuilder::relay_process`]).
    pub fn proc(&self) -> &RelayProc {
        match self {
            Self::Process(r) => r,
            Self::InProcess(_) => panic!("the relay runs in-process: use .relay_process()"),
        }
    }

    /// The relay process, to kill or restart it.
    pub fn proc_mut(&mut self) -> &mut RelayProc {
        match self {
            Self::Process(r) => r,
            Self::InProcess(_) => panic!("the relay runs in-process: use .relay_process()"),
        }
    }

    /// Waits until agent `name` is registered with this relay.
    pub async fn wait_agent(&self, name: &str) {
        match self {
            Self::InProcess(r) => r.wait_agent(name).await,
            Self::Process(r) => {
                let tag = format!("agent={name} ");
                r.proc
                    .wait_line(
                        LogMark::default(),
                        crate::inproc::CONNECT_WITHIN,
                        "agent connected",
                        |l| l.contains("agent connected") && l.contains(&tag),
                    )
                    .await;
            }
        }
    }

    /// Stops it and waits; fails the test on a panic.
    pub async fn stop(self) {
        match self {
            Self::InProcess(r) => r.stop().await,
            Self::Process(r) => r.proc.stop(),
        }
    }
}

/// The stack's agent: in-process, or the real binary.
pub enum AgentNode {
    /// In this process.
    InProcess(AgentRun),
    /// A child process.
    Process(AgentProc),
}

impl AgentNode {
    /// Stops it and waits; fails the test on a panic.
    pub async fn stop(self) {
        match self {
            Self::InProcess(a) => a.stop().await,
            Self::Process(a) => a.proc.stop(),
        }
    }
}
