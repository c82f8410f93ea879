//! The credentials a bound app receives: one format for the service broker's bindings and
//! service keys, the user-provided service JSON of `certs issue client --cf-ups`, and what the
//! `connect` sidecar reads back.
//!
//! The fields are the superset that common MySQL libraries find (Cloud Foundry's conventions,
//! java-cfenv, spring-cloud-bindings, the old cf-mysql-broker and Tanzu MySQL):
//!
//! * `hostname`/`host`, `port`, `name`/`database`, `username`, `password`, `uri`
//!   (`mysql://…`, which the platform also turns into `DATABASE_URL`) and `jdbcUrl` (used
//!   verbatim by java-cfenv; left out on request, since file-based bindings refuse key names
//!   with capitals);
//! * the TLS material three ways: `ca_certificate` (cf-mysql-broker), `tls.cert.{ca,
//!   certificate, private_key}` (Tanzu MySQL's `tls.cert.ca`, extended), and `ca.crt`,
//!   `tls.crt`, `tls.key`, which file-based bindings (`SERVICE_BINDING_ROOT`) write as files a
//!   driver can be pointed at;
//! * `postern`: what the `connect` sidecar needs to reach the relay itself (the service, the
//!   relay URLs, the name on the relay's certificate, the local port it listens on).
//!
//! Two shapes of endpoint: **direct**, where `host:port` is the relay's MySQL listener and the
//! app's driver does TLS with the client certificate (`uri` and `jdbcUrl` ask for
//! `VERIFY_IDENTITY`); and **sidecar**, where `host:port` is `127.0.0.1:LOCAL_PORT` inside the
//! app's container, the app speaks plain MySQL to the sidecar and the sidecar carries it to the
//! relay with the certificate (the answer for Connector/J, which cannot take a certificate from
//! the environment).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The JSON key of the sidecar's part of the credentials.
pub const POSTERN_KEY: &str = "postern";

/// Everything that goes into a binding's credentials.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The Postern service the binding reaches.
    pub service: String,
    /// The client identity name in the certificate (`postern://client/NAME`).
    pub identity: String,
    /// Where apps connect: the relay's MySQL listener (direct), or `127.0.0.1` (sidecar).
    pub host: String,
    /// The port apps connect to.
    pub port: u16,
    /// `Some(port)`: the sidecar listens on `127.0.0.1:port` and `host:port` point at it.
    pub local_port: Option<u16>,
    /// The database name (may be empty).
    pub database: String,
    /// The MySQL user name.
    pub username: String,
    /// The MySQL password.
    pub password: String,
    /// The CA that signed the relay's certificate (PEM): apps verify the relay with it.
    pub ca_pem: String,
    /// The client certificate chain (PEM, leaf first, then any intermediate).
    pub cert_pem: String,
    /// The client key (PEM).
    pub key_pem: String,
    /// The relay URLs the sidecar dials (`quic://…`, `wss://…`).
    pub relays: Vec<String>,
    /// The name on the relay's certificate, when it is not the relay URL's host.
    pub server_name: Option<String>,
    /// Whether to include `jdbcUrl`.
    pub jdbc_url: bool,
    /// When the certificate expires (RFC 3339), if known.
    pub expires_at: Option<String>,
}

/// A binding's credentials, as serialised into `VCAP_SERVICES` and service keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Where apps connect (Cloud Foundry's key).
    pub hostname: String,
    /// The same (java-cfenv, spring-cloud-bindings).
    pub host: String,
    /// The port.
    pub port: u16,
    /// The database name (Cloud Foundry's key).
    pub name: String,
    /// The same (spring-cloud-bindings).
    pub database: String,
    /// The MySQL user.
    pub username: String,
    /// The MySQL password.
    pub password: String,
    /// `mysql://USER:PASSWORD@HOST:PORT/DB[?ssl-mode=VERIFY_IDENTITY]`.
    pub uri: String,
    /// `jdbc:mysql://HOST:PORT/DB?user=…&password=…&sslMode=…`.
    #[serde(rename = "jdbcUrl", default, skip_serializing_if = "Option::is_none")]
    pub jdbc_url: Option<String>,
    /// The CA (PEM) that signed the relay's certificate.
    pub ca_certificate: String,
    /// The TLS material as one object.
    pub tls: Tls,
    /// The CA, for file-based bindings.
    #[serde(rename = "ca.crt")]
    pub ca_crt: String,
    /// The client certificate chain, for file-based bindings.
    #[serde(rename = "tls.crt")]
    pub tls_crt: String,
    /// The client key, for file-based bindings.
    #[serde(rename = "tls.key")]
    pub tls_key: String,
    /// What the sidecar needs.
    pub postern: Postern,
}

