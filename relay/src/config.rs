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
//!     listen: 0.0.0.0:13306       # mutual-TLS listener for applications (optional)
//!     clients: [billing, alice]   # client identities allowed ("*": any valid certificate)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_common::config::{
    self, Check, ConfigErrors, Entries, HumanDuration, Spanned, TlsFiles,
};
use postern_common::pki::{self, Identity};
use postern_common::tls::Material;
use serde::Deserialize;

/// Default heartbeat interval on agent control streams.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default deadline for a client's TLS handshake and first frame.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit of concurrent client connections per service.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

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
    clients: Vec<Spanned<String>>,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    max_connections: Option<usize>,
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
    /// Deadline for a client's handshake and first frame.
    pub handshake_timeout: Duration,
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
    /// Mutual-TLS listener for applications, if any.
    pub listen: Option<SocketAddr>,
    /// Who may connect.
    pub clients: Acl,
    /// What the service speaks.
    pub protocol: Protocol,
    /// Limit of concurrent client connections.
    pub max_connections: usize,
}

/// Which client identities may use a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acl {
    /// Any client certificate signed by the CA.
    Any,
    /// Only these client names.
    Only(BTreeSet<String>),
}

impl Acl {
    /// Whether `id` may use the service. Agents never may.
    pub fn allows(&self, id: &Identity) -> bool {
        match (self, id) {
            (_, Identity::Agent(_)) => false,
            (Self::Any, Identity::Client(_)) => true,
            (Self::Only(names), Identity::Client(n)) => names.contains(n),
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
            services.insert(
                name.value.clone(),
                Service {
                    name: name.value.clone(),
                    listen,
                    clients: if any { Acl::Any } else { Acl::Only(names) },
                    protocol: svc.protocol.unwrap_or_default(),
                    max_connections,
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
            instance,
            agents,
            services,
            platform: None,
        })
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
