//! `agent.yaml`: which relay to dial, with which certificate, and the services it offers.
//!
//! ```yaml
//! relay: quic://relay.example.com:7443
//! tls: { ca: ca.pem, cert: agent-db1.pem, key: agent-db1-key.pem }
//! services:
//!   orders:
//!     backend: 127.0.0.1:3306
//!     # For a relay service with `tls_termination: agent` (end-to-end TLS): the certificate this
//!     # agent presents to MySQL clients. Clients dial the relay, so it carries the relay's
//!     # names: `postern-relay certs issue server --dns relay.example.com`.
//!     tls: { cert: orders-server.pem, key: orders-server-key.pem }
//! ```
//!
//! A MySQL service can create a database user per binding of the relay's service broker
//! (`services.NAME.users`): on bind, the agent logs in to the active node as an admin user whose
//! password stays here, creates the binding's user with a random password and exactly the
//! `grants` listed, and drops it on unbind (see [`crate::users`] for the rules on grants):
//!
//! ```yaml
//! services:
//!   orders:
//!     backend: 127.0.0.1:3306
//!     users:
//!       admin: postern_admin                          # has CREATE USER and these privileges WITH GRANT OPTION
//!       password_file: /etc/postern/admin-password    # or password_env: VARIABLE (never inline)
//!       grants: ["SELECT, INSERT, UPDATE, DELETE ON appdb.*"]
//!       host: "%"                                     # the users' host part (default %)
//! ```
//!
//! A relay can be reached over QUIC, over WebSocket (through HTTP routers and proxies), or both
//! raced (`transport: auto`): `relay: {quic: quic://host:7443, websocket: wss://host}`. Several
//! relays (`relays: [...]`) each get their own session.
//!
//! A service is one backend (`backend: host:port`, always considered healthy) or several
//! database nodes with a health check, of which the agent keeps one active (failover):
//!
//! ```yaml
//! state_dir: /var/lib/postern      # default: $STATE_DIRECTORY, else `state` next to this file
//! services:
//!   orders:
//!     nodes:
//!       - { name: n1, address: 10.0.0.11:3306 }
//!       - { name: n2, address: 10.0.0.12:3306, health_url: "http://10.0.0.12:9200/api/v1/status" }
//!     check: { type: mysql, user: postern_monitor, password_file: monitor-password }
//!     wait_for_node: 5s
//!     decisions: local                 # or cluster: a compare-and-set table in the cluster
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use postern_common::config::{
    self, Check, ConfigErrors, Entries, Env, HumanDuration, ProcessEnv, Spanned, TlsFiles,
};
use postern_common::pki::{self, Identity};
use postern_common::tls::Material;
use postern_common::transport::addr::{RelayUrl, Scheme};
use postern_common::transport::proxy::{self, Proxy, ProxyError};
use serde::Deserialize;

/// Default interval between QUIC re-probes while on WebSocket.
pub const DEFAULT_QUIC_REPROBE: Duration = Duration::from_secs(60);

/// Default deadline for connecting to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The range of `quic_reprobe`.
const QUIC_REPROBE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
/// The range of `websocket.ping_interval`.
const PING_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// The range of `services.NAME.connect_timeout`.
const CONNECT_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(600);

/// Default `check.interval`: how often a healthy node is checked.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Default `check.timeout`: how long one check may take before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(750);
/// Default `check.rise`: passed checks in a row that make a failed node healthy again.
pub const DEFAULT_RISE: u32 = 2;
/// Default `check.fall`: timeouts or errors in a row that make a node unhealthy.
pub const DEFAULT_FALL: u32 = 2;
/// Default `check.path` of `http` checks (galera-agent's status endpoint).
pub const DEFAULT_HTTP_PATH: &str = "/api/v1/status";
/// Default `check.port` of `http` checks (galera-agent's and clustercheck's port).
pub const DEFAULT_HTTP_PORT: u16 = 9200;
/// Default `wait_for_node`: how long a new client waits for a healthy node.
pub const DEFAULT_WAIT_FOR_NODE: Duration = Duration::from_secs(5);
/// The node name of a service given as `backend: host:port`.
pub const SHORTHAND_NODE: &str = "backend";

/// The range of `check.interval`.
const CHECK_INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(3600);
/// The range of `check.timeout`.
const CHECK_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(600);
/// The range of `wait_for_node`.
const WAIT_FOR_NODE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(600);
/// The range of `check.rise` and `check.fall`.
const RISE_FALL_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// The most nodes one service may have.
const MAX_NODES: usize = 64;
/// The largest password file read.
const MAX_PASSWORD_FILE: u64 = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    relay: Option<RelayFile>,
    #[serde(default)]
    relays: Option<Spanned<Vec<RelayFile>>>,
    #[serde(default)]
    transport: Option<TransportChoice>,
    #[serde(default)]
    quic_reprobe: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    server_name: Option<String>,
    tls: TlsFiles,
    #[serde(default)]
    websocket: WebsocketFile,
    #[serde(default)]
    services: Entries<ServiceFile>,
    #[serde(default)]
    state_dir: Option<Spanned<std::path::PathBuf>>,
}

/// One relay: a URL, or the two transports of the same relay.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RelayFile {
    Url(Spanned<String>),
    Both {
        #[serde(default)]
        quic: Option<Spanned<String>>,
        #[serde(default)]
        websocket: Option<Spanned<String>>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebsocketFile {
    #[serde(default)]
    ping_interval: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    ca: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    proxy: Option<Spanned<String>>,
    #[serde(default)]
    cloud_foundry: bool,
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportChoice {
    /// Race QUIC and WebSocket; keep the first up (QUIC preferred), re-probe QUIC meanwhile.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// WebSocket only.
    Websocket,
}

/// One relay, by the transports it can be reached over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// `quic://host:port`, if any.
    pub quic: Option<RelayUrl>,
    /// `wss://...` or `ws://...`, if any.
    pub websocket: Option<RelayUrl>,
}

impl std::fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.quic, &self.websocket) {
            (Some(q), Some(w)) => write!(f, "{q} | {w}"),
            (Some(u), None) | (None, Some(u)) => write!(f, "{u}"),
            (None, None) => f.write_str("(none)"),
        }
    }
}