/// `tls` in the credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tls {
    /// `tls.cert`.
    pub cert: TlsCert,
}

/// `tls.cert` in the credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCert {
    /// The CA (PEM).
    pub ca: String,
    /// The client certificate chain (PEM).
    pub certificate: String,
    /// The client key (PEM).
    pub private_key: String,
}

/// `postern` in the credentials: how the sidecar reaches the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Postern {
    /// The service.
    pub service: String,
    /// The client identity name of the certificate.
    pub identity: String,
    /// Relay URLs (`quic://…`, `wss://…`).
    pub relays: Vec<String>,
    /// The name on the relay's certificate, if not the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Where the sidecar listens (`127.0.0.1:PORT`), when the credentials point at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    /// When the certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl Credentials {
    /// The credentials for `spec`.
    pub fn new(spec: &Spec) -> Self {
        let sidecar = spec.local_port.is_some();
        let userinfo = format!(
            "{}:{}",
            percent_encode(&spec.username),
            percent_encode(&spec.password)
        );
        let db = percent_encode(&spec.database);
        let host = if spec.host.contains(':') {
            format!("[{}]", spec.host)
        } else {
            spec.host.clone()
        };
        let uri = format!(
            "mysql://{userinfo}@{host}:{}/{db}{}",
            spec.port,
            if sidecar {
                ""
            } else {
                "?ssl-mode=VERIFY_IDENTITY"
            }
        );
        // Through the sidecar the link to the relay is encrypted and authenticated by the
        // sidecar: the app's own connection is a plain one on loopback.
        let jdbc = format!(
            "jdbc:mysql://{host}:{}/{db}?user={}&password={}&sslMode={}",
            spec.port,
            percent_encode(&spec.username),
            percent_encode(&spec.password),
            if sidecar {
                "DISABLED"
            } else {
                "VERIFY_IDENTITY"
            }
        );
        let cert = TlsCert {
            ca: spec.ca_pem.clone(),
            certificate: spec.cert_pem.clone(),
            private_key: spec.key_pem.clone(),
        };
        Self {
            hostname: spec.host.clone(),
            host: spec.host.clone(),
            port: spec.port,
            name: spec.database.clone(),
            database: spec.database.clone(),
            username: spec.username.clone(),
            password: spec.password.clone(),
            uri,
            jdbc_url: spec.jdbc_url.then_some(jdbc),
            ca_certificate: spec.ca_pem.clone(),
            ca_crt: spec.ca_pem.clone(),
            tls_crt: spec.cert_pem.clone(),
            tls_key: spec.key_pem.clone(),
            tls: Tls { cert },
            postern: Postern {
                service: spec.service.clone(),
                identity: spec.identity.clone(),
                relays: spec.relays.clone(),
                server_name: spec.server_name.clone(),
                local_port: spec.local_port,
                expires_at: spec.expires_at.clone(),
            },
        }
    }

    /// As a JSON value.
    pub fn to_value(&self) -> Value {
        // A struct of strings, numbers and options always serialises.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// What the sidecar (`connect --binding`, `--service-key`) reads from a binding's credentials.
/// Lenient on purpose: file-based bindings turn numbers into text, and an operator may have
/// written a user-provided service by hand, so the TLS material is taken from whichever of the
/// three places holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct SidecarView {
    /// The service.
    pub service: String,
    /// Relay URLs.
    pub relays: Vec<String>,
    /// The name on the relay's certificate.
    pub server_name: Option<String>,
    /// Where to listen, when the credentials say.
    pub local_port: Option<u16>,
    /// The CA (PEM).
    pub ca_pem: String,
    /// The client certificate chain (PEM).
    pub cert_pem: String,
    /// The client key (PEM). Kept in memory only.
    pub key_pem: String,
    /// The MySQL user, database and password, for clients `connect` starts.
    pub username: String,
    /// The MySQL password.
    pub password: String,
    /// The database.
    pub database: String,
}

