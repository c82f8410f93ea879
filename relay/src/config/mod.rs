//! `relay.yaml`: what the relay listens on, which agents may offer which services, and which
//! clients may reach them.
//!
//! ```yaml
//! listen:
//!   quic: 0.0.0.0:7443            # agents and `connect` clients over UDP (optional)
//!   http: 0.0.0.0:8080            # WebSocket tunnel, health, API (optional; one of the two)
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
//! api:                            # /v0/*, the dashboard at / and /metrics (absent: off, 404)
//!   username: admin
//!   password_file: api-password   # or password_env: VAR (never inline)
//! health_listen: 0.0.0.0:1936     # 200 with an empty body on any path, no auth (optional)
//! audit_log: audit.jsonl          # one JSON line per tunneled connection (optional; always logged)
//! ```
//!
//! What `listen` is depends on the protocol: for `mysql` services (the default) it speaks MySQL
//! and upgrades to TLS in-band, as a MySQL server does (`listen::mysql`); for `tcp` services it
//! is TLS-first. `tls_listen` is always TLS-first.
//!
//! Cloud Foundry routes no UDP, so a relay pushed there listens on `http: 0.0.0.0:${PORT}` only
//! (`${NAME}` is read from the environment); agents and `connect` reach it over WebSocket.
//!
//! The file's YAML shape is in [`file`]; [`Config::load`] checks it one concern at a time
//! (listeners, timing, services, agents), listing every problem with its line and key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_common::config::{self, Check, ConfigErrors, Env, HumanDuration, ProcessEnv, Spanned};
use postern_common::pki;
pub use postern_common::policy::{Acl, AllowedUsers, Users};
use postern_common::tls::Material;
use serde::Deserialize;

pub mod broker;
mod file;
mod service;

use file::File;

/// Default heartbeat interval on agent control streams.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default deadline for a client's TLS handshake and first frame.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline for a client's first packet (the MySQL SSLRequest, the TLS ClientHello),
/// counted from accept.
pub const DEFAULT_FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(3);
/// Default limit of connections and sessions for the whole relay (`max_connections`).
pub const DEFAULT_RELAY_MAX_CONNECTIONS: usize = 16_384;
/// Default limit of concurrent client connections per service.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default limit of connections per MySQL service that are still in their handshake (not yet
/// authorised; when it is reached, the oldest gives way). They hold no database connection, only
/// a socket and TLS state, so the limit is generous: a burst of real clients fits.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;

/// The range of `heartbeat_interval`.
pub const HEARTBEAT_RANGE: std::ops::RangeInclusive<Duration> =
    postern_common::control::MIN_INTERVAL..=postern_common::control::MAX_INTERVAL;
/// The range of `handshake_timeout`.
pub const HANDSHAKE_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=postern_common::policy::MAX_HANDSHAKE_TIMEOUT;

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
    /// Where agents and `connect` clients reach the relay over QUIC, if anywhere (Cloud Foundry
    /// routes no UDP: there the relay has only its HTTP listener).
    pub quic_listen: Option<SocketAddr>,
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
    /// Limit of accepted connections and sessions for the whole relay: service connections,
    /// QUIC sessions and WebSocket tunnels each hold one.
    pub max_connections: usize,
    /// Deadline for a client's first packet after accept (the MySQL SSLRequest, the TLS
    /// ClientHello): a silent socket is dropped after this, long before `handshake_timeout`.
    pub first_packet_timeout: Duration,
    /// Names this relay instance in welcomes and logs: `instance` from the file, else
    /// `APP_NAME/INDEX` on Cloud Foundry, else `HOSTNAME-PID`.
    pub instance: String,
    /// Agent name → the services it may offer.
    pub agents: BTreeMap<String, BTreeSet<String>>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Where the relay runs as a Cloud Foundry app instance (from the environment).
    pub platform: Option<CfInstance>,
    /// Who may use the API, the dashboard and the metrics; `None`: they are off.
    pub api: Option<ApiAuth>,
    /// A listener for load balancers: 200 with an empty body on any path, no auth.
    pub health_listen: Option<SocketAddr>,
    /// The Open Service Broker API under `/v2/`; `None`: off.
    pub broker: Option<broker::Broker>,
    /// The file each tunneled connection's audit record is appended to when it ends (the
    /// records are in the log either way); relative to the config file's directory.
    pub audit_log: Option<PathBuf>,
}

