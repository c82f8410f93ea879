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
//! A relay can be reached over QUIC, over WebSocket (through HTTP routers and proxies), or both
//! raced (`transport: auto`): `relay: {quic: quic://host:7443, websocket: wss://host}`. Several
//! relays (`relays: [...]`) each get their own session.

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
#[derive(Debug, Clone, Default)]
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
    backend: Spanned<String>,
    #[serde(default)]
    connect_timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    tls: Option<ServiceTlsFile>,
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
}

/// One service the agent offers.
#[derive(Debug, Clone)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// Where the backend listens (`host:port`).
    pub backend: String,
    /// Deadline for connecting to the backend.
    pub connect_timeout: Duration,
    /// The certificate and key presented to MySQL clients when the relay has this service end
    /// TLS at the agent (`tls_termination: agent`), with the agent's CA for client certificates.
    /// Revocation lists come from the relay's policy.
    pub tls: Option<Material>,
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
            if !looks_like_host_port(&svc.backend.value) {
                check.at(
                    &svc.backend,
                    &format!("{key}.backend"),
                    format!("{:?} is not host:port", svc.backend.value),
                );
            }
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
            services.insert(
                name.value.clone(),
                Service {
                    name: name.value.clone(),
                    backend: svc.backend.value.clone(),
                    connect_timeout: check.duration(
                        svc.connect_timeout.as_ref(),
                        &format!("{key}.connect_timeout"),
                        DEFAULT_CONNECT_TIMEOUT,
                        CONNECT_TIMEOUT_RANGE,
                    ),
                    tls,
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

/// Whether `s` is `host:port` with a numeric port.
pub fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}
