//! `broker` and each service's `broker` entry: the Open Service Broker API the relay serves
//! under `/v2/` (see `crate::broker`).
//!
//! ```yaml
//! broker:
//!   username: broker
//!   password_env: POSTERN_BROKER_PASSWORD   # or password_file (never inline)
//!   signing:                                # an intermediate CA (`certs issue intermediate`):
//!     cert: broker-ca.pem                   #   the root's key stays offline
//!     key_env: POSTERN_BROKER_CA_KEY        #   or key_file (PEM)
//!   store_env: DATABASE_URL                 # or store_file, or store_service: NAME (a binding in
//!                                           # the relay's own VCAP_SERVICES); default: SQLite
//!                                           # broker.sqlite next to relay.yaml (one relay only)
//!   host: postern-relay.apps.internal       # where bound apps connect
//!   relays: [wss://postern-relay.example.com]   # what sidecars dial (default on Cloud Foundry:
//!                                               # wss:// and the app's first route)
//!   certificate_days: 30                    # lifetime of binding certificates
//! services:
//!   orders:
//!     listen: 0.0.0.0:3306
//!     clients: []
//!     broker:                               # offered as plan `orders` (absent: not offered)
//!       database: appdb
//!       username: app                       # handed to every binding...
//!       password_env: ORDERS_APP_PASSWORD
//!       # users: per_binding                # ...or the agent makes a user per binding
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use postern_common::config::{self, Check, Env, Spanned};
use postern_common::pki;
use serde::Deserialize;

use super::{CfInstance, Service};

/// Default lifetime of a binding's client certificate, in days.
pub const DEFAULT_CERTIFICATE_DAYS: u32 = 30;
/// The longest lifetime of a binding's certificate, in days.
pub const MAX_CERTIFICATE_DAYS: u32 = 3650;
/// The catalog's service offering name by default (`cf create-service postern PLAN NAME`).
pub const DEFAULT_OFFERING: &str = "postern";

/// `broker` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BrokerFile {
    username: Spanned<String>,
    #[serde(default)]
    password_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    password_env: Option<Spanned<String>>,
    signing: Spanned<SigningFile>,
    #[serde(default)]
    store_env: Option<Spanned<String>>,
    #[serde(default)]
    store_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    store_service: Option<Spanned<String>>,
    host: Spanned<String>,
    #[serde(default)]
    relays: Vec<Spanned<String>>,
    #[serde(default)]
    server_name: Option<Spanned<String>>,
    #[serde(default)]
    certificate_days: Option<Spanned<u32>>,
    #[serde(default)]
    offering: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningFile {
    cert: Spanned<PathBuf>,
    #[serde(default)]
    key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    key_env: Option<Spanned<String>>,
}

/// `services.NAME.broker` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanFile {
    #[serde(default)]
    database: Option<Spanned<String>>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
    #[serde(default)]
    username: Option<Spanned<String>>,
    #[serde(default)]
    password_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    password_env: Option<Spanned<String>>,
    #[serde(default)]
    users: Option<Spanned<UsersMode>>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum UsersMode {
    PerBinding,
}

/// The validated broker settings.
#[derive(Clone)]
pub struct Broker {
    /// The platform's user name for `/v2/`.
    pub username: String,
    /// Its password.
    pub password: String,
    /// The signing CA's certificate (PEM; an intermediate, with its chain above it).
    pub signing_cert_pem: String,
    /// The signing CA's key (PEM).
    pub signing_key_pem: String,
    /// The CA clients verify the relay with (the text of `tls.ca`).
    pub ca_pem: String,
    /// Where bindings are kept: a `postgres://`, `mysql://` or `sqlite:` URL.
    pub store: String,
    /// Whether the store is the default SQLite file (one relay only).
    pub store_is_default: bool,
    /// Where bound apps connect.
    pub host: String,
    /// What sidecars dial.
    pub relays: Vec<String>,
    /// The name on the relay's certificate, when not the relay URLs' host.
    pub server_name: Option<String>,
    /// Lifetime of binding certificates, in days.
    pub certificate_days: u32,
    /// The catalog's offering name.
    pub offering: String,
    /// One plan per offered service, by service name.
    pub plans: BTreeMap<String, Plan>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("username", &self.username)
            .field("host", &self.host)
            .field("relays", &self.relays)
            .field("plans", &self.plans)
            .field("store_is_default", &self.store_is_default)
            .finish_non_exhaustive()
    }
}

