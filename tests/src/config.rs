//! Typed `relay.yaml` and `agent.yaml` for tests: structs that mirror the files' keys
//! (`relay/src/config.rs`, `agent/src/config.rs`) and serialize to YAML, so a test states what it
//! changes (`relay.service_mut("orders").max_handshakes = Some(1)`) instead of editing text.
//!
//! Unset options are left out of the file, so the product's defaults apply. `extra` holds keys
//! the product does not know, for tests of config errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_relay::config::{Protocol, TlsTermination};
use serde::Serialize;

use crate::TestPki;

/// `relay.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct RelayConfig {
    /// `listen`.
    pub listen: RelayListen,
    /// `tls`.
    pub tls: Tls,
    /// `heartbeat_interval`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<Duration>,
    /// `handshake_timeout`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<Duration>,
    /// `first_packet_timeout`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub first_packet_timeout: Option<Duration>,
    /// `instance`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// `max_connections` (the whole relay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// `api`: basic-auth credentials for `/v0/*`, the dashboard and `/metrics` (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<RelayApi>,
    /// `health_listen`: a separate port for load balancers (200 on any path, no auth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_listen: Option<String>,
    /// `agents`: agent name → the services it may offer.
    pub agents: BTreeMap<String, RelayAgent>,
    /// `services`.
    pub services: BTreeMap<String, RelayService>,
    /// Keys the relay does not know (for tests of config errors).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `listen` of `relay.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct RelayListen {
    /// `listen.quic` (none: a relay without UDP, as on Cloud Foundry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<String>,
    /// `listen.http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// A `tls:` block (both files).
#[derive(Debug, Clone, Serialize)]
pub struct Tls {
    /// `tls.ca`.
    pub ca: PathBuf,
    /// `tls.cert`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
    /// `tls.crl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// `api` of `relay.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct RelayApi {
    /// `api.username`.
    pub username: String,
    /// `api.password_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// `api.password_env`: the variable that holds the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
}

/// `agents.NAME` of `relay.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct RelayAgent {
    /// `agents.NAME.services`.
    pub services: Vec<String>,
}

/// `services.NAME` of `relay.yaml`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayService {
    /// `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `tls_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    /// `clients`.
    pub clients: Vec<String>,
    /// `protocol`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// `max_connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// `max_handshakes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes: Option<usize>,
    /// `tls_termination`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_termination: Option<TlsTermination>,
    /// `allowed_users`: client name (or `"*"`) → MySQL users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_users: Option<BTreeMap<String, Vec<String>>>,
    /// `client_attribute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_attribute: Option<bool>,
    /// `broker`: the service's plan in the service broker's catalog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<serde_json::Value>,
}