/// The basic-auth credentials of the API, the dashboard and `/metrics`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiAuth {
    /// The user name.
    pub username: String,
    /// The password (read from a file or the environment; never logged).
    pub password: String,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// This relay's identity as a Cloud Foundry app instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfInstance {
    /// The app's GUID (`VCAP_APPLICATION.application_id`).
    pub app_guid: String,
    /// The app's name (`VCAP_APPLICATION.application_name`).
    pub app_name: String,
    /// The instance index (`CF_INSTANCE_INDEX`).
    pub instance_index: u32,
    /// The app's routes (`VCAP_APPLICATION.application_uris`).
    pub routes: Vec<String>,
}

impl CfInstance {
    /// Reads `VCAP_APPLICATION` and `CF_INSTANCE_INDEX` through `env` (absent outside CF).
    pub fn from_env(env: &dyn Env) -> Option<Self> {
        let vcap: serde_json::Value = serde_json::from_str(&env.var("VCAP_APPLICATION")?).ok()?;
        let app_guid = vcap.get("application_id")?.as_str()?.to_owned();
        let app_name = vcap
            .get("application_name")
            .and_then(|n| n.as_str())
            .unwrap_or("relay")
            .to_owned();
        let instance_index = env
            .var("CF_INSTANCE_INDEX")
            .and_then(|i| i.parse().ok())
            .or_else(|| u32::try_from(vcap.get("instance_index")?.as_u64()?).ok())?;
        let routes = vcap
            .get("application_uris")
            .and_then(|u| u.as_array())
            .map(|u| {
                u.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            app_guid,
            app_name,
            instance_index,
            routes,
        })
    }

    /// The instance's name in welcomes and logs, as `cf app` shows it: `APP_NAME/INDEX`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.app_name, self.instance_index)
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

impl Config {
    /// Loads and validates `path`, reading the process environment (`${PORT}` in addresses,
    /// Cloud Foundry's `VCAP_APPLICATION`). Relative file names inside are relative to its
    /// directory.
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

        let (quic_listen, http_listen) = listeners(&mut check, &file.listen, env);
        let tls = check.tls(&file.tls, "tls");
        let heartbeat = check.duration(
            file.heartbeat_interval.as_ref(),
            "heartbeat_interval",
            DEFAULT_HEARTBEAT,
            HEARTBEAT_RANGE,
        );
        let handshake_timeout = check.duration(
            file.handshake_timeout.as_ref(),
            "handshake_timeout",
            DEFAULT_HANDSHAKE_TIMEOUT,
            HANDSHAKE_TIMEOUT_RANGE,
        );
        let first_packet_timeout = first_packet_timeout(
            &mut check,
            file.first_packet_timeout.as_ref(),
            handshake_timeout,
        );
        let max_connections = match &file.max_connections {
            None => DEFAULT_RELAY_MAX_CONNECTIONS,
            Some(m) if m.value == 0 => {
                check.at(m, "max_connections", "must be at least 1");
                DEFAULT_RELAY_MAX_CONNECTIONS
            }
            Some(m) => m.value,
        };
        let services: BTreeMap<String, Service> = file
            .services
            .iter()
            .map(|(name, svc)| {
                let s = service::validate(&mut check, name, svc, env);
                (s.name.clone(), s)
            })
            .collect();
        let agents = agents(&mut check, &file, &services);
        let api = file
            .api
            .as_ref()
            .and_then(|a| api(&mut check, a, &base, env));
        let health_listen = file
            .health_listen
            .as_ref()
            .and_then(|h| parse_addr(&mut check, h, "health_listen", env));
        let audit_log = file.audit_log.as_ref().and_then(|p| {
            let full = base.join(&p.value);
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&full)
            {
                Ok(_) => Some(full),
                Err(e) => {
                    check.at(
                        p,
                        "audit_log",
                        format!("cannot append to {}: {e}", full.display()),
                    );
                    None
                }
            }
        });
        let platform = CfInstance::from_env(env);
        let instance = file
            .instance
            .clone()
            .or_else(|| platform.as_ref().map(CfInstance::name))
            .unwrap_or_else(default_instance);