/// One plan: a service offered through the broker.
#[derive(Clone, PartialEq, Eq)]
pub struct Plan {
    /// The service.
    pub service: String,
    /// The database name in the credentials.
    pub database: String,
    /// The port apps connect to at `broker.host` (0 until the relay binds an ephemeral
    /// `listen` port).
    pub port: u16,
    /// Which MySQL credentials bindings get.
    pub credentials: PlanCredentials,
    /// The plan's description in the catalog.
    pub description: String,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("service", &self.service)
            .field("database", &self.database)
            .field("port", &self.port)
            .field(
                "credentials",
                &match &self.credentials {
                    PlanCredentials::Fixed { username, .. } => format!("fixed user {username}"),
                    PlanCredentials::PerBinding => "per binding".to_owned(),
                },
            )
            .finish()
    }
}

/// Which MySQL credentials a plan's bindings get.
#[derive(Clone, PartialEq, Eq)]
pub enum PlanCredentials {
    /// The operator's user and password, the same for every binding.
    Fixed {
        /// The user.
        username: String,
        /// Its password.
        password: String,
    },
    /// A user of its own, made by the agent on bind and dropped on unbind.
    PerBinding,
}

/// Validates `broker`, given the validated services and their `broker` entries.
pub(super) fn validate(
    check: &mut Check<'_>,
    file: &Spanned<BrokerFile>,
    plans: &[(&Service, &Spanned<PlanFile>)],
    ca_path: &Path,
    base: &Path,
    env: &dyn Env,
    platform: Option<&CfInstance>,
) -> Option<Broker> {
    let b = &file.value;
    let username = b.username.value.clone();
    if username.is_empty() || username.contains(':') {
        check.at(
            &b.username,
            "broker.username",
            "must not be empty or contain ':' (basic auth splits on it)",
        );
    }
    let password = secret(
        check,
        base,
        env,
        "broker",
        ("password_file", b.password_file.as_ref()),
        ("password_env", b.password_env.as_ref()),
        config::line_of(&b.username),
    );
    let signing = &b.signing.value;
    let cert_path = base.join(&signing.cert.value);
    let signing_cert_pem = match std::fs::read_to_string(&cert_path) {
        Ok(t) => Some(t),
        Err(e) => {
            check.at(
                &signing.cert,
                "broker.signing.cert",
                format!("cannot read {}: {e}", cert_path.display()),
            );
            None
        }
    };
    let signing_key_pem = secret(
        check,
        base,
        env,
        "broker.signing",
        ("key_file", signing.key_file.as_ref()),
        ("key_env", signing.key_env.as_ref()),
        config::line_of(&b.signing),
    );
    if let (Some(cert), Some(key)) = (&signing_cert_pem, &signing_key_pem)
        && let Err(e) = pki::Ca::from_pem(cert, key)
    {
        check.at(
            &b.signing,
            "broker.signing",
            format!("cannot sign with this certificate and key: {e}"),
        );
    }
    let ca_pem = std::fs::read_to_string(ca_path).ok();
    let (store, store_is_default) = store(check, b, base, env)?;
    let certificate_days = match &b.certificate_days {
        None => DEFAULT_CERTIFICATE_DAYS,
        Some(d) if (1..=MAX_CERTIFICATE_DAYS).contains(&d.value) => d.value,
        Some(d) => {
            check.at(
                d,
                "broker.certificate_days",
                format!("must be from 1 to {MAX_CERTIFICATE_DAYS}"),
            );
            DEFAULT_CERTIFICATE_DAYS
        }
    };
    let mut relays: Vec<String> = Vec::new();
    for r in &b.relays {
        match r.value.parse::<postern_common::transport::addr::RelayUrl>() {
            Ok(_) => relays.push(r.value.clone()),
            Err(e) => check.at(r, "broker.relays", e.to_string()),
        }
    }
    if relays.is_empty()
        && let Some(route) = platform.and_then(|p| p.routes.first())
    {
        relays.push(format!("wss://{route}"));
    }
    let offering = b
        .offering
        .as_ref()
        .map_or_else(|| DEFAULT_OFFERING.to_owned(), |o| o.value.clone());
    if plans.is_empty() {
        check.at(
            file,
            "broker",
            "no service has a `broker` entry, so the catalog would offer nothing",
        );
    }
    let mut out = BTreeMap::new();
    for (svc, plan) in plans {
        if let Some(p) = self::plan(check, svc, plan, base, env) {
            out.insert(svc.name.clone(), p);
        }
    }
    Some(Broker {
        username,
        password: password?,
        signing_cert_pem: signing_cert_pem?,
        signing_key_pem: signing_key_pem?,
        ca_pem: ca_pem?,
        store,
        store_is_default,
        host: b.host.value.clone(),
        relays,
        server_name: b.server_name.as_ref().map(|s| s.value.clone()),
        certificate_days,
        offering,
        plans: out,
    })
}