impl RelayConfig {
    /// A relay on ephemeral ports (QUIC and HTTP) with the certificate `server-relay` of `pki`,
    /// a 1 s heartbeat (so dead peers are found quickly), a 5 s handshake deadline, and no
    /// agents or services yet.
    pub fn new(pki: &TestPki) -> Self {
        Self {
            listen: RelayListen {
                quic: Some("127.0.0.1:0".into()),
                http: Some("127.0.0.1:0".into()),
            },
            tls: Tls::of(pki, "server-relay"),
            heartbeat_interval: Some(Duration::from_secs(1)),
            handshake_timeout: Some(Duration::from_secs(5)),
            first_packet_timeout: None,
            instance: None,
            max_connections: None,
            api: None,
            health_listen: None,
            agents: BTreeMap::new(),
            services: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Turns the API on for `username`, whose password the relay reads from `password_file`.
    pub fn api(&mut self, username: &str, password_file: &Path) -> &mut Self {
        self.api = Some(RelayApi {
            username: username.to_owned(),
            password_file: Some(password_file.to_owned()),
            password_env: None,
        });
        self
    }

    /// Lets agent `name` offer `services` (added to what it may offer already).
    pub fn agent(&mut self, name: &str, services: &[&str]) -> &mut Self {
        let entry = self
            .agents
            .entry(name.to_owned())
            .or_insert_with(|| RelayAgent {
                services: Vec::new(),
            });
        entry
            .services
            .extend(services.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Adds service `name` for `clients`, with a MySQL-native and a TLS-first listener on
    /// ephemeral ports; returns it for further settings.
    pub fn service(&mut self, name: &str, clients: &[&str]) -> &mut RelayService {
        self.services.insert(
            name.to_owned(),
            RelayService {
                listen: Some("127.0.0.1:0".into()),
                tls_listen: Some("127.0.0.1:0".into()),
                clients: clients.iter().map(|c| (*c).to_owned()).collect(),
                ..RelayService::default()
            },
        );
        self.service_mut(name)
    }

    /// Service `name`, which must exist.
    pub fn service_mut(&mut self, name: &str) -> &mut RelayService {
        self.services
            .get_mut(name)
            .unwrap_or_else(|| panic!("relay config has no service {name}"))
    }

    /// Replaces every ephemeral port (`:0`) with one that is free now, so that a relay
    /// restarted with this config comes back on the same addresses.
    pub fn pin_ports(&mut self) {
        let pin_tcp = |a: &mut String| {
            if a.ends_with(":0") {
                *a = format!("127.0.0.1:{}", crate::mariadb::free_port());
            }
        };
        if let Some(quic) = &mut self.listen.quic
            && quic.ends_with(":0")
        {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
            let port = udp.local_addr().expect("udp address").port();
            *quic = format!("127.0.0.1:{port}");
        }
        self.listen.http.iter_mut().for_each(pin_tcp);
        self.health_listen.iter_mut().for_each(pin_tcp);
        for svc in self.services.values_mut() {
            svc.listen.iter_mut().for_each(pin_tcp);
            svc.tls_listen.iter_mut().for_each(pin_tcp);
        }
    }

    /// The YAML text.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("relay config serializes")
    }

    /// Writes the YAML to `path` and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_yaml()).expect("write relay config");
        path.to_owned()
    }

    /// Parses the written file as the relay does (panics with its errors), in an empty
    /// environment, so that the test machine's own variables do not leak in.
    pub fn load(&self, path: &Path) -> postern_relay::Config {
        self.load_with(path, &[])
    }

    /// [`load`](Self::load) in the environment `env` (e.g. `PORT`, or Cloud Foundry's
    /// `VCAP_APPLICATION` and `CF_INSTANCE_INDEX`).
    pub fn load_with(&self, path: &Path, env: &[(&str, &str)]) -> postern_relay::Config {
        self.write(path);
        let env: BTreeMap<&str, &str> = env.iter().copied().collect();
        postern_relay::Config::load_with(path, &env)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.to_yaml()))
    }
}

/// `agent.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// `relay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
    /// `relays`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays: Option<Vec<RelaySpec>>,
    /// `transport`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<AgentTransport>,
    /// `quic_reprobe`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub quic_reprobe: Option<Duration>,
    /// `server_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// `tls`.
    pub tls: Tls,
    /// `websocket`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub websocket: Option<AgentWebsocket>,
    /// `state_dir`: where the agent keeps its decisions (terms) across restarts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// `services`.
    pub services: BTreeMap<String, AgentService>,
    /// Keys the agent does not know (for tests of config errors).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One relay in `agent.yaml`: a URL, or both transports of the same relay.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RelaySpec {
    /// `quic://...`, `wss://...` or `ws://...`.
    Url(String),
    /// `{ quic: ..., websocket: ... }`.
    Both {
        /// The QUIC url.
        quic: String,
        /// The WebSocket url.
        websocket: String,
    },
}

/// `transport` of `agent.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentTransport {
    /// Race QUIC and WebSocket.
    Auto,
    /// QUIC only.
    Quic,
    /// WebSocket only.
    Websocket,
}

/// `websocket` of `agent.yaml`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentWebsocket {
    /// `websocket.ping_interval`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<Duration>,
    /// `websocket.proxy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// `websocket.cloud_foundry`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cloud_foundry: bool,
}

/// `services.NAME` of `agent.yaml`: one `backend`, or several `nodes` with a `check`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentService {
    /// `backend`: the one node (named `backend`, no checks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `nodes`: the service's nodes, in config order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<ServiceNode>>,
    /// `check`: how the nodes' health is checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// `wait_for_node`: how long a new client waits when no node is healthy.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub wait_for_node: Option<Duration>,
    /// `decisions`: where the decision record lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Decisions>,
    /// `connect_timeout`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// `tls`: the service certificate, for `tls_termination: agent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServiceTls>,
    /// `users`: per-binding database users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<AgentUsers>,
}

