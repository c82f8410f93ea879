//! `relay.yaml`: what the relay listens on, which agents may offer which services, and which
//! clients may reach them.
//!
//! ```yaml
//! listen:
//!   quic: 0.0.0.0:7443            # agents and `connect` clients (UDP)
//!   http: 0.0.0.0:8080            # health, readiness, API (optional)
//! tls: { ca: ca.pem, cert: relay.pem, key: relay-key.pem }
//! agents:
//!   db-host-1: { services: [orders] }
//! services:
//!   orders:
//!     listen: 0.0.0.0:13306       # MySQL-native listener: stock drivers with a client certificate
//!     tls_listen: 0.0.0.0:13307   # TLS-first listener for sidecars (optional)
//!     clients: [billing, alice]   # client identities allowed ("*": any valid certificate)
//!     allowed_users:              # MySQL users each client may log in as (optional)
//!       billing: [app]
//!       alice: ["*"]
//!     client_attribute: true      # tag sessions with connection attribute postern_client
//!     tls_termination: relay      # or `agent`: TLS ends at the agent, the relay stays blind
//! ```
//!
//! What `listen` is depends on the protocol: for `mysql` services (the default) it speaks MySQL
//! and upgrades to TLS in-band, as a MySQL server does ([`crate::listen::mysql`]); for `tcp` services it
//! is TLS-first. `tls_listen` is always TLS-first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_common::config::{
    self, Check, ConfigErrors, Entries, HumanDuration, Spanned, TlsFiles,
};
use postern_common::mysql::server::Rules;
use postern_common::pki;
use postern_common::policy::ServicePolicy;
pub use postern_common::policy::{Acl, AllowedUsers, Users};
use postern_common::tls::Material;
use serde::Deserialize;

/// Default heartbeat interval on agent control streams.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default deadline for a client's TLS handshake and first frame.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline for a client's first packet (the MySQL SSLRequest, the TLS ClientHello),
/// counted from accept.
pub const DEFAULT_FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(3);
/// Default limit of concurrent client connections per service.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default limit of connections per MySQL service that are still in their handshake (not yet
/// authorised; when it is reached, the oldest gives way). They hold no database connection, only
/// a socket and TLS state, so the limit is generous: a burst of real clients fits.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;

/// The YAML shape of `relay.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Listen,
    tls: TlsFiles,
    #[serde(default)]
    heartbeat_interval: Option<HumanDuration>,
    #[serde(default)]
    handshake_timeout: Option<HumanDuration>,
    #[serde(default)]
    first_packet_timeout: Option<HumanDuration>,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    agents: Entries<AgentFile>,
    #[serde(default)]
    services: Entries<ServiceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Listen {
    quic: Spanned<String>,
    #[serde(default)]
    http: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    services: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    tls_listen: Option<Spanned<String>>,
    clients: Vec<Spanned<String>>,
    #[serde(default)]
    protocol: Option<Spanned<Protocol>>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_handshakes: Option<Spanned<usize>>,
    #[serde(default)]
    tls_termination: Option<Spanned<TlsTermination>>,
    #[serde(default)]
    allowed_users: Option<Spanned<UsersFile>>,
    #[serde(default)]
    client_attribute: Option<Spanned<bool>>,
}

/// `allowed_users`: a list for every client, or a mapping from client name (or `"*"`) to a list.
#[derive(Debug)]
enum UsersFile {
    List(Vec<Spanned<String>>),
    Map(Entries<Vec<Spanned<String>>>),
}

impl<'de> Deserialize<'de> for UsersFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UsersFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a list of MySQL user names, or a mapping from client name to such a list",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(UsersFile::List(out))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                Entries::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(UsersFile::Map)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// What a service speaks, so refusals can be put in words its clients show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// MySQL or MariaDB: refusals are MySQL ERR packets.
    #[default]
    Mysql,
    /// Any TCP protocol: refusals close the connection.
    Tcp,
}