fn plan(
    check: &mut Check<'_>,
    svc: &Service,
    plan: &Spanned<PlanFile>,
    base: &Path,
    env: &dyn Env,
) -> Option<Plan> {
    let p = &plan.value;
    let key = format!("services.{}.broker", svc.name);
    if svc.protocol != super::Protocol::Mysql {
        check.at(
            plan,
            &key,
            "only MySQL services can be offered through the broker",
        );
        return None;
    }
    let port = match (&p.port, svc.listen) {
        (Some(port), _) => port.value,
        // 0 (an ephemeral `listen` port) becomes the bound port when the relay starts.
        (None, Some(listen)) => listen.port(),
        (None, _) => {
            check.at(
                plan,
                &key,
                "give `port`: where bound apps connect at broker.host (the service's `listen` \
                 port is not known)",
            );
            return None;
        }
    };
    let credentials = match (&p.users, &p.username) {
        (Some(_), Some(u)) => {
            check.at(
                u,
                &key,
                "give either `users: per_binding` or `username` with a password, not both",
            );
            return None;
        }
        (Some(_), None) => PlanCredentials::PerBinding,
        (None, Some(u)) => {
            let password = secret(
                check,
                base,
                env,
                &key,
                ("password_file", p.password_file.as_ref()),
                ("password_env", p.password_env.as_ref()),
                config::line_of(u),
            )?;
            PlanCredentials::Fixed {
                username: u.value.clone(),
                password,
            }
        }
        (None, None) => {
            check.at(
                plan,
                &key,
                "give the MySQL credentials bindings get: `username` with `password_file` or \
                 `password_env`, or `users: per_binding`",
            );
            return None;
        }
    };
    Some(Plan {
        service: svc.name.clone(),
        database: p
            .database
            .as_ref()
            .map(|d| d.value.clone())
            .unwrap_or_default(),
        port,
        credentials,
        description: p
            .description
            .clone()
            .unwrap_or_else(|| format!("MySQL service {} through Postern", svc.name)),
    })
}

/// Where the store is: exactly one of `store_env`, `store_file` and `store_service`, or the
/// default SQLite file next to the config.
fn store(
    check: &mut Check<'_>,
    b: &BrokerFile,
    base: &Path,
    env: &dyn Env,
) -> Option<(String, bool)> {
    let given = [
        b.store_env.is_some(),
        b.store_file.is_some(),
        b.store_service.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        check.at(
            &b.username,
            "broker",
            "give at most one of store_env, store_file and store_service",
        );
        return None;
    }
    if let Some(var) = &b.store_env {
        return match env.var(&var.value) {
            Some(url) => Some((url.trim().to_owned(), false)),
            None => {
                check.at(
                    var,
                    "broker.store_env",
                    format!("environment variable {} is not set", var.value),
                );
                None
            }
        };
    }
    if let Some(path) = &b.store_file {
        let full = base.join(&path.value);
        return match std::fs::read_to_string(&full) {
            Ok(url) => Some((url.trim().to_owned(), false)),
            Err(e) => {
                check.at(
                    path,
                    "broker.store_file",
                    format!("cannot read {}: {e}", full.display()),
                );
                None
            }
        };
    }
    if let Some(name) = &b.store_service {
        return match store_from_vcap(env, &name.value) {
            Ok(url) => Some((url, false)),
            Err(why) => {
                check.at(name, "broker.store_service", why);
                None
            }
        };
    }
    let file = base.join("broker.sqlite");
    Some((format!("sqlite://{}?mode=rwc", file.display()), true))
}