/// `services.NAME.users` of `agent.yaml`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentUsers {
    /// `admin`: the MySQL user that creates and drops binding users.
    pub admin: String,
    /// `password_file`: its password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// `password_env`: the variable that holds its password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `grants`: what each binding's user gets.
    pub grants: Vec<String>,
    /// `host`: the users' host part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One of `services.NAME.nodes` of `agent.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceNode {
    /// `name`.
    pub name: String,
    /// `address` (`host:port`).
    pub address: String,
    /// `health_url`: the `http` check's URL for this node (overrides `check.path`/`port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
}

/// `services.NAME.check` of `agent.yaml`. Unset fields take the agent's defaults.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    /// `type`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    /// `interval`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// `timeout`.
    #[serde(with = "human", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// `rise`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// `fall`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// `user` (mysql).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `password_file` (mysql).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// `password_env` (mysql): the variable that holds the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `path` (http).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `port` (http).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `check.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Log in with the monitor user and read wsrep status and `read_only`.
    Mysql,
    /// galera-agent/clustercheck compatible HTTP.
    Http,
    /// A TCP connect.
    Tcp,
}

/// `decisions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decisions {
    /// A file in `state_dir`.
    Local,
    /// A table in the Galera cluster (several agents for one service).
    Cluster,
}

/// `services.NAME.tls` of `agent.yaml`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceTls {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl AgentConfig {
    /// Agent `name` (certificate `agent-NAME` of `pki`, issued if needed) dialling `relay`,
    /// verifying the relay as `localhost`, with no services yet.
    pub fn new(pki: &TestPki, name: &str, relay: RelaySpec) -> Self {
        let base = pki.issue(postern_common::pki::Kind::Agent, name);
        Self {
            relay: Some(relay),
            relays: None,
            transport: None,
            quic_reprobe: None,
            server_name: Some("localhost".into()),
            tls: Tls::of(pki, &base),
            websocket: None,
            state_dir: None,
            services: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Offers service `name` at `backend` (with a 2 s connect timeout); returns it.
    pub fn service(&mut self, name: &str, backend: &str) -> &mut AgentService {
        self.services.insert(
            name.to_owned(),
            AgentService {
                backend: Some(backend.to_owned()),
                connect_timeout: Some(Duration::from_secs(2)),
                ..AgentService::default()
            },
        );
        self.service_mut(name)
    }

    /// Offers service `name` on `nodes` (name, address, health URL) with `check`; returns it.
    pub fn nodes_service(
        &mut self,
        name: &str,
        nodes: Vec<ServiceNode>,
        check: Check,
    ) -> &mut AgentService {
        self.services.insert(
            name.to_owned(),
            AgentService {
                nodes: Some(nodes),
                check: Some(check),
                connect_timeout: Some(Duration::from_secs(2)),
                ..AgentService::default()
            },
        );
        self.service_mut(name)
    }

    /// Service `name`, which must exist.
    pub fn service_mut(&mut self, name: &str) -> &mut AgentService {
        self.services
            .get_mut(name)
            .unwrap_or_else(|| panic!("agent config has no service {name}"))
    }

    /// The `websocket:` block, made if missing.
    pub fn websocket_mut(&mut self) -> &mut AgentWebsocket {
        self.websocket.get_or_insert_with(AgentWebsocket::default)
    }

    /// The YAML text.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("agent config serializes")
    }

    /// Writes the YAML to `path` and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_yaml()).expect("write agent config");
        path.to_owned()
    }

    /// Parses the written file as the agent does (panics with its errors).
    pub fn load(&self, path: &Path) -> postern_agent::Config {
        self.write(path);
        postern_agent::Config::load(path).unwrap_or_else(|e| panic!("{e}\n{}", self.to_yaml()))
    }
}

impl RelaySpec {
    /// `quic://ADDR`.
    pub fn quic(addr: SocketAddr) -> Self {
        Self::Url(format!("quic://{addr}"))
    }
}

impl Tls {
    /// The CA of `pki` with certificate `base`.
    pub fn of(pki: &TestPki, base: &str) -> Self {
        let (cert, key) = pki.files(base);
        Self {
            ca: pki.ca(),
            cert,
            key,
            crl: None,
        }
    }
}