/// Where TLS from a MySQL client ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsTermination {
    /// At the relay: it verifies the client and applies the policy, and sees the plaintext.
    #[default]
    Relay,
    /// End to end at the agent: the relay forwards only ciphertext; the agent presents the
    /// service certificate and applies the policy the relay sends it.
    Agent,
}

/// The validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where agents and `connect` clients reach the relay over QUIC.
    pub quic_listen: SocketAddr,
    /// Where the HTTP surface (health, readiness, API) listens, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// The relay's certificate, key and the CA it trusts.
    pub tls: Material,
    /// How often heartbeats are sent on agent control streams.
    pub heartbeat: Duration,
    /// Deadline for a client's handshake and first frame; for the MySQL-native listener, for
    /// everything from the accepted connection to the client's handshake response, and again for
    /// each packet of the login that follows.
    pub handshake_timeout: Duration,
    /// Deadline for a client's first packet after accept (the MySQL SSLRequest, the TLS
    /// ClientHello): a silent socket is dropped after this, long before `handshake_timeout`.
    pub first_packet_timeout: Duration,
    /// Names this relay instance in welcomes and logs.
    pub instance: String,
    /// Agent name → the services it may offer.
    pub agents: BTreeMap<String, BTreeSet<String>>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Where the relay runs as a Cloud Foundry app instance (from the environment).
    pub platform: Option<CfInstance>,
}

/// This relay's identity as a Cloud Foundry app instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfInstance {
    /// The app's GUID (`VCAP_APPLICATION.application_id`).
    pub app_guid: String,
    /// The instance index (`CF_INSTANCE_INDEX`).
    pub instance_index: u32,
}

impl CfInstance {
    /// Reads `VCAP_APPLICATION` and `CF_INSTANCE_INDEX` through `env` (absent outside CF).
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let vcap: serde_json::Value = serde_json::from_str(&env("VCAP_APPLICATION")?).ok()?;
        let app_guid = vcap.get("application_id")?.as_str()?.to_owned();
        let instance_index = env("CF_INSTANCE_INDEX")
            .and_then(|i| i.parse().ok())
            .or_else(|| vcap.get("instance_index")?.as_u64().map(|i| i as u32))?;
        Some(Self {
            app_guid,
            instance_index,
        })
    }
}

/// One service as the relay sees it.
#[derive(Debug, Clone)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// The listener for applications, if any: MySQL-native for `mysql` services (TLS upgraded
    /// in-band, client certificate required), TLS-first for `tcp` services.
    pub listen: Option<SocketAddr>,
    /// A TLS-first listener (client certificate required), for sidecars and any protocol.
    pub tls_listen: Option<SocketAddr>,
    /// Who may connect.
    pub clients: Acl,
    /// What the service speaks.
    pub protocol: Protocol,
    /// Limit of concurrent client connections.
    pub max_connections: usize,
    /// Limit of MySQL-native connections still in their handshake, not yet authorised.
    pub max_handshakes: usize,
    /// Where a MySQL client's TLS ends.
    pub tls_termination: TlsTermination,
    /// Which MySQL users each client may log in as.
    pub allowed_users: AllowedUsers,
    /// Whether sessions get the connection attribute `postern_client` (the client identity).
    pub client_attribute: bool,
}

impl Service {
    /// The rules the MySQL front end applies, with `handshake_timeout` per login packet.
    pub fn rules(&self, handshake_timeout: Duration) -> Rules<'_> {
        Rules {
            service: &self.name,
            clients: &self.clients,
            allowed_users: &self.allowed_users,
            client_attribute: self.client_attribute,
            handshake_timeout,
        }
    }

    /// The rules as the relay sends them to an agent that ends TLS for this service.
    pub fn wire_policy(
        &self,
        handshake_timeout: Duration,
        first_packet_timeout: Duration,
    ) -> ServicePolicy {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ServicePolicy {
            name: self.name.clone(),
            clients: self.clients.clone(),
            allowed_users: self.allowed_users.clone(),
            client_attribute: self.client_attribute,
            handshake_timeout_ms: ms(handshake_timeout),
            first_packet_timeout_ms: ms(first_packet_timeout),
            max_handshakes: self.max_handshakes,
        }
    }
}