impl std::fmt::Debug for SidecarView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarView")
            .field("service", &self.service)
            .field("relays", &self.relays)
            .field("server_name", &self.server_name)
            .field("local_port", &self.local_port)
            .field("username", &self.username)
            .field("database", &self.database)
            .field("password", &"<redacted>")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why credentials cannot be used by the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// A field is missing or has the wrong type.
    #[error(
        "the credentials have no {0} (are they a Postern binding? `postern` holds the service and the relay URLs)"
    )]
    Missing(&'static str),
    /// A field has a value that cannot be used.
    #[error("the credentials' {field} is not usable: {why}")]
    Bad {
        /// Which field.
        field: &'static str,
        /// Why.
        why: String,
    },
}

impl SidecarView {
    /// Reads the credentials object of a binding (the value of `credentials`).
    pub fn from_credentials(c: &Value) -> Result<Self, BindingError> {
        let postern = c
            .get(POSTERN_KEY)
            .map(nested)
            .ok_or(BindingError::Missing("`postern` object"))?;
        let service =
            text(postern.get("service")).ok_or(BindingError::Missing("`postern.service`"))?;
        let relays = match nested_ref(postern.get("relays")) {
            Some(Value::Array(a)) => a.iter().filter_map(|v| text(Some(v))).collect(),
            Some(Value::String(s)) => s
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            _ => Vec::new(),
        };
        if relays.is_empty() {
            return Err(BindingError::Missing("`postern.relays`"));
        }
        let local_port = match postern.get("local_port") {
            None | Some(Value::Null) => None,
            Some(v) => Some(port(v).ok_or_else(|| BindingError::Bad {
                field: "postern.local_port",
                why: format!("{v} is not a port number"),
            })?),
        };
        let tls_cert = c
            .get("tls")
            .map(nested)
            .and_then(|t| t.get("cert").map(nested));
        let from_tls = |k: &str| tls_cert.as_ref().and_then(|t| text(t.get(k)));
        let ca_pem = from_tls("ca")
            .or_else(|| text(c.get("ca.crt")))
            .or_else(|| text(c.get("ca_certificate")))
            .ok_or(BindingError::Missing(
                "CA (`ca_certificate`, `tls.cert.ca` or `ca.crt`)",
            ))?;
        let cert_pem = from_tls("certificate")
            .or_else(|| text(c.get("tls.crt")))
            .ok_or(BindingError::Missing(
                "client certificate (`tls.cert.certificate` or `tls.crt`)",
            ))?;
        let key_pem = from_tls("private_key")
            .or_else(|| text(c.get("tls.key")))
            .ok_or(BindingError::Missing(
                "client key (`tls.cert.private_key` or `tls.key`)",
            ))?;
        Ok(Self {
            service,
            relays,
            server_name: text(postern.get("server_name")).filter(|s| !s.is_empty()),
            local_port,
            ca_pem,
            cert_pem,
            key_pem,
            username: text(c.get("username")).unwrap_or_default(),
            password: text(c.get("password")).unwrap_or_default(),
            database: text(c.get("name"))
                .or_else(|| text(c.get("database")))
                .unwrap_or_default(),
        })
    }
}

/// A nested value that file-based bindings wrote as JSON text, parsed; others as they are.
fn nested(v: &Value) -> Value {
    match v {
        Value::String(s) if s.trim_start().starts_with(['{', '[']) => {
            serde_json::from_str(s).unwrap_or_else(|_| v.clone())
        }
        other => other.clone(),
    }
}