/// Durations as the config files write them (`1500ms`, `5s`).
mod human {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) if d.subsec_millis() == 0 => s.serialize_str(&format!("{}s", d.as_secs())),
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_round_trip_through_the_products_parsers() {
        let pki = TestPki::new();
        let mut relay = RelayConfig::new(&pki);
        relay.agent("db1", &["orders"]);
        let svc = relay.service("orders", &["alice", "bob"]);
        svc.max_handshakes = Some(2);
        svc.allowed_users = Some(BTreeMap::from([("alice".into(), vec!["root".into()])]));
        relay.handshake_timeout = Some(Duration::from_millis(1500));
        let parsed = relay.load(&pki.dir().join("relay.yaml"));
        assert_eq!(parsed.handshake_timeout, Duration::from_millis(1500));
        assert_eq!(parsed.heartbeat, Duration::from_secs(1));
        assert_eq!(parsed.services["orders"].max_handshakes, 2);

        let mut agent = AgentConfig::new(
            &pki,
            "db1",
            RelaySpec::quic("127.0.0.1:7443".parse().unwrap()),
        );
        agent.service("orders", "127.0.0.1:3306");
        agent.websocket_mut().ping_interval = Some(Duration::from_secs(2));
        let parsed = agent.load(&pki.dir().join("agent.yaml"));
        assert_eq!(parsed.name, "db1");
        assert_eq!(parsed.services["orders"].backend, "127.0.0.1:3306");
        assert_eq!(parsed.websocket.ping_interval, Some(Duration::from_secs(2)));
    }

    #[test]
    fn failover_keys_are_written_as_the_plan_names_them() {
        let pki = TestPki::new();
        let mut agent = AgentConfig::new(
            &pki,
            "db1",
            RelaySpec::quic("127.0.0.1:7443".parse().unwrap()),
        );
        agent.state_dir = Some("/var/lib/postern".into());
        let svc = agent.nodes_service(
            "orders",
            vec![
                ServiceNode {
                    name: "n1".into(),
                    address: "10.0.0.11:3306".into(),
                    health_url: None,
                },
                ServiceNode {
                    name: "n2".into(),
                    address: "10.0.0.12:3306".into(),
                    health_url: Some("http://10.0.0.12:9200/api/v1/status".into()),
                },
            ],
            Check {
                kind: Some(CheckKind::Mysql),
                interval: Some(Duration::from_millis(500)),
                fall: Some(2),
                user: Some("postern_monitor".into()),
                password_file: Some("/etc/postern/monitor-password".into()),
                ..Check::default()
            },
        );
        svc.wait_for_node = Some(Duration::from_secs(5));
        svc.decisions = Some(Decisions::Cluster);
        let yaml = agent.to_yaml();
        for key in [
            "state_dir: /var/lib/postern",
            "nodes:",
            "name: n1",
            "address: 10.0.0.11:3306",
            "health_url: http://10.0.0.12:9200/api/v1/status",
            "type: mysql",
            "interval: 500ms",
            "fall: 2",
            "user: postern_monitor",
            "password_file: /etc/postern/monitor-password",
            "wait_for_node: 5s",
            "decisions: cluster",
        ] {
            assert!(yaml.contains(key), "{key:?} in\n{yaml}");
        }
        assert!(!yaml.contains("backend"), "{yaml}");

        let mut relay = RelayConfig::new(&pki);
        relay.api("admin", Path::new("/etc/postern/api-password"));
        relay.health_listen = Some("127.0.0.1:0".into());
        relay.pin_ports();
        let yaml = relay.to_yaml();
        for key in [
            "api:",
            "username: admin",
            "password_file: /etc/postern/api-password",
            "health_listen: 127.0.0.1:",
        ] {
            assert!(yaml.contains(key), "{key:?} in\n{yaml}");
        }
        assert!(!yaml.contains("health_listen: 127.0.0.1:0\n"), "{yaml}");
    }

    #[test]
    fn unknown_keys_reach_the_file() {
        let pki = TestPki::new();
        let mut relay = RelayConfig::new(&pki);
        relay.extra.insert("heartbeet".into(), "2s".into());
        assert!(
            relay.to_yaml().contains("heartbeet: 2s"),
            "{}",
            relay.to_yaml()
        );
    }
}