impl Config {
    /// Loads and validates `path`. Relative file names inside are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let file: File = config::load_yaml(path)?;
        Self::validate(path, file)
    }

    /// Parses and validates YAML text as if it were the file `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let file: File = config::parse_yaml(path, text)?;
        Self::validate(path, file)
    }

    fn validate(path: &Path, mut file: File) -> Result<Self, ConfigErrors> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        file.tls.rebase(&base);
        let mut check = Check::new(path);

        let quic_listen = parse_addr(&mut check, &file.listen.quic, "listen.quic");
        let http_listen = file
            .listen
            .http
            .as_ref()
            .and_then(|h| parse_addr(&mut check, h, "listen.http"));
        let tls = check.tls(&file.tls, "tls");

        let mut services = BTreeMap::new();
        for (name, svc) in file.services.iter() {
            let key = format!("services.{}", name.value);
            if let Err(e) = pki::check_name(&name.value) {
                check.at(name, &key, e.to_string());
            }
            let listen = svc
                .listen
                .as_ref()
                .and_then(|l| parse_addr(&mut check, l, &format!("{key}.listen")));
            let tls_listen = svc
                .tls_listen
                .as_ref()
                .and_then(|l| parse_addr(&mut check, l, &format!("{key}.tls_listen")));
            let mut names = BTreeSet::new();
            let mut any = false;
            for c in &svc.clients {
                if c.value == "*" {
                    any = true;
                } else if let Err(e) = pki::check_name(&c.value) {
                    check.at(c, &format!("{key}.clients"), e.to_string());
                } else {
                    names.insert(c.value.clone());
                }
            }
            let max_connections = svc.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
            if max_connections == 0 {
                check.at(
                    name,
                    &format!("{key}.max_connections"),
                    "must be at least 1",
                );
            }
            let clients = if any { Acl::Any } else { Acl::Only(names) };
            let protocol = svc.protocol.as_ref().map(|p| p.value).unwrap_or_default();
            if protocol == Protocol::Tcp {
                let mysql_only = [
                    ("tls_listen", svc.tls_listen.as_ref().map(config::line_of)),
                    (
                        "tls_termination",
                        svc.tls_termination.as_ref().map(config::line_of),
                    ),
                    (
                        "allowed_users",
                        svc.allowed_users.as_ref().map(config::line_of),
                    ),
                    (
                        "client_attribute",
                        svc.client_attribute.as_ref().map(config::line_of),
                    ),
                ];
                for (field, line) in mysql_only {
                    let Some(line) = line else { continue };
                    let why = if field == "tls_listen" {
                        "a tcp service's `listen` is already TLS-first: use `listen`"
                    } else {
                        "applies only to services with protocol: mysql"
                    };
                    check.error(line, &format!("{key}.{field}"), why);
                }
            }
            let tls_termination = svc
                .tls_termination
                .as_ref()
                .map(|t| t.value)
                .unwrap_or_default();
            if let Some(t) = &svc.tls_termination
                && t.value == TlsTermination::Agent
                && svc.listen.is_none()
            {
                check.at(
                    t,
                    &format!("{key}.tls_termination"),
                    "`agent` applies to the MySQL-native `listen` listener, and this service has none",
                );
            }
            if let (Some(t), Some(l)) = (&svc.tls_termination, &svc.tls_listen)
                && t.value == TlsTermination::Agent
            {
                check.at(
                    l,
                    &format!("{key}.tls_listen"),
                    "a TLS-first listener ends TLS at the relay, and this service ends TLS at the \
                     agent (tls_termination: agent): remove tls_listen",
                );
            }
            let max_handshakes = svc
                .max_handshakes
                .as_ref()
                .map_or(DEFAULT_MAX_HANDSHAKES, |m| m.value);
            if let Some(m) = &svc.max_handshakes
                && m.value == 0
            {
                check.at(m, &format!("{key}.max_handshakes"), "must be at least 1");
            }
            let allowed_users = svc.allowed_users.as_ref().map_or(AllowedUsers::Any, |u| {
                allowed_users(&mut check, &key, &u.value, &clients)
            });
            services.insert(
                name.value.clone(),
                Service {
                    name: name.value.clone(),
                    listen,
                    tls_listen,
                    clients,
                    protocol,
                    max_connections,
                    max_handshakes,
                    tls_termination,
                    allowed_users,
                    client_attribute: svc.client_attribute.as_ref().is_some_and(|c| c.value),
                },
            );
        }

        let mut agents = BTreeMap::new();
        for (name, agent) in file.agents.iter() {
            let key = format!("agents.{}", name.value);
            if let Err(e) = pki::check_name(&name.value) {
                check.at(name, &key, e.to_string());
            }
            let mut offered = BTreeSet::new();
            for s in &agent.services {
                if services.contains_key(&s.value) {
                    offered.insert(s.value.clone());
                } else {
                    check.at(
                        s,
                        &format!("{key}.services"),
                        format!("service {:?} is not defined under services", s.value),
                    );
                }
            }
            agents.insert(name.value.clone(), offered);
        }

        let heartbeat = file.heartbeat_interval.map_or(DEFAULT_HEARTBEAT, |d| d.0);
        if heartbeat < Duration::from_millis(100) {
            check.error(None, "heartbeat_interval", "must be at least 100ms");
        }
        let handshake_timeout = file
            .handshake_timeout
            .map_or(DEFAULT_HANDSHAKE_TIMEOUT, |d| d.0);
        let first_packet_timeout = file
            .first_packet_timeout
            .map_or(DEFAULT_FIRST_PACKET_TIMEOUT.min(handshake_timeout), |d| d.0);
        if first_packet_timeout.is_zero() {
            check.error(None, "first_packet_timeout", "must be more than 0");
        } else if first_packet_timeout > handshake_timeout {
            check.error(
                None,
                "first_packet_timeout",
                "must not exceed handshake_timeout (it is part of the handshake)",
            );
        }

        let (Some(quic_listen), Some(tls)) = (quic_listen, tls) else {
            return Err(check.finish(()).expect_err("an error was recorded"));
        };
        let instance = file.instance.unwrap_or_else(default_instance);
        check.finish(Self {
            quic_listen,
            http_listen,
            tls,
            heartbeat,
            handshake_timeout,
            first_packet_timeout,
            instance,
            agents,
            services,
            platform: None,
        })
    }
}