        let broker = file.broker.as_ref().and_then(|b| {
            let plans: Vec<_> = file
                .services
                .iter()
                .filter_map(|(name, svc)| Some((services.get(&name.value)?, svc.broker.as_ref()?)))
                .collect();
            broker::validate(
                &mut check,
                b,
                &plans,
                &file.tls.ca.value,
                &base,
                env,
                platform.as_ref(),
            )
        });
        if file.broker.is_none()
            && let Some((name, Some(plan))) = file
                .services
                .iter()
                .map(|(name, s)| (name, s.broker.as_ref()))
                .find(|(_, b)| b.is_some())
        {
            check.at(
                plan,
                &format!("services.{}.broker", name.value),
                "a plan needs the top-level `broker` section",
            );
        }
        let Some(tls) = tls else {
            return Err(check.fail());
        };
        check.finish(Self {
            quic_listen,
            http_listen,
            tls,
            heartbeat,
            handshake_timeout,
            first_packet_timeout,
            max_connections,
            instance,
            agents,
            services,
            platform,
            api,
            health_listen,
            broker,
            audit_log,
        })
    }
}

/// The longest password or key file read (a secret, not a document).
const MAX_PASSWORD_FILE: u64 = 16 * 1024;

/// `api`: a user name, and a password from exactly one of a file and an environment variable.
fn api(
    check: &mut Check<'_>,
    api: &Spanned<file::ApiFile>,
    base: &Path,
    env: &dyn Env,
) -> Option<ApiAuth> {
    let a = &api.value;
    let username = a.username.value.clone();
    if username.is_empty() || username.contains(':') {
        check.at(
            &a.username,
            "api.username",
            "must not be empty or contain ':' (basic auth splits on it)",
        );
    }
    let password = broker::secret(
        check,
        base,
        env,
        "api",
        ("password_file", a.password_file.as_ref()),
        ("password_env", a.password_env.as_ref()),
        config::line_of(&a.username),
    )?;
    Some(ApiAuth { username, password })
}

/// `first_packet_timeout`: more than zero, and part of the handshake, so no longer than it.
fn first_packet_timeout(
    check: &mut Check<'_>,
    value: Option<&Spanned<HumanDuration>>,
    handshake_timeout: Duration,
) -> Duration {
    let default = DEFAULT_FIRST_PACKET_TIMEOUT.min(handshake_timeout);
    let range = Duration::from_millis(1)..=handshake_timeout;
    let Some(v) = value else { return default };
    if range.contains(&v.value.0) {
        return v.value.0;
    }
    let why = if v.value.0.is_zero() {
        "must be more than 0".to_owned()
    } else {
        format!(
            "must not exceed handshake_timeout ({}): it is part of the handshake",
            HumanDuration(handshake_timeout)
        )
    };
    check.at(v, "first_packet_timeout", why);
    default
}

/// `listen`: at least one of QUIC (UDP) and HTTP (the WebSocket tunnel).
fn listeners(
    check: &mut Check<'_>,
    listen: &file::Listen,
    env: &dyn Env,
) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let quic = listen
        .quic
        .as_ref()
        .and_then(|q| parse_addr(check, q, "listen.quic", env));
    let http = listen
        .http
        .as_ref()
        .and_then(|h| parse_addr(check, h, "listen.http", env));
    if listen.quic.is_none() && listen.http.is_none() {
        check.error(
            None,
            "listen",
            "no listener: give quic (UDP, for agents and connect) or http (the WebSocket tunnel, \
             which is all Cloud Foundry routes), or both",
        );
    }
    (quic, http)
}

