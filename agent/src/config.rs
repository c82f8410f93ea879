//! `agent.yaml`: which relay to dial, with which certificate, and the services it offers.
//!
//! ```yaml
//! relay: quic://relay.example.com:7443
//! tls: { ca: ca.pem, cert: agent-db1.pem, key: agent-db1-key.pem }
//! services:
//!   orders:
//!     backend: 127.0.0.1:3306
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use postern_common::config::{
    self, Check, ConfigErrors, Entries, HumanDuration, RelayUrl, Spanned, TlsFiles,
};
use postern_common::pki::{self, Identity};
use postern_common::tls::Material;
use serde::Deserialize;

/// Default deadline for connecting to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    relay: Spanned<String>,
    #[serde(default)]
    server_name: Option<String>,
    tls: TlsFiles,
    #[serde(default)]
    services: Entries<ServiceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    backend: Spanned<String>,
    #[serde(default)]
    connect_timeout: Option<HumanDuration>,
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The relay to dial.
    pub relay: RelayUrl,
    /// The name the relay's certificate must carry (default: the relay URL's host).
    pub server_name: String,
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
        let relay = match file.relay.value.parse::<RelayUrl>() {
            Ok(u) => Some(u),
            Err(e) => {
                check.at(&file.relay, "relay", e);
                None
            }
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
            services.insert(
                name.value.clone(),
                Service {
                    name: name.value.clone(),
                    backend: svc.backend.value.clone(),
                    connect_timeout: svc.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
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
        let (Some(relay), Some(tls), Some(name)) = (relay, tls, name) else {
            return Err(check.finish(()).expect_err("an error was recorded"));
        };
        let server_name = file.server_name.unwrap_or_else(|| relay.host.clone());
        check.finish(Self {
            relay,
            server_name,
            tls,
            name,
            services,
        })
    }
}

/// Whether `s` is `host:port` with a numeric port.
pub fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}