/// WebSocket settings (egress through routers and proxies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebsocketSettings {
    /// WebSocket ping interval (None: the transport's default of 20 s).
    pub ping_interval: Option<Duration>,
    /// Outer TLS SNI override.
    pub sni: Option<String>,
    /// `Host` header override.
    pub host: Option<String>,
    /// Extra CA bundle for the outer TLS (a TLS-inspecting proxy, a private router CA).
    pub ca: Option<std::path::PathBuf>,
    /// How WebSocket sessions get out: straight, or through an HTTP CONNECT proxy.
    pub proxy: ProxySetting,
    /// Pin one session to every instance of a Cloud Foundry relay app.
    pub cloud_foundry: bool,
}

/// How WebSocket sessions reach the relay: parsed once, when the config (or the command line) is
/// read, so a typo fails then, not at the first dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    /// As the environment says (`HTTPS_PROXY`, `NO_PROXY`, ...), captured when the settings were
    /// made.
    Environment(ProxyEnv),
    /// No proxy (`websocket.proxy: none`).
    Direct,
    /// Always through this proxy (`websocket.proxy: http://[user:pass@]host:port`).
    Via(Proxy),
}

impl Default for ProxySetting {
    /// An empty environment: no proxy. Binaries use [`ProxySetting::from_env`].
    fn default() -> Self {
        Self::Environment(ProxyEnv::default())
    }
}

impl ProxySetting {
    /// The environment's proxy settings, read through `env`.
    pub fn from_env(env: &dyn Env) -> Self {
        Self::Environment(ProxyEnv::capture(env))
    }

    /// A `websocket.proxy` / `--proxy` value: `none` (or empty) for no proxy, else a proxy URL.
    pub fn parse(key: &str, value: &str) -> Result<Self, ProxyError> {
        match value.trim() {
            "none" | "" => Ok(Self::Direct),
            v => Proxy::parse(key, v).map(Self::Via),
        }
    }

    /// The proxy for reaching `url`, if any.
    pub fn for_url(&self, url: &RelayUrl) -> Result<Option<Proxy>, ProxyError> {
        match self {
            Self::Direct => Ok(None),
            Self::Via(p) => Ok(Some(p.clone())),
            Self::Environment(env) => {
                proxy::proxy_from_env(|k| env.get(k), url.scheme, &url.host, url.port)
            }
        }
    }
}

/// The proxy variables of an environment, captured once. `Debug` shows which are set, never
/// their values (they may carry credentials).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv(BTreeMap<&'static str, String>);

impl ProxyEnv {
    /// The variables [`proxy::proxy_from_env`] reads.
    const VARS: [&'static str; 6] = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ];

    /// Reads the proxy variables from `env`.
    pub fn capture(env: &dyn Env) -> Self {
        Self(
            Self::VARS
                .iter()
                .filter_map(|k| env.var(k).map(|v| (*k, v)))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

impl std::fmt::Debug for ProxyEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    #[serde(default)]
    backend: Option<Spanned<String>>,
    #[serde(default)]
    nodes: Option<Spanned<Vec<NodeFile>>>,
    #[serde(default)]
    check: Option<CheckFile>,
    #[serde(default)]
    wait_for_node: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    decisions: Option<Spanned<Decisions>>,
    #[serde(default)]
    connect_timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    tls: Option<ServiceTlsFile>,
    #[serde(default)]
    users: Option<UsersFile>,
}

/// `services.NAME.users`: per-binding database users.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    admin: Spanned<String>,
    #[serde(default)]
    password_file: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    password_env: Option<Spanned<String>>,
    grants: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    host: Option<Spanned<String>>,
}

/// `services.NAME.nodes[i]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    health_url: Option<Spanned<String>>,
}

/// `services.NAME.check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFile {
    #[serde(default, rename = "type")]
    kind: Option<Spanned<CheckType>>,
    #[serde(default)]
    interval: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    rise: Option<Spanned<u32>>,
    #[serde(default)]
    fall: Option<Spanned<u32>>,
    #[serde(default)]
    user: Option<Spanned<String>>,
    #[serde(default)]
    password_file: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    password_env: Option<Spanned<String>>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
}

/// `check.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CheckType {
    Mysql,
    Http,
    #[default]
    Tcp,
}

/// `services.NAME.tls`: the server certificate for end-to-end TLS (the CA is `tls.ca`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTlsFile {
    cert: Spanned<std::path::PathBuf>,
    key: Spanned<std::path::PathBuf>,
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The relays to hold sessions with (one session each).
    pub relays: Vec<RelayTarget>,
    /// Which transport to use.
    pub transport: TransportChoice,
    /// While on WebSocket with `transport: auto`, how often QUIC is tried again.
    pub quic_reprobe: Duration,
    /// WebSocket settings.
    pub websocket: WebsocketSettings,
    /// The name the relay's certificate must carry (default: each relay URL's host).
    pub server_name: Option<String>,
    /// The agent's certificate, key and the CA it trusts.
    pub tls: Material,
    /// The agent's own identity name (from its certificate).
    pub name: String,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Where the agent keeps its decisions (terms survive restarts): `state_dir`, else
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), else `state` next to the config file.
    pub state_dir: std::path::PathBuf,
}

/// One service the agent offers.
#[derive(Debug, Clone)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// The first node's address (`host:port`): the backend of a `backend:` service.
    pub backend: String,
    /// The database nodes, in config order (one, named [`SHORTHAND_NODE`], for `backend:`).
    pub nodes: Vec<Node>,
    /// How the nodes' health is checked; `None` for `backend:` (always healthy).
    pub check: Option<HealthCheck>,
    /// How long a new client waits for a healthy node before it is refused.
    pub wait_for_node: Duration,
    /// Where the decision (term and active node) is kept.
    pub decisions: Decisions,
    /// Deadline for connecting to the backend.
    pub connect_timeout: Duration,
    /// The certificate and key presented to MySQL clients when the relay has this service end
    /// TLS at the agent (`tls_termination: agent`), with the agent's CA for client certificates.
    /// Revocation lists come from the relay's policy.
    pub tls: Option<Material>,
    /// Per-binding database users, when the service makes them (`users:`).
    pub users: Option<Users>,
}

/// `services.NAME.users`, validated: how the agent makes a database user per binding.
#[derive(Debug, Clone)]
pub struct Users {
    /// The MySQL user the agent logs in as to create and drop users (it needs `CREATE USER`
    /// and every granted privilege `WITH GRANT OPTION`).
    pub admin: String,
    /// Its password.
    pub password: Secret,
    /// What every binding's user is granted, in order.
    pub grants: Vec<crate::users::Grant>,
    /// The users' host part (`'user'@'host'`).
    pub host: String,
}