fn nested_ref(v: Option<&Value>) -> Option<Value> {
    v.map(nested)
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn port(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|p| *p != 0)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(local_port: Option<u16>) -> Spec {
        Spec {
            service: "orders".into(),
            identity: "binding-1".into(),
            host: local_port.map_or("relay.apps.internal".into(), |_| "127.0.0.1".into()),
            port: local_port.unwrap_or(3306),
            local_port,
            database: "appdb".into(),
            username: "app".into(),
            password: "p@ss w/rd".into(),
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            relays: vec!["wss://relay.example.com".into()],
            server_name: None,
            jdbc_url: true,
            expires_at: None,
        }
    }

    #[test]
    fn direct_credentials_ask_for_tls_and_encode_the_password() {
        let c = Credentials::new(&spec(None));
        assert_eq!(
            c.uri,
            "mysql://app:p%40ss%20w%2Frd@relay.apps.internal:3306/appdb?ssl-mode=VERIFY_IDENTITY"
        );
        assert_eq!(
            c.jdbc_url.as_deref(),
            Some(
                "jdbc:mysql://relay.apps.internal:3306/appdb?user=app&password=p%40ss%20w%2Frd&sslMode=VERIFY_IDENTITY"
            )
        );
        let v = c.to_value();
        for key in [
            "hostname",
            "host",
            "port",
            "name",
            "database",
            "username",
            "password",
            "uri",
            "jdbcUrl",
            "ca_certificate",
            "ca.crt",
            "tls.crt",
            "tls.key",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["tls"]["cert"]["ca"], "CA");
        assert_eq!(v["port"], 3306);
        let back: Credentials = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn sidecar_credentials_point_at_loopback_and_read_back() {
        let mut s = spec(Some(3306));
        s.jdbc_url = false;
        let c = Credentials::new(&s);
        assert_eq!(c.uri, "mysql://app:p%40ss%20w%2Frd@127.0.0.1:3306/appdb");
        let v = c.to_value();
        assert!(v.get("jdbcUrl").is_none());
        let view = SidecarView::from_credentials(&v).unwrap();
        assert_eq!(view.service, "orders");
        assert_eq!(view.local_port, Some(3306));
        assert_eq!(view.relays, ["wss://relay.example.com"]);
        assert_eq!(
            (
                view.ca_pem.as_str(),
                view.cert_pem.as_str(),
                view.key_pem.as_str()
            ),
            ("CA", "CERT", "KEY")
        );
        assert_eq!(view.password, "p@ss w/rd");
        assert!(
            !format!("{view:?}").contains("KEY"),
            "the key is never printed"
        );
    }

    #[test]
    fn file_based_bindings_text_values_are_read() {
        // SERVICE_BINDING_ROOT writes every value as the text of a file; nested values as JSON.
        let v = serde_json::json!({
            "postern": "{\"service\":\"orders\",\"identity\":\"b\",\"relays\":[\"quic://r:7443\"],\"local_port\":\"3307\"}",
            "ca.crt": "CA", "tls.crt": "CERT", "tls.key": "KEY", "port": "3306"
        });
        let view = SidecarView::from_credentials(&v).unwrap();
        assert_eq!(view.local_port, Some(3307));
        assert_eq!(view.relays, ["quic://r:7443"]);
    }

    #[test]
    fn missing_parts_are_named() {
        let e =
            SidecarView::from_credentials(&serde_json::json!({"uri": "mysql://x"})).unwrap_err();
        assert!(e.to_string().contains("postern"), "{e}");
        let e = SidecarView::from_credentials(&serde_json::json!({
            "postern": {"service": "orders", "relays": ["wss://r"]}, "ca.crt": "CA", "tls.crt": "C"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("client key"), "{e}");
        let e = SidecarView::from_credentials(&serde_json::json!({
            "postern": {"service": "orders", "relays": ["wss://r"], "local_port": 70000},
        }))
        .unwrap_err();
        assert!(e.to_string().contains("local_port"), "{e}");
    }
}