/// The `uri` of the binding `name` in the relay's own `VCAP_SERVICES`.
fn store_from_vcap(env: &dyn Env, name: &str) -> Result<String, String> {
    let text = env
        .var("VCAP_SERVICES")
        .ok_or("VCAP_SERVICES is not set (bind the database to the relay app)")?;
    let vcap: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("VCAP_SERVICES is not JSON: {e}"))?;
    let bindings = vcap
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|v| v.as_array())
        .flatten();
    let mut names = Vec::new();
    for b in bindings {
        let this = ["binding_name", "name", "instance_name"]
            .iter()
            .filter_map(|k| b.get(*k).and_then(|v| v.as_str()))
            .collect::<Vec<_>>();
        if this.contains(&name) {
            let creds = b.get("credentials");
            let uri = ["uri", "url", "database_url"]
                .iter()
                .find_map(|k| creds.and_then(|c| c.get(*k)).and_then(|v| v.as_str()));
            return uri
                .map(str::to_owned)
                .ok_or_else(|| format!("binding {name:?} has no `uri` in its credentials"));
        }
        if let Some(first) = this.first() {
            names.push((*first).to_owned());
        }
    }
    Err(format!(
        "no binding {name:?} in VCAP_SERVICES (bound: {})",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    ))
}

/// A secret from exactly one of a file and an environment variable, never inline. `at` is the
/// line to blame when neither is given.
pub(super) fn secret(
    check: &mut Check<'_>,
    base: &Path,
    env: &dyn Env,
    key: &str,
    (file_key, file): (&str, Option<&Spanned<PathBuf>>),
    (env_key, var): (&str, Option<&Spanned<String>>),
    at: Option<u32>,
) -> Option<String> {
    let what = if file_key.starts_with("key") {
        "key"
    } else {
        "password"
    };
    let value = match (file, var) {
        (Some(path), None) => {
            let full = base.join(&path.value);
            let read = std::fs::metadata(&full).and_then(|m| {
                if m.len() > super::MAX_PASSWORD_FILE {
                    Err(std::io::Error::other(format!(
                        "larger than {} bytes",
                        super::MAX_PASSWORD_FILE
                    )))
                } else {
                    std::fs::read_to_string(&full)
                }
            });
            match read {
                Ok(p) => (
                    p.trim_end_matches(['\n', '\r']).to_owned(),
                    path.value.display().to_string(),
                    format!("{key}.{file_key}"),
                    config::line_of(path),
                ),
                Err(e) => {
                    check.at(
                        path,
                        &format!("{key}.{file_key}"),
                        format!("cannot read {}: {e}", full.display()),
                    );
                    return None;
                }
            }
        }
        (None, Some(v)) => match env.var(&v.value) {
            Some(p) => (
                p,
                v.value.clone(),
                format!("{key}.{env_key}"),
                config::line_of(v),
            ),
            None => {
                check.at(
                    v,
                    &format!("{key}.{env_key}"),
                    format!("environment variable {} is not set", v.value),
                );
                return None;
            }
        },
        (Some(_), Some(v)) => {
            check.at(
                v,
                key,
                format!("give one of {file_key} and {env_key}, not both"),
            );
            return None;
        }
        (None, None) => {
            check.error(
                at,
                key,
                format!("give the {what} in {file_key} or {env_key} (never inline)"),
            );
            return None;
        }
    };
    let (secret, source, key, line) = value;
    if secret.is_empty() {
        check.error(line, &key, format!("the {what} from {source} is empty"));
        return None;
    }
    Some(secret)
}