/// Validates `services.NAME.allowed_users`.
fn allowed_users(check: &mut Check<'_>, key: &str, file: &UsersFile, acl: &Acl) -> AllowedUsers {
    let key = format!("{key}.allowed_users");
    let list = |check: &mut Check<'_>, users: &[Spanned<String>]| {
        let mut names = BTreeSet::new();
        for u in users {
            if u.value == "*" {
                return Users::Any;
            }
            if u.value.is_empty() {
                check.at(u, &key, "a MySQL user name cannot be empty");
            }
            names.insert(u.value.clone());
        }
        Users::Only(names)
    };
    match file {
        UsersFile::List(users) => AllowedUsers::Policy {
            clients: BTreeMap::new(),
            others: Some(list(check, users)),
        },
        UsersFile::Map(entries) => {
            let mut clients = BTreeMap::new();
            let mut others = None;
            for (client, users) in entries.iter() {
                let users = list(check, users);
                if client.value == "*" {
                    others = Some(users);
                    continue;
                }
                if let Err(e) = pki::check_name(&client.value) {
                    check.at(client, &key, e.to_string());
                } else if let Acl::Only(names) = acl
                    && !names.contains(&client.value)
                {
                    check.at(
                        client,
                        &key,
                        format!(
                            "client {:?} is not in this service's `clients`, so it can never connect",
                            client.value
                        ),
                    );
                }
                clients.insert(client.value.clone(), users);
            }
            AllowedUsers::Policy { clients, others }
        }
    }
}