/// Default `users.host`: connections from anywhere (they come from the agent's address, but
/// through a relay the operator may move).
pub const DEFAULT_USERS_HOST: &str = "%";

/// One database node of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its name, unique within the service (what the relay and the dashboard show).
    pub name: String,
    /// Where it listens (`host:port`).
    pub address: String,
    /// For `http` checks: where its health endpoint is (`health_url`, or the node's host with
    /// `check.port` and `check.path`).
    pub http: Option<HttpTarget>,
}

/// An `http://host:port/path` health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// The host (a name or an address; IPv6 without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl std::fmt::Display for HttpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// A service's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What is checked.
    pub kind: CheckKind,
    /// How often a node is checked while its checks pass.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Passed checks in a row that make a failed node healthy again.
    pub rise: u32,
    /// Timeouts or errors in a row that make a node unhealthy (an explicit unhealthy answer
    /// acts at once).
    pub fall: u32,
}

/// The kind of health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// The node accepts TCP connections.
    Tcp,
    /// `GET` on the node's health endpoint ([`Node::http`]) answers 200 (and, when the body
    /// is JSON, `"healthy": true`): galera-agent and clustercheck.
    Http,
    /// The agent logs in as a monitor user and reads the node's Galera state and `read_only`.
    Mysql {
        /// The monitor user.
        user: String,
        /// Its password.
        password: Secret,
    },
}

impl CheckKind {
    /// The name the relay and the dashboard show (`mysql`, `http`, `tcp`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Mysql { .. } => "mysql",
        }
    }
}

/// Where a service's decision (its term and active node) is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decisions {
    /// In a file in the agent's `state_dir`: enough when one agent serves the service.
    #[default]
    Local,
    /// In a table of the Galera cluster itself (`postern.decisions`), written by
    /// compare-and-set: several agents serving one service make one decision per term.
    Cluster,
}

/// A secret read from a file or the environment. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Config {
    /// Loads and validates `path`, reading the process environment (proxy variables).
    /// Relative file names inside are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::load_with(path, &ProcessEnv)
    }

    /// [`load`](Self::load) with the environment read through `env`.
    pub fn load_with(path: &Path, env: &dyn Env) -> Result<Self, ConfigErrors> {
        let file: File = config::load_yaml(path)?;
        Self::validate(path, file, env)
    }

    /// Parses and validates YAML text as if it were the file `path`.
    pub fn parse(path: &Path, text: &str, env: &dyn Env) -> Result<Self, ConfigErrors> {
        let file: File = config::parse_yaml(path, text)?;
        Self::validate(path, file, env)
    }

    fn validate(path: &Path, mut file: File, env: &dyn Env) -> Result<Self, ConfigErrors> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        file.tls.rebase(&base);
        let mut check = Check::new(path);
        let relays = relays(&mut check, file.relay.take(), file.relays.take());
        let transport = file.transport.unwrap_or_default();
        for r in &relays {
            let missing = match transport {
                TransportChoice::Quic if r.quic.is_none() => Some("quic"),
                TransportChoice::Websocket if r.websocket.is_none() => Some("websocket"),
                _ => None,
            };
            if let Some(kind) = missing {
                check.error(
                    None,
                    "transport",
                    format!("transport is {kind} but relay {r} has no {kind} url"),
                );
            }
        }
        if let Some(ca) = &file.websocket.ca {
            let mut ca = ca.clone();
            if ca.value.is_relative() {
                ca.value = base.join(&ca.value);
            }
            check.file_exists(&ca, "websocket.ca");
        }
        let proxy = match &file.websocket.proxy {
            None => ProxySetting::from_env(env),
            Some(p) => ProxySetting::parse("websocket.proxy", &p.value).unwrap_or_else(|e| {
                check.at(p, "websocket.proxy", e.to_string());
                ProxySetting::Direct
            }),
        };
        // A proxy URL in the environment that cannot be used is as much a config error.
        for url in relays.iter().filter_map(|r| r.websocket.as_ref()) {
            if let Err(e) = proxy.for_url(url) {
                check.error(None, "websocket.proxy", e.to_string());
            }
        }
        let websocket =
            WebsocketSettings {
                ping_interval: file.websocket.ping_interval.as_ref().map(|d| {
                    check.duration(Some(d), "websocket.ping_interval", d.value.0, PING_RANGE)
                }),
                sni: file.websocket.sni.clone(),
                host: file.websocket.host.clone(),
                ca: file.websocket.ca.as_ref().map(|c| {
                    if c.value.is_relative() {
                        base.join(&c.value)
                    } else {
                        c.value.clone()
                    }
                }),
                proxy,
                cloud_foundry: file.websocket.cloud_foundry,
            };
        let tls = check.tls(&file.tls, "tls");
        let name = match tls.as_ref().map(Material::identity) {
            Some(Some(Identity::Agent(n))) => Some(n),
            Some(other) => {
                let got = other.map_or("no postern identity".to_owned(), |i| i.to_string());
                check.at(
                    &file.tls.cert,
                    "tls.cert",
                    format!("not an agent certificate ({got}); issue one with `postern-relay certs issue agent NAME`"),
                );
                None
            }
            None => None,
        };
        let mut services = BTreeMap::new();
        for (name, svc) in file.services.iter() {
            let key = format!("services.{}", name.value);
            if let Err(e) = pki::check_name(&name.value) {
                check.at(name, &key, e.to_string());
            }
            let backends = service_backends(&mut check, &key, svc, &base, env);
            let tls = svc.tls.as_ref().and_then(|t| {
                let mut files = TlsFiles {
                    ca: file.tls.ca.clone(),
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    crl: None,
                };
                files.rebase(&base);
                check.tls(&files, &format!("{key}.tls"))
            });
            let users = svc
                .users
                .as_ref()
                .and_then(|u| users(&mut check, &format!("{key}.users"), u, &base, env));
            services.insert(
                name.value.clone(),
                Service {
                    name: name.value.clone(),
                    backend: backends
                        .nodes
                        .first()
                        .map(|n| n.address.clone())
                        .unwrap_or_default(),
                    nodes: backends.nodes,
                    check: backends.check,
                    wait_for_node: backends.wait_for_node,
                    decisions: backends.decisions,
                    connect_timeout: check.duration(
                        svc.connect_timeout.as_ref(),
                        &format!("{key}.connect_timeout"),
                        DEFAULT_CONNECT_TIMEOUT,
                        CONNECT_TIMEOUT_RANGE,
                    ),
                    tls,
                    users,
                },
            );
        }
        if services.is_empty() && check.is_ok() {
            check.error(
                None,
                "services",
                "no services defined: the agent would offer nothing",
            );
        }
        let quic_reprobe = check.duration(
            file.quic_reprobe.as_ref(),
            "quic_reprobe",
            DEFAULT_QUIC_REPROBE,
            QUIC_REPROBE_RANGE,
        );
        let state_dir = match &file.state_dir {
            Some(d) if d.value.as_os_str().is_empty() => {
                check.at(
                    d,
                    "state_dir",
                    "empty: name a directory the agent may write",
                );
                base.join("state")
            }
            Some(d) => base.join(&d.value),
            None => env
                .var("STATE_DIRECTORY")
                .and_then(|v| v.split(':').next().map(str::to_owned))
                .filter(|v| !v.is_empty())
                .map_or_else(|| base.join("state"), std::path::PathBuf::from),
        };
        let (false, Some(tls), Some(name)) = (relays.is_empty(), tls, name) else {
            return Err(check.fail());
        };
        check.finish(Self {
            relays,
            transport,
            quic_reprobe,
            websocket,
            server_name: file.server_name,
            tls,
            name,
            services,
            state_dir,
        })
    }
}