/// `agents`: each agent's services must be defined under `services`.
fn agents(
    check: &mut Check<'_>,
    file: &File,
    services: &BTreeMap<String, Service>,
) -> BTreeMap<String, BTreeSet<String>> {
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
    agents
}

/// An `ip:port` setting; `${NAME}` is read from the environment (`0.0.0.0:${PORT}`: Cloud
/// Foundry tells the app its port there).
fn parse_addr(
    check: &mut Check<'_>,
    value: &Spanned<String>,
    key: &str,
    env: &dyn Env,
) -> Option<SocketAddr> {
    let text = match config::expand_env(&value.value, env) {
        Ok(t) => t,
        Err(unset) => {
            check.at(value, key, unset.to_string());
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
pub(crate) mod tests {
    use super::*;
    use postern_common::pki::{Ca, Kind, LeafSpec};

    /// A directory with a CA and a relay certificate, and a relay.yaml prefix that uses them.
    pub(crate) fn files() -> (tempfile::TempDir, String) {
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
        let env = BTreeMap::<&str, &str>::new();
        Config::parse(&dir.path().join("relay.yaml"), &(head + services), &env)
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
        let env = BTreeMap::<&str, &str>::new();
        let c = Config::parse(&path, &head, &env).unwrap();
        assert_eq!(c.first_packet_timeout, DEFAULT_FIRST_PACKET_TIMEOUT);
        let c = Config::parse(&path, &format!("handshake_timeout: 2s\n{head}"), &env).unwrap();
        assert_eq!(c.first_packet_timeout, Duration::from_secs(2));
        let c =
            Config::parse(&path, &format!("first_packet_timeout: 500ms\n{head}"), &env).unwrap();
        assert_eq!(c.first_packet_timeout, Duration::from_millis(500));
        for bad in ["first_packet_timeout: 0s", "first_packet_timeout: 11s"] {
            let e = Config::parse(&path, &format!("{bad}\n{head}"), &env).expect_err(bad);
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
    fn api_credentials_come_from_a_file_or_the_environment_and_never_show() {
        let (dir, head) = files();
        let path = dir.path().join("relay.yaml");
        std::fs::write(dir.path().join("api-password"), "s3cret\n").unwrap();
        let body = "  orders:\n    clients: [alice]\n";
        let env = BTreeMap::from([("API_PW", "from-env")]);
        let c = Config::parse(
            &path,
            &format!(
                "api:\n  username: admin\n  password_file: api-password\nhealth_listen: 127.0.0.1:0\n{head}{body}"
            ),
            &env,
        )
        .unwrap();
        let api = c.api.clone().unwrap();
        assert_eq!(
            (api.username.as_str(), api.password.as_str()),
            ("admin", "s3cret")
        );
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug masks the password"
        );
        assert_eq!(c.health_listen, Some("127.0.0.1:0".parse().unwrap()));
        let c = Config::parse(
            &path,
            &format!("api:\n  username: admin\n  password_env: API_PW\n{head}{body}"),
            &env,
        )
        .unwrap();
        assert_eq!(c.api.unwrap().password, "from-env");
        let c = Config::parse(&path, &format!("{head}{body}"), &env).unwrap();
        assert!(c.api.is_none() && c.health_listen.is_none());

        let errors = |text: &str| -> Vec<String> {
            Config::parse(&path, &format!("{text}{head}{body}"), &env)
                .expect_err(text)
                .0
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}: {}",
                        e.line.unwrap_or(0),
                        e.key.as_deref().unwrap_or(""),
                        e.message
                    )
                })
                .collect()
        };
        assert_eq!(
            errors("api:\n  username: admin\n  password_env: NOPE\n"),
            vec!["3: api.password_env: environment variable NOPE is not set"]
        );
        assert_eq!(
            errors("api:\n  username: admin\n"),
            vec!["2: api: give the password in password_file or password_env (never inline)"]
        );
        let e = errors("api:\n  username: admin\n  password_file: missing\n");
        assert!(
            e[0].starts_with("3: api.password_file: cannot read"),
            "{e:?}"
        );
        let e = errors("api:\n  username: admin\n  password: inline\n");
        assert!(e[0].contains("password"), "{e:?}");
        let e = errors("health_listen: nowhere\n");
        assert!(e[0].starts_with("1: health_listen:"), "{e:?}");
        let e = errors("audit_log: no-such-dir/audit.jsonl\n");
        assert!(
            e[0].starts_with("1: audit_log: cannot append to ")
                && e[0].contains("no-such-dir/audit.jsonl"),
            "{e:?}"
        );
        let c = Config::parse(
            &path,
            &format!("audit_log: audit.jsonl\n{head}{body}"),
            &env,
        )
        .unwrap();
        assert_eq!(c.audit_log, Some(dir.path().join("audit.jsonl")));
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

    #[test]
    fn broker_mistakes_name_line_and_key_and_secrets_never_show() {
        let (dir, head) = files();
        let path = dir.path().join("relay.yaml");
        std::fs::write(dir.path().join("pw"), "broker-secret\n").unwrap();
        let broker = "broker:\n  username: cc\n  password_file: pw\n  signing: { cert: ca.pem, key_file: ca-key.pem }\n  host: relay.apps.internal\n";
        let env = BTreeMap::from([("APP_PW", "app-secret")]);
        let good = format!(
            "{broker}{head}  orders:\n    listen: 127.0.0.1:3306\n    clients: []\n    broker: {{ database: appdb, username: app, password_env: APP_PW }}\n  billing:\n    listen: 127.0.0.1:3307\n    clients: []\n    broker: {{ users: per_binding }}\n"
        );
        let c = Config::parse(&path, &good, &env).unwrap();
        let b = c.broker.as_ref().unwrap();
        assert_eq!(b.plans["orders"].port, 3306);
        assert!(b.plans["billing"].credentials == broker::PlanCredentials::PerBinding);
        assert!(b.store_is_default && b.store.starts_with("sqlite://"));
        let shown = format!("{c:?}");
        for secret in ["broker-secret", "app-secret", "PRIVATE KEY"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let errors = |text: &str| -> Vec<String> {
            Config::parse(&path, text, &env)
                .expect_err("refused")
                .0
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}: {}",
                        e.line.unwrap_or(0),
                        e.key.as_deref().unwrap_or(""),
                        e.message
                    )
                })
                .collect()
        };
        let e = errors(&format!("{head}  orders:\n    clients: [binding-x]\n"));
        assert!(
            e[0].contains("services.orders.clients") && e[0].contains("broker"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{head}  orders:\n    clients: []\n    broker: {{ database: appdb }}\n"
        ));
        assert!(
            e.iter().any(|l| l.contains("needs the top-level `broker`")),
            "{e:?}"
        );
        let e = errors(&format!(
            "{broker}{head}  orders:\n    listen: 127.0.0.1:1\n    clients: []\n    broker: {{ database: appdb }}\n"
        ));
        assert!(
            e.iter()
                .any(|l| l.starts_with("13: services.orders.broker") && l.contains("username")),
            "{e:?}"
        );
        let e = errors(&format!("{broker}{head}  orders:\n    clients: []\n"));
        assert!(
            e.iter().any(|l| l.contains("catalog would offer nothing")),
            "{e:?}"
        );
        let bad_key = broker.replace("key_file: ca-key.pem", "key_env: NOPE");
        let e = errors(&format!(
            "{bad_key}{head}  orders:\n    listen: 127.0.0.1:1\n    clients: []\n    broker: {{ users: per_binding }}\n"
        ));
        assert!(
            e.iter()
                .any(|l| l.starts_with("4: broker.signing.key_env: environment variable NOPE")),
            "{e:?}"
        );
    }
}