fn parse_addr(check: &mut Check<'_>, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
    // `0.0.0.0:${PORT}`: Cloud Foundry tells the app its port in the environment.
    let text = match expand_env(&value.value) {
        Ok(t) => t,
        Err(name) => {
            check.at(
                value,
                key,
                format!("environment variable {name} is not set"),
            );
            return None;
        }
    };
    match text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            check.at(
                value,
                key,
                format!(
                    "{:?} is not an address: use ip:port, e.g. 0.0.0.0:7443",
                    value.value
                ),
            );
            None
        }
    }
}

/// Replaces `${NAME}` with the environment variable's value.
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &rest[start + 2..start + end];
        out.push_str(&std::env::var(name).map_err(|_| name.to_owned())?);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "relay".into());
    format!("{host}-{}", std::process::id())
}

/// The directory certificate paths in `path` are relative to.
pub fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::pki::{Ca, Kind, LeafSpec};

    /// A directory with a CA and a relay certificate, and a relay.yaml prefix that uses them.
    fn files() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let (ca, key) = Ca::generate("test", 1).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), key).unwrap();
        let issued = ca.issue(&LeafSpec::new(Kind::Server, "relay", 1)).unwrap();
        std::fs::write(dir.path().join("relay.pem"), issued.cert_pem).unwrap();
        std::fs::write(dir.path().join("relay-key.pem"), issued.key_pem).unwrap();
        let head = "listen:\n  quic: 127.0.0.1:0\ntls: { ca: ca.pem, cert: relay.pem, key: relay-key.pem }\nservices:\n".to_owned();
        (dir, head)
    }

    fn parse(services: &str) -> Result<Config, ConfigErrors> {
        let (dir, head) = files();
        Config::parse(&dir.path().join("relay.yaml"), &(head + services))
    }

    fn errors(services: &str) -> Vec<String> {
        parse(services)
            .expect_err("the config is refused")
            .0
            .iter()
            .map(|e| {
                let file = e.file.file_name().unwrap().to_string_lossy();
                format!(
                    "{file}:{}: {}: {}",
                    e.line.unwrap_or(0),
                    e.key.as_deref().unwrap_or(""),
                    e.message
                )
            })
            .collect()
    }

    #[test]
    fn listeners_and_defaults() {
        let c = parse(
            "  orders:\n    listen: 127.0.0.1:3306\n    tls_listen: 127.0.0.1:3307\n    clients: [alice]\n  files:\n    protocol: tcp\n    listen: 127.0.0.1:9000\n    clients: [\"*\"]\n",
        )
        .unwrap();
        let orders = &c.services["orders"];
        assert_eq!(orders.protocol, Protocol::Mysql);
        assert_eq!(orders.listen, Some("127.0.0.1:3306".parse().unwrap()));
        assert_eq!(orders.tls_listen, Some("127.0.0.1:3307".parse().unwrap()));
        assert_eq!(orders.tls_termination, TlsTermination::Relay);
        assert_eq!(orders.max_handshakes, DEFAULT_MAX_HANDSHAKES);
        assert_eq!(orders.allowed_users, AllowedUsers::Any);
        assert!(!orders.client_attribute);
        assert_eq!(orders.allowed_users.for_client("alice"), Users::Any);
        assert_eq!(c.services["files"].protocol, Protocol::Tcp);
    }

    #[test]
    fn the_first_packet_deadline_defaults_short_and_fits_in_the_handshake() {
        let (dir, head) = files();
        let head = head + "  orders:\n    clients: [alice]\n";
        let path = dir.path().join("relay.yaml");
        let c = Config::parse(&path, &head).unwrap();
        assert_eq!(c.first_packet_timeout, DEFAULT_FIRST_PACKET_TIMEOUT);
        let c = Config::parse(&path, &format!("handshake_timeout: 2s\n{head}")).unwrap();
        assert_eq!(c.first_packet_timeout, Duration::from_secs(2));
        let c = Config::parse(&path, &format!("first_packet_timeout: 500ms\n{head}")).unwrap();
        assert_eq!(c.first_packet_timeout, Duration::from_millis(500));
        for bad in ["first_packet_timeout: 0s", "first_packet_timeout: 11s"] {
            let e = Config::parse(&path, &format!("{bad}\n{head}")).expect_err(bad);
            assert!(
                e.0.iter()
                    .any(|e| e.key.as_deref() == Some("first_packet_timeout")),
                "{bad}"
            );
        }
    }

    #[test]
    fn allowed_users_as_a_list_applies_to_every_client() {
        let c = parse(
            "  orders:\n    clients: [\"*\"]\n    allowed_users: [app, report]\n    client_attribute: true\n",
        )
        .unwrap();
        let users = c.services["orders"].allowed_users.for_client("anyone");
        assert!(users.allows(b"app") && users.allows(b"report"));
        assert!(!users.allows(b"root") && !users.allows(b"App"));
        assert!(c.services["orders"].client_attribute);
    }

    #[test]
    fn allowed_users_as_a_mapping_with_a_fallback() {
        let c = parse(
            "  orders:\n    clients: [alice, billing, carol]\n    allowed_users:\n      alice: [\"*\"]\n      billing: [app]\n      \"*\": [report]\n",
        )
        .unwrap();
        let policy = &c.services["orders"].allowed_users;
        assert_eq!(policy.for_client("alice"), Users::Any);
        assert!(policy.for_client("billing").allows(b"app"));
        assert!(!policy.for_client("billing").allows(b"report"));
        assert!(policy.for_client("carol").allows(b"report"));
        let c = parse(
            "  orders:\n    clients: [alice, carol]\n    allowed_users:\n      alice: [app]\n",
        )
        .unwrap();
        assert!(
            !c.services["orders"]
                .allowed_users
                .for_client("carol")
                .allows(b"app"),
            "a client the mapping does not name may log in as no one"
        );
    }

    #[test]
    fn bad_values_name_the_line_and_key() {
        assert_eq!(
            errors("  orders:\n    clients: [alice]\n    tls_termination: agent\n"),
            vec![
                "relay.yaml:7: services.orders.tls_termination: `agent` applies to the \
                 MySQL-native `listen` listener, and this service has none"
            ]
        );
        let c = parse(
            "  orders:\n    listen: 127.0.0.1:0\n    clients: [alice]\n    tls_termination: agent\n",
        )
        .unwrap();
        assert_eq!(c.services["orders"].tls_termination, TlsTermination::Agent);
        assert_eq!(
            errors(
                "  orders:\n    clients: [alice]\n    allowed_users:\n      alise: [app]\n      bob/x: [app]\n"
            ),
            vec![
                "relay.yaml:8: services.orders.allowed_users: client \"alise\" is not in this \
                 service's `clients`, so it can never connect",
                "relay.yaml:9: services.orders.allowed_users: invalid name \"bob/x\": use 1-64 \
                 characters from a-z, A-Z, 0-9, '.', '_' and '-'",
            ]
        );
        assert_eq!(
            errors(
                "  files:\n    protocol: tcp\n    clients: [alice]\n    tls_listen: 127.0.0.1:1\n    allowed_users: [app]\n"
            ),
            vec![
                "relay.yaml:8: services.files.tls_listen: a tcp service's `listen` is already TLS-first: use `listen`",
                "relay.yaml:9: services.files.allowed_users: applies only to services with protocol: mysql",
            ]
        );
        let e = errors("  orders:\n    clients: [alice]\n    allowed_users: app\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("relay.yaml:7:"), "{e:?}");
        let e = errors("  orders:\n    clients: [alice]\n    tls_termination: both\n");
        assert!(
            e[0].starts_with("relay.yaml:7:") && e[0].contains("both"),
            "{e:?}"
        );
    }
}