fn relays(
    check: &mut Check<'_>,
    one: Option<RelayFile>,
    many: Option<Spanned<Vec<RelayFile>>>,
) -> Vec<RelayTarget> {
    let files = match (one, many) {
        (Some(_), Some(rs)) => {
            check.at(&rs, "relays", "give either relay or relays, not both");
            return Vec::new();
        }
        (Some(r), None) => vec![r],
        (None, Some(rs)) if rs.value.is_empty() => {
            check.at(
                &rs,
                "relays",
                "the list is empty: name at least one relay (quic://host:port or wss://host)",
            );
            return Vec::new();
        }
        (None, Some(rs)) => rs.value,
        (None, None) => {
            check.error(
                None,
                "relay",
                "no relay given: set relay: quic://host:port (or wss://host)",
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for f in files {
        let mut target = RelayTarget {
            quic: None,
            websocket: None,
        };
        let urls: Vec<(Spanned<String>, &str)> = match f {
            RelayFile::Url(u) => vec![(u, "relay")],
            RelayFile::Both { quic, websocket } => quic
                .map(|q| (q, "relay.quic"))
                .into_iter()
                .chain(websocket.map(|w| (w, "relay.websocket")))
                .collect(),
        };
        for (url, key) in urls {
            match url.value.parse::<RelayUrl>() {
                Ok(u) if u.scheme == Scheme::Quic && key != "relay.websocket" => {
                    target.quic = Some(u)
                }
                Ok(u) if u.scheme != Scheme::Quic && key != "relay.quic" => {
                    target.websocket = Some(u)
                }
                Ok(u) => check.at(
                    &url,
                    key,
                    format!("{u} is not a {} url", key.trim_start_matches("relay.")),
                ),
                Err(e) => check.at(&url, key, e.to_string()),
            }
        }
        if target.quic.is_some() || target.websocket.is_some() {
            out.push(target);
        } else if check.is_ok() {
            check.error(None, "relay", "a relay needs a quic or a websocket url");
        }
    }
    out
}

/// A service's nodes and how they are checked, validated.
struct ServiceBackends {
    nodes: Vec<Node>,
    check: Option<HealthCheck>,
    wait_for_node: Duration,
    decisions: Decisions,
}

fn service_backends(
    check: &mut Check<'_>,
    key: &str,
    svc: &ServiceFile,
    base: &Path,
    env: &dyn Env,
) -> ServiceBackends {
    let wait_for_node = check.duration(
        svc.wait_for_node.as_ref(),
        &format!("{key}.wait_for_node"),
        DEFAULT_WAIT_FOR_NODE,
        WAIT_FOR_NODE_RANGE,
    );
    let decisions = svc.decisions.as_ref().map(|d| d.value).unwrap_or_default();
    let files = match (&svc.backend, &svc.nodes) {
        (Some(b), Some(_)) => {
            check.at(
                b,
                &format!("{key}.backend"),
                "give either backend (one node) or nodes, not both",
            );
            return no_backends(wait_for_node, decisions);
        }
        (None, None) => {
            check.error(
                None,
                key,
                "no backend: give backend: host:port, or nodes: [{name, address}, ...]",
            );
            return no_backends(wait_for_node, decisions);
        }
        (Some(b), None) => {
            if !looks_like_host_port(&b.value) {
                check.at(
                    b,
                    &format!("{key}.backend"),
                    format!("{:?} is not host:port", b.value),
                );
            }
            if svc.check.is_some() || svc.decisions.is_some() {
                let line = svc.decisions.as_ref().and_then(config::line_of);
                check.error(
                    line.or_else(|| config::line_of(b)),
                    &format!("{key}.backend"),
                    "check and decisions need nodes: [...] (backend: is one node that is \
                     always considered healthy)",
                );
            }
            let node = Node {
                name: SHORTHAND_NODE.to_owned(),
                address: b.value.clone(),
                http: None,
            };
            return ServiceBackends {
                nodes: vec![node],
                check: None,
                wait_for_node,
                decisions: Decisions::Local,
            };
        }
        (None, Some(nodes)) => nodes,
    };
    let nodes_key = format!("{key}.nodes");
    if files.value.is_empty() {
        check.at(
            files,
            &nodes_key,
            "the list is empty: name at least one node",
        );
    } else if files.value.len() > MAX_NODES {
        check.at(files, &nodes_key, format!("at most {MAX_NODES} nodes"));
    }
    let health = health_check(check, key, svc.check.as_ref(), base, env);
    if decisions == Decisions::Cluster
        && !matches!(
            health.as_ref().map(|h| &h.kind),
            Some(CheckKind::Mysql { .. })
        )
        && let Some(d) = &svc.decisions
    {
        check.at(
            d,
            &format!("{key}.decisions"),
            "decisions: cluster needs check type mysql (the monitor user writes the decision)",
        );
    }
    let (http_port, http_path) =
        svc.check
            .as_ref()
            .map_or((DEFAULT_HTTP_PORT, DEFAULT_HTTP_PATH.to_owned()), |c| {
                (
                    c.port.as_ref().map_or(DEFAULT_HTTP_PORT, |p| p.value),
                    c.path
                        .as_ref()
                        .map_or_else(|| DEFAULT_HTTP_PATH.to_owned(), |p| p.value.clone()),
                )
            });
    let is_http = matches!(health.as_ref().map(|h| &h.kind), Some(CheckKind::Http));
    let mut nodes: Vec<Node> = Vec::new();
    for (i, n) in files.value.iter().take(MAX_NODES).enumerate() {
        let node_key = format!("{nodes_key}[{i}]");
        if let Err(e) = pki::check_name(&n.name.value) {
            check.at(&n.name, &format!("{node_key}.name"), e.to_string());
        } else if nodes.iter().any(|o| o.name == n.name.value) {
            check.at(
                &n.name,
                &format!("{node_key}.name"),
                format!("node {:?} is named twice", n.name.value),
            );
        }
        if !looks_like_host_port(&n.address.value) {
            check.at(
                &n.address,
                &format!("{node_key}.address"),
                format!("{:?} is not host:port", n.address.value),
            );
        }
        let http = match (&n.health_url, is_http) {
            (Some(u), false) => {
                check.at(
                    u,
                    &format!("{node_key}.health_url"),
                    "health_url is used by check type http only",
                );
                None
            }
            (Some(u), true) => match HttpTarget::parse(&u.value) {
                Ok(t) => Some(t),
                Err(e) => {
                    check.at(u, &format!("{node_key}.health_url"), e);
                    None
                }
            },
            (None, true) => Some(HttpTarget {
                host: host_of(&n.address.value).to_owned(),
                port: http_port,
                path: http_path.clone(),
            }),
            (None, false) => None,
        };
        nodes.push(Node {
            name: n.name.value.clone(),
            address: n.address.value.clone(),
            http,
        });
    }
    ServiceBackends {
        nodes,
        check: Some(health.unwrap_or(HealthCheck {
            kind: CheckKind::Tcp,
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        })),
        wait_for_node,
        decisions,
    }
}

fn no_backends(wait_for_node: Duration, decisions: Decisions) -> ServiceBackends {
    ServiceBackends {
        nodes: Vec::new(),
        check: None,
        wait_for_node,
        decisions,
    }
}

/// `services.NAME.check`, validated; `None` (after recording why) when it is unusable.
fn health_check(
    check: &mut Check<'_>,
    key: &str,
    file: Option<&CheckFile>,
    base: &Path,
    env: &dyn Env,
) -> Option<HealthCheck> {
    let Some(file) = file else {
        return Some(HealthCheck {
            kind: CheckKind::Tcp,
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        });
    };
    let key = format!("{key}.check");
    let kind = file.kind.as_ref().map(|k| k.value).unwrap_or_default();
    let interval = check.duration(
        file.interval.as_ref(),
        &format!("{key}.interval"),
        DEFAULT_CHECK_INTERVAL,
        CHECK_INTERVAL_RANGE,
    );
    let timeout = check.duration(
        file.timeout.as_ref(),
        &format!("{key}.timeout"),
        DEFAULT_CHECK_TIMEOUT,
        CHECK_TIMEOUT_RANGE,
    );
    let mut count = |v: &Option<Spanned<u32>>, name: &str, default: u32| match v {
        None => default,
        Some(n) if RISE_FALL_RANGE.contains(&n.value) => n.value,
        Some(n) => {
            check.at(
                n,
                &format!("{key}.{name}"),
                format!(
                    "{} is out of range: use a value from {} to {}",
                    n.value,
                    RISE_FALL_RANGE.start(),
                    RISE_FALL_RANGE.end()
                ),
            );
            default
        }
    };
    let rise = count(&file.rise, "rise", DEFAULT_RISE);
    let fall = count(&file.fall, "fall", DEFAULT_FALL);
    // Settings of another kind of check are a mistake worth naming.
    let mut misplaced = |set: bool, line: Option<u32>, name: &str, only: &str| {
        if set {
            check.error(
                line,
                &format!("{key}.{name}"),
                format!("{name} is used by check type {only} only"),
            );
        }
    };
    if kind != CheckType::Mysql {
        misplaced(
            file.user.is_some(),
            file.user.as_ref().and_then(config::line_of),
            "user",
            "mysql",
        );
        misplaced(
            file.password_file.is_some(),
            file.password_file.as_ref().and_then(config::line_of),
            "password_file",
            "mysql",
        );
        misplaced(
            file.password_env.is_some(),
            file.password_env.as_ref().and_then(config::line_of),
            "password_env",
            "mysql",
        );
    }
    if kind != CheckType::Http {
        misplaced(
            file.path.is_some(),
            file.path.as_ref().and_then(config::line_of),
            "path",
            "http",
        );
        misplaced(
            file.port.is_some(),
            file.port.as_ref().and_then(config::line_of),
            "port",
            "http",
        );
    }
    if let Some(p) = &file.path
        && !p.value.starts_with('/')
    {
        check.at(
            p,
            &format!("{key}.path"),
            format!("{:?} must start with /", p.value),
        );
    }
    if let Some(p) = &file.port
        && p.value == 0
    {
        check.at(p, &format!("{key}.port"), "port 0 cannot be checked");
    }
    let kind = match kind {
        CheckType::Tcp => CheckKind::Tcp,
        CheckType::Http => CheckKind::Http,
        CheckType::Mysql => {
            let user = match &file.user {
                Some(u) if !u.value.is_empty() => Some(u.value.clone()),
                Some(u) => {
                    check.at(u, &format!("{key}.user"), "empty: name the monitor user");
                    None
                }
                None => {
                    let line = file.kind.as_ref().and_then(config::line_of);
                    check.error(
                        line,
                        &format!("{key}.user"),
                        "check type mysql needs user: (a monitor user that may read status)",
                    );
                    None
                }
            };
            let password = password(check, &key, file, base, env);
            CheckKind::Mysql {
                user: user?,
                password: password?,
            }
        }
    };
    Some(HealthCheck {
        kind,
        interval,
        timeout,
        rise,
        fall,
    })
}

/// The monitor user's password, from `password_file` or `password_env` (never inline).
fn password(
    check: &mut Check<'_>,
    key: &str,
    file: &CheckFile,
    base: &Path,
    env: &dyn Env,
) -> Option<Secret> {
    let missing = (
        file.user.as_ref().and_then(config::line_of),
        "check type mysql needs",
    );
    secret(
        check,
        key,
        (file.password_file.as_ref(), file.password_env.as_ref()),
        missing,
        base,
        env,
    )
}

/// A password from `KEY.password_file` or `KEY.password_env` (never inline); `missing` is the
/// line and the words of the error when neither is given.
fn secret(
    check: &mut Check<'_>,
    key: &str,
    (password_file, password_env): (
        Option<&Spanned<std::path::PathBuf>>,
        Option<&Spanned<String>>,
    ),
    (line, needs): (Option<u32>, &str),
    base: &Path,
    env: &dyn Env,
) -> Option<Secret> {
    match (password_file, password_env) {
        (Some(f), Some(_)) => {
            check.at(
                f,
                &format!("{key}.password_file"),
                "give password_file or password_env, not both",
            );
            None
        }
        (None, None) => {
            check.error(
                line,
                &format!("{key}.password_file"),
                format!(
                    "{needs} password_file: PATH or password_env: VARIABLE (a password is never \
                     written in the config itself)"
                ),
            );
            None
        }
        (Some(f), None) => {
            let k = format!("{key}.password_file");
            let path = base.join(&f.value);
            let text = std::fs::metadata(&path).and_then(|m| {
                if m.len() > MAX_PASSWORD_FILE {
                    Err(std::io::Error::other(format!(
                        "larger than {MAX_PASSWORD_FILE} bytes: not a password file"
                    )))
                } else {
                    std::fs::read_to_string(&path)
                }
            });
            match text {
                Ok(t) => {
                    let t = t.strip_suffix('\n').unwrap_or(&t);
                    let t = t.strip_suffix('\r').unwrap_or(t);
                    if t.is_empty() {
                        check.at(f, &k, format!("{} is empty", path.display()));
                        None
                    } else {
                        Some(Secret::new(t))
                    }
                }
                Err(e) => {
                    check.at(f, &k, format!("cannot read {}: {e}", path.display()));
                    None
                }
            }
        }
        (None, Some(v)) => match env.var(&v.value) {
            Some(p) if !p.is_empty() => Some(Secret::new(p)),
            _ => {
                check.at(
                    v,
                    &format!("{key}.password_env"),
                    format!("environment variable {} is not set (or empty)", v.value),
                );
                None
            }
        },
    }
}

/// `services.NAME.users`, validated; `None` (after recording why) when it is unusable.
fn users(
    check: &mut Check<'_>,
    key: &str,
    u: &UsersFile,
    base: &Path,
    env: &dyn Env,
) -> Option<Users> {
    let admin = u.admin.value.trim();
    if admin.is_empty() || admin.len() > crate::users::MAX_NAME {
        check.at(
            &u.admin,
            &format!("{key}.admin"),
            format!(
                "name the admin user (1 to {} characters)",
                crate::users::MAX_NAME
            ),
        );
    }
    let needs = (config::line_of(&u.admin), "users needs");
    let password = secret(
        check,
        key,
        (u.password_file.as_ref(), u.password_env.as_ref()),
        needs,
        base,
        env,
    );
    let mut grants = Vec::new();
    if u.grants.value.is_empty() {
        check.at(
            &u.grants,
            &format!("{key}.grants"),
            "the list is empty: give what each binding's user may do, e.g. \
             \"SELECT, INSERT, UPDATE, DELETE ON appdb.*\"",
        );
    }
    for (i, g) in u.grants.value.iter().enumerate() {
        match crate::users::Grant::parse(&g.value) {
            Ok(grant) => grants.push(grant),
            Err(e) => check.at(g, &format!("{key}.grants[{i}]"), e),
        }
    }
    let host = match &u.host {
        None => DEFAULT_USERS_HOST.to_owned(),
        Some(h) => match crate::users::check_host(&h.value) {
            Ok(()) => h.value.clone(),
            Err(e) => {
                check.at(h, &format!("{key}.host"), e);
                DEFAULT_USERS_HOST.to_owned()
            }
        },
    };
    let ok = !admin.is_empty() && grants.len() == u.grants.value.len() && !grants.is_empty();
    Some(Users {
        admin: admin.to_owned(),
        password: password?,
        grants,
        host,
    })
    .filter(|_| ok)
}

impl HttpTarget {
    /// Parses `http://host[:port][/path]` (the port defaults to 80, the path to `/`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url:?} is not an http:// url (https health endpoints are not supported)")
        })?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(format!("{url:?}: credentials in the url are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed ["))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
        };
        let bad = |c: char| c.is_whitespace() || c.is_control();
        if host.is_empty() || host.contains(bad) || path.contains(bad) {
            return Err(format!("{url:?} is not a usable url"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path,
        })
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Whether `s` is `host:port` with a numeric port.
pub fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::pki::{Ca, Kind, LeafSpec};

    /// A directory with an agent certificate, and the config text's common head.
    struct Dir {
        dir: tempfile::TempDir,
    }

    impl Dir {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (ca, _) = Ca::generate("test", 1).unwrap();
            let issued = ca.issue(&LeafSpec::new(Kind::Agent, "db1", 1)).unwrap();
            std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
            std::fs::write(dir.path().join("agent.pem"), &issued.cert_pem).unwrap();
            std::fs::write(dir.path().join("agent-key.pem"), &issued.key_pem).unwrap();
            Self { dir }
        }

        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("agent.yaml")
        }

        fn parse(&self, services: &str) -> Result<Config, ConfigErrors> {
            self.parse_env(services, &BTreeMap::<String, String>::new())
        }

        fn parse_env(&self, services: &str, env: &dyn Env) -> Result<Config, ConfigErrors> {
            let text = format!(
                "relay: quic://relay.example.com:7443\n\
                 tls: {{ ca: ca.pem, cert: agent.pem, key: agent-key.pem }}\n{services}"
            );
            Config::parse(&self.path(), &text, env)
        }

        /// The one error of `services`, as `line: key: message` (the line within `services`,
        /// 0 when none).
        fn error(&self, services: &str) -> String {
            let e = self.parse(services).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            let e = &e.0[0];
            format!(
                "{}: {}: {}",
                e.line.map_or(0, |l| l.saturating_sub(2)),
                e.key.as_deref().unwrap_or(""),
                e.message
            )
        }
    }

    #[test]
    fn backend_is_one_always_healthy_node() {
        let d = Dir::new();
        let c = d
            .parse("services:\n  orders:\n    backend: 127.0.0.1:3306\n")
            .unwrap();
        let s = &c.services["orders"];
        assert_eq!(s.backend, "127.0.0.1:3306");
        assert_eq!(
            s.nodes,
            vec![Node {
                name: SHORTHAND_NODE.into(),
                address: "127.0.0.1:3306".into(),
                http: None
            }]
        );
        assert!(s.check.is_none());
        assert_eq!(s.decisions, Decisions::Local);
        assert_eq!(c.state_dir, d.dir.path().join("state"));
    }

    #[test]
    fn nodes_with_defaults() {
        let d = Dir::new();
        let c = d
            .parse(
                "services:\n  orders:\n    nodes:\n      - { name: n1, address: 10.0.0.11:3306 }\n      - { name: n2, address: 10.0.0.12:3306 }\n",
            )
            .unwrap();
        let s = &c.services["orders"];
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.backend, "10.0.0.11:3306");
        let check = s.check.as_ref().unwrap();
        assert!(matches!(check.kind, CheckKind::Tcp));
        assert_eq!(
            (check.interval, check.timeout, check.rise, check.fall),
            (Duration::from_millis(500), Duration::from_millis(750), 2, 2)
        );
        assert_eq!(s.wait_for_node, Duration::from_secs(5));
    }

    #[test]
    fn http_targets_come_from_the_node_or_health_url() {
        let d = Dir::new();
        let c = d
            .parse(
                "state_dir: /var/lib/postern\nservices:\n  orders:\n    nodes:\n      - { name: n1, address: 10.0.0.11:3306 }\n      - { name: n2, address: 10.0.0.12:3306, health_url: \"http://10.0.0.99:8080/health?x=1\" }\n    check: { type: http, interval: 200ms, timeout: 300ms, rise: 3, fall: 1, port: 9201 }\n    wait_for_node: 2s\n",
            )
            .unwrap();
        let s = &c.services["orders"];
        assert_eq!(
            s.nodes[0].http.as_ref().unwrap().to_string(),
            "http://10.0.0.11:9201/api/v1/status"
        );
        assert_eq!(
            s.nodes[1].http.as_ref().unwrap().to_string(),
            "http://10.0.0.99:8080/health?x=1"
        );
        let check = s.check.as_ref().unwrap();
        assert_eq!((check.rise, check.fall), (3, 1));
        assert_eq!(s.wait_for_node, Duration::from_secs(2));
        assert_eq!(c.state_dir, Path::new("/var/lib/postern"));
    }

    #[test]
    fn mysql_password_from_a_file_or_the_environment_and_never_shown() {
        let d = Dir::new();
        std::fs::write(d.dir.path().join("pw"), "s3cret\n").unwrap();
        let c = d
            .parse(
                "services:\n  orders:\n    nodes: [{ name: n1, address: 10.0.0.11:3306 }]\n    check: { type: mysql, user: mon, password_file: pw }\n    decisions: cluster\n",
            )
            .unwrap();
        let s = &c.services["orders"];
        let CheckKind::Mysql { user, password } = &s.check.as_ref().unwrap().kind else {
            panic!("not mysql");
        };
        assert_eq!((user.as_str(), password.expose()), ("mon", "s3cret"));
        assert_eq!(s.decisions, Decisions::Cluster);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("***"),
            "{shown}"
        );

        let env: BTreeMap<&str, &str> =
            [("MON_PW", "from-env"), ("STATE_DIRECTORY", "/st:/x")].into();
        let c = d
            .parse_env(
                "services:\n  orders:\n    nodes: [{ name: n1, address: 10.0.0.11:3306 }]\n    check: { type: mysql, user: mon, password_env: MON_PW }\n",
                &env,
            )
            .unwrap();
        let CheckKind::Mysql { password, .. } = &c.services["orders"].check.as_ref().unwrap().kind
        else {
            panic!("not mysql");
        };
        assert_eq!(password.expose(), "from-env");
        assert_eq!(c.state_dir, Path::new("/st"));
    }

    #[test]
    fn mistakes_name_line_and_key() {
        let d = Dir::new();
        let head = "services:\n  orders:\n";
        let nodes = "    nodes: [{ name: n1, address: 10.0.0.11:3306 }]\n";
        let cases = [
            (
                format!("{head}    backend: a:1\n    nodes: [{{ name: n1, address: a:1 }}]\n"),
                "3: services.orders.backend: give either backend (one node) or nodes, not both",
            ),
            (
                format!("{head}    connect_timeout: 1s\n"),
                "0: services.orders: no backend",
            ),
            (
                format!("{head}    nodes: []\n"),
                "3: services.orders.nodes: the list is empty",
            ),
            (
                format!(
                    "{head}    nodes:\n      - {{ name: n1, address: a:1 }}\n      - {{ name: n1, address: b:1 }}\n"
                ),
                "5: services.orders.nodes[1].name: node \"n1\" is named twice",
            ),
            (
                format!("{head}    nodes:\n      - {{ name: n1, address: nope }}\n"),
                "4: services.orders.nodes[0].address: \"nope\" is not host:port",
            ),
            (
                format!("{head}{nodes}    check:\n      interval: 2h\n"),
                "5: services.orders.check.interval: 2h is out of range",
            ),
            (
                format!("{head}{nodes}    check:\n      fall: 0\n"),
                "5: services.orders.check.fall: 0 is out of range",
            ),
            (
                format!("{head}{nodes}    check:\n      type: mysql\n      user: mon\n"),
                "6: services.orders.check.password_file: check type mysql needs password_file",
            ),
            (
                format!(
                    "{head}{nodes}    check:\n      type: mysql\n      user: mon\n      password_env: NOPE_NOT_SET\n"
                ),
                "7: services.orders.check.password_env: environment variable NOPE_NOT_SET is not set",
            ),
            (
                format!("{head}{nodes}    check:\n      type: tcp\n      path: /x\n"),
                "6: services.orders.check.path: path is used by check type http only",
            ),
            (
                format!("{head}{nodes}    decisions: cluster\n"),
                "4: services.orders.decisions: decisions: cluster needs check type mysql",
            ),
            (
                format!(
                    "{head}    nodes:\n      - {{ name: n1, address: a:1, health_url: \"https://x/\" }}\n    check: {{ type: http }}\n"
                ),
                "4: services.orders.nodes[0].health_url: \"https://x/\" is not an http:// url",
            ),
            (
                format!("{head}{nodes}    wait_for_node: 11m\n"),
                "4: services.orders.wait_for_node: 11m is out of range",
            ),
            (
                format!("{head}    backend: a:1\n    decisions: local\n"),
                "4: services.orders.backend: check and decisions need nodes",
            ),
            (
                format!("{head}{nodes}    check:\n      type: carrier-pigeon\n"),
                "5: type: unknown variant",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .map(|(text, want)| (d.error(text), want))
            .filter(|(got, want)| !got.starts_with(*want))
            .map(|(got, want)| format!(" got: {got}\nwant: {want}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn users_take_grants_a_host_and_a_password_never_shown() {
        let d = Dir::new();
        std::fs::write(d.dir.path().join("admin-pw"), "adm1n-s3cret\n").unwrap();
        let c = d
            .parse(
                "services:\n  orders:\n    backend: 127.0.0.1:3306\n    users:\n      admin: postern_admin\n      password_file: admin-pw\n      grants: [\"select, insert ON appdb.*\", \"SELECT ON app_db.t\"]\n  billing:\n    backend: 127.0.0.1:3307\n",
            )
            .unwrap();
        let u = c.services["orders"].users.as_ref().unwrap();
        assert_eq!(u.admin, "postern_admin");
        assert_eq!(u.password.expose(), "adm1n-s3cret");
        assert_eq!(u.host, "%");
        let grants: Vec<String> = u.grants.iter().map(ToString::to_string).collect();
        assert_eq!(
            grants,
            ["SELECT, INSERT ON `appdb`.*", "SELECT ON `app_db`.`t`"]
        );
        assert!(c.services["billing"].users.is_none());
        let shown = format!("{c:?}");
        assert!(!shown.contains("adm1n-s3cret"), "{shown}");

        let env: BTreeMap<&str, &str> = [("ADMIN_PW", "from-env")].into();
        let c = d
            .parse_env(
                "services:\n  orders:\n    backend: 127.0.0.1:3306\n    users: { admin: a, password_env: ADMIN_PW, grants: [\"ALL ON appdb.*\"], host: \"10.0.%\" }\n",
                &env,
            )
            .unwrap();
        let u = c.services["orders"].users.as_ref().unwrap();
        assert_eq!(
            (u.password.expose(), u.host.as_str()),
            ("from-env", "10.0.%")
        );
    }

    #[test]
    fn users_mistakes_name_line_and_key() {
        let d = Dir::new();
        std::fs::write(d.dir.path().join("pw"), "x\n").unwrap();
        let head = "services:\n  orders:\n    backend: a:1\n    users:\n";
        let cases = [
            (
                format!("{head}      admin: adm\n      grants: [\"SELECT ON db.*\"]\n"),
                "5: services.orders.users.password_file: users needs password_file: PATH or password_env",
            ),
            (
                format!(
                    "{head}      admin: adm\n      password_file: pw\n      password_env: X\n      grants: [\"SELECT ON db.*\"]\n"
                ),
                "6: services.orders.users.password_file: give password_file or password_env, not both",
            ),
            (
                format!("{head}      admin: adm\n      password_file: pw\n      grants: []\n"),
                "7: services.orders.users.grants: the list is empty",
            ),
            (
                format!(
                    "{head}      admin: adm\n      password_file: pw\n      grants:\n        - SELECT ON db.*\n        - SUPER ON db.*\n"
                ),
                "9: services.orders.users.grants[1]: \"SUPER ON db.*\": privilege \"SUPER\" may not be granted",
            ),
            (
                format!(
                    "{head}      admin: adm\n      password_file: pw\n      grants: [\"ALL ON *.*\"]\n"
                ),
                "7: services.orders.users.grants[0]: \"ALL ON *.*\": \"*.*\" is not db.*",
            ),
            (
                format!(
                    "{head}      admin: adm\n      password_file: pw\n      grants: [\"SELECT ON db.*\"]\n      host: \"x'y\"\n"
                ),
                "8: services.orders.users.host: \"x'y\" is not a MySQL host pattern",
            ),
            (
                format!(
                    "{head}      admin: \"\"\n      password_file: pw\n      grants: [\"SELECT ON db.*\"]\n"
                ),
                "5: services.orders.users.admin: name the admin user",
            ),
            (
                format!(
                    "{head}      admin: adm\n      password: inline\n      grants: [\"SELECT ON db.*\"]\n"
                ),
                "6: password: unknown field",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .map(|(text, want)| (d.error(text), want))
            .filter(|(got, want)| !got.starts_with(*want))
            .map(|(got, want)| format!(" got: {got}\nwant: {want}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn the_example_parses() {
        let d = Dir::new();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/agent.yaml");
        let text = std::fs::read_to_string(example).unwrap();
        let base = d.dir.path();
        let text = text
            .replace(
                "/etc/postern/ca.pem",
                &base.join("ca.pem").to_string_lossy(),
            )
            .replace(
                "/etc/postern/agent-db-host-1.pem",
                &base.join("agent.pem").to_string_lossy(),
            )
            .replace(
                "/etc/postern/agent-db-host-1-key.pem",
                &base.join("agent-key.pem").to_string_lossy(),
            )
            .replace(
                "/etc/postern/admin-password",
                &base.join("admin-password").to_string_lossy(),
            )
            .replace(
                "/etc/postern/server-reports.pem",
                &base.join("agent.pem").to_string_lossy(),
            )
            .replace(
                "/etc/postern/server-reports-key.pem",
                &base.join("agent-key.pem").to_string_lossy(),
            );
        std::fs::write(base.join("admin-password"), "x\n").unwrap();
        let env = BTreeMap::<String, String>::new();
        let c = Config::parse(&d.path(), &text, &env).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.services["orders"].users.is_some());
        let s = &c.services["inventory"];
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(
            s.nodes[2].http.as_ref().unwrap().to_string(),
            "http://10.0.0.13:9201/api/v1/status"
        );
    }

    #[test]
    fn http_urls_parse() {
        let t = HttpTarget::parse("http://[::1]:9200/api/v1/status").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 9200, "/api/v1/status")
        );
        let t = HttpTarget::parse("http://db").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("db", 80, "/"));
        for bad in [
            "ftp://x",
            "http://",
            "http://x:0/",
            "http://x:99999/",
            "http://u:p@x/",
            "http://a b/",
        ] {
            assert!(HttpTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
