//! Where `connect --binding` and `connect --service-key` find a binding's credentials.
//!
//! A Cloud Foundry app receives its bindings in one of three ways, depending on the app's
//! features (all three are read, so the sidecar works whichever the app enabled):
//!
//! * `VCAP_SERVICES`: JSON in the environment, `{LABEL: [{name, binding_name, instance_name,
//!   label, tags, credentials: {…}}, …], …}`;
//! * `VCAP_SERVICES_FILE_PATH` (`file-based-vcap-services`): a file holding the same JSON;
//! * `SERVICE_BINDING_ROOT` (`service-binding-k8s`): one directory per binding,
//!   `$SERVICE_BINDING_ROOT/BINDING_NAME/KEY`, one file per credentials key, nested values
//!   written as JSON text (which [`SidecarView`] reads as well as real JSON).
//!
//! `--binding NAME` matches NAME against each binding's `binding_name`, then its `name`, then
//! its `instance_name` (the first of those that matches exactly one binding wins). With no
//! NAME, the one binding whose credentials hold a `postern` object is taken.
//!
//! A service key (`cf service-key db laptop`) is the same credentials printed by the CLI: the
//! text may start with a `Getting key …` line, and newer CLIs wrap the credentials as
//! `{"credentials": {…}}`. Both shapes are read.
//!
//! The private key stays in memory: it is turned into TLS material here and never written to
//! disk or logged ([`SidecarView`]'s `Debug` redacts it).

use std::fmt;
use std::path::{Path, PathBuf};

use postern_common::binding::{BindingError, POSTERN_KEY, SidecarView};
use postern_common::config::Env;
use postern_common::tls::Material;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value};

/// Largest binding file read (Cloud Foundry caps file-based bindings at 1 MB).
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// A binding found in the environment or a service key, read for the sidecar.
#[derive(Debug, Clone)]
pub struct Bound {
    /// Which binding (its name, or the service key's source).
    pub name: String,
    /// What the sidecar needs from its credentials.
    pub view: SidecarView,
}

/// Why no usable binding was found.
#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    /// None of the three ways of delivering bindings is set.
    #[error(
        "no bindings in the environment: none of VCAP_SERVICES, VCAP_SERVICES_FILE_PATH or SERVICE_BINDING_ROOT is set (is the service bound to this app, and the app restarted since?)"
    )]
    NoBindings,
    /// A source is set but cannot be read or parsed.
    #[error("{origin}: {why}")]
    Unreadable {
        /// `VCAP_SERVICES`, a file path, …
        origin: String,
        /// Why.
        why: String,
    },
    /// No binding has that name.
    #[error("no binding named {name:?}; bindings present: {present}")]
    NoSuchBinding {
        /// The name asked for.
        name: String,
        /// The bindings there are.
        present: Present,
    },
    /// More than one binding has that name.
    #[error("{name:?} names more than one binding ({present}); give the binding name")]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The bindings it matched.
        present: Present,
    },
    /// No name given, and not exactly one Postern binding.
    #[error("{count} Postern bindings: name one with --binding NAME; bindings present: {present}")]
    Choose {
        /// How many hold `postern`.
        count: usize,
        /// The bindings there are.
        present: Present,
    },
    /// The binding's credentials are not a Postern binding's.
    #[error("binding {name:?} is not usable: {why}")]
    NotPostern {
        /// The binding.
        name: String,
        /// Why.
        why: BindingError,
    },
    /// The TLS material in the credentials is not valid PEM.
    #[error("binding {name:?}: {what} is not valid PEM ({why})")]
    BadPem {
        /// The binding.
        name: String,
        /// Which part.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A service key that holds no JSON object.
    #[error(
        "{origin}: no service key JSON found (expected the output of `cf service-key SERVICE KEY`: {why})"
    )]
    BadServiceKey {
        /// The file or `stdin`.
        origin: String,
        /// Why.
        why: String,
    },
}

/// The bindings present, for error messages: `NAME (label LABEL, Postern credentials)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present(Vec<String>);

impl fmt::Display for Present {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.0.join(", "))
    }
}

/// One binding as delivered to the app, before its credentials are read.
#[derive(Debug, Clone)]
struct Entry {
    binding_name: Option<String>,
    name: Option<String>,
    instance_name: Option<String>,
    label: Option<String>,
    credentials: Value,
}

impl Entry {
    /// The name to show and report.
    fn shown(&self) -> String {
        self.binding_name
            .clone()
            .or_else(|| self.name.clone())
            .or_else(|| self.instance_name.clone())
            .unwrap_or_else(|| "(unnamed)".into())
    }

    fn is_postern(&self) -> bool {
        self.credentials.get(POSTERN_KEY).is_some()
    }

    fn describe(&self) -> String {
        let mut notes = Vec::new();
        if let Some(l) = &self.label {
            notes.push(format!("label {l}"));
        }
        if self.is_postern() {
            notes.push("Postern credentials".into());
        }
        if notes.is_empty() {
            self.shown()
        } else {
            format!("{} ({})", self.shown(), notes.join(", "))
        }
    }
}

/// Finds binding `name` (or, when `name` is empty, the only Postern binding) in the bindings
/// the environment delivers (`VCAP_SERVICES`, `VCAP_SERVICES_FILE_PATH`, `SERVICE_BINDING_ROOT`).
pub fn from_env(name: &str, env: &dyn Env) -> Result<Bound, BoundError> {
    let entries = entries(env)?;
    let entry = choose(name, &entries)?;
    let shown = entry.shown();
    read(shown, &entry.credentials)
}

/// Reads a service key: the output of `cf service-key SERVICE KEY` (with or without the
/// `Getting key …` line; the credentials themselves or wrapped in `{"credentials": …}`).
/// `source` names it in errors.
pub fn from_service_key(text: &str, source: &str) -> Result<Bound, BoundError> {
    let bad = |why: String| BoundError::BadServiceKey {
        origin: source.to_owned(),
        why,
    };
    // The CLI's chatter comes first; the JSON starts on the first line that opens an object.
    let start = text
        .lines()
        .scan(0usize, |at, line| {
            let here = *at;
            *at += line.len() + 1;
            Some((here, line))
        })
        .find(|(_, line)| line.trim_start().starts_with('{'))
        .map(|(at, line)| at + (line.len() - line.trim_start().len()))
        .ok_or_else(|| bad("no line starts with `{`".into()))?;
    let value: Value = serde_json::from_str(text[start..].trim_end())
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    let credentials = match value.get("credentials") {
        Some(inner) if value.get(POSTERN_KEY).is_none() && inner.is_object() => inner.clone(),
        _ => value,
    };
    read(format!("service key from {source}"), &credentials)
}

/// Reads `path`, or standard input for `-`, as a service key.
pub fn from_service_key_file(path: &Path) -> Result<Bound, BoundError> {
    let (text, source) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text).map_err(|e| {
            BoundError::Unreadable {
                origin: "stdin".into(),
                why: e.to_string(),
            }
        })?;
        (text, "stdin".to_owned())
    } else {
        (read_file(path)?, path.display().to_string())
    };
    from_service_key(&text, &source)
}

impl Bound {
    /// The TLS material of the binding (CA, certificate chain, key), in memory.
    pub fn material(&self) -> Result<Material, BoundError> {
        let bad = |what, why: String| BoundError::BadPem {
            name: self.name.clone(),
            what,
            why,
        };
        let v = &self.view;
        let cas = CertificateDer::pem_slice_iter(v.ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("the CA certificate", e.to_string()))?;
        if cas.is_empty() {
            return Err(bad("the CA certificate", "no certificate in it".into()));
        }
        let chain = CertificateDer::pem_slice_iter(v.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("the client certificate", e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("the client certificate", "no certificate in it".into()));
        }
        // Not the parser's message: it must not quote the key.
        PrivateKeyDer::from_pem_slice(v.key_pem.as_bytes())
            .map_err(|_| bad("the client key", "no private key in it".into()))?;
        Material::from_pem(&v.ca_pem, &v.cert_pem, &v.key_pem)
            .map_err(|e| bad("the TLS material", e.to_string()))
    }
}

fn read(name: String, credentials: &Value) -> Result<Bound, BoundError> {
    let view =
        SidecarView::from_credentials(credentials).map_err(|why| BoundError::NotPostern {
            name: name.clone(),
            why,
        })?;
    Ok(Bound { name, view })
}

/// Every binding the environment delivers, from each source that is set.
fn entries(env: &dyn Env) -> Result<Vec<Entry>, BoundError> {
    let mut found = Vec::new();
    let mut any = false;
    if let Some(text) = env.var("VCAP_SERVICES").filter(|t| !t.trim().is_empty()) {
        any = true;
        found.extend(vcap(&text, "VCAP_SERVICES")?);
    }
    if let Some(path) = env.var("VCAP_SERVICES_FILE_PATH").filter(|p| !p.is_empty()) {
        any = true;
        let text = read_file(Path::new(&path))?;
        found.extend(vcap(&text, &format!("VCAP_SERVICES_FILE_PATH {path}"))?);
    }
    if let Some(root) = env.var("SERVICE_BINDING_ROOT").filter(|p| !p.is_empty()) {
        any = true;
        found.extend(binding_root(Path::new(&root))?);
    }
    if !any {
        return Err(BoundError::NoBindings);
    }
    Ok(found)
}

/// The bindings in `VCAP_SERVICES` JSON.
fn vcap(text: &str, source: &str) -> Result<Vec<Entry>, BoundError> {
    let unreadable = |why: String| BoundError::Unreadable {
        origin: source.to_owned(),
        why,
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| unreadable(format!("not JSON: {e}")))?;
    let Value::Object(labels) = value else {
        return Err(unreadable("not a JSON object of service labels".into()));
    };
    let mut out = Vec::new();
    for (label, list) in labels {
        let Value::Array(list) = list else {
            return Err(unreadable(format!("{label:?} is not a list of bindings")));
        };
        for b in list {
            let s = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
            out.push(Entry {
                binding_name: s("binding_name"),
                name: s("name"),
                instance_name: s("instance_name"),
                label: s("label").or_else(|| Some(label.clone())),
                credentials: b.get("credentials").cloned().unwrap_or(Value::Null),
            });
        }
    }
    Ok(out)
}

/// The bindings under `SERVICE_BINDING_ROOT`: a directory per binding, a file per key.
fn binding_root(root: &Path) -> Result<Vec<Entry>, BoundError> {
    let unreadable = |p: &Path, e: std::io::Error| BoundError::Unreadable {
        origin: format!("SERVICE_BINDING_ROOT {}", p.display()),
        why: e.to_string(),
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| unreadable(root, e))?
        .filter_map(Result::ok)
        .map(|d| d.path())
        // Kubernetes-style projections keep the real files under `..data`; skip hidden entries.
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let mut keys = Map::new();
        for file in std::fs::read_dir(&dir).map_err(|e| unreadable(&dir, e))? {
            let path = file.map_err(|e| unreadable(&dir, e))?.path();
            let Some(key) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if key.starts_with('.') || !path.is_file() {
                continue;
            }
            let text = read_file(&path)?;
            keys.insert(key.to_owned(), Value::String(text));
        }
        let label = keys.get("type").and_then(Value::as_str).map(str::to_owned);
        out.push(Entry {
            binding_name: Some(name.clone()),
            name: keys
                .get("name")
                .and_then(Value::as_str)
                .map(|s| s.trim().to_owned())
                .or(Some(name)),
            instance_name: None,
            label,
            credentials: Value::Object(keys),
        });
    }
    Ok(out)
}

/// Picks the binding `name` names, or the only Postern binding when `name` is empty.
fn choose<'a>(name: &str, entries: &'a [Entry]) -> Result<&'a Entry, BoundError> {
    let present = || Present(entries.iter().map(Entry::describe).collect());
    if name.is_empty() {
        let postern: Vec<&Entry> = entries.iter().filter(|e| e.is_postern()).collect();
        return match postern.as_slice() {
            [one] => Ok(one),
            _ => Err(BoundError::Choose {
                count: postern.len(),
                present: present(),
            }),
        };
    }
    let fields: [fn(&Entry) -> Option<&String>; 3] = [
        |e| e.binding_name.as_ref(),
        |e| e.name.as_ref(),
        |e| e.instance_name.as_ref(),
    ];
    for field in fields {
        let hits: Vec<&Entry> = entries
            .iter()
            .filter(|e| field(e).is_some_and(|n| n == name))
            .collect();
        match hits.as_slice() {
            [] => continue,
            [one] => return Ok(one),
            many => {
                return Err(BoundError::Ambiguous {
                    name: name.to_owned(),
                    present: Present(many.iter().map(|e| e.describe()).collect()),
                });
            }
        }
    }
    Err(BoundError::NoSuchBinding {
        name: name.to_owned(),
        present: present(),
    })
}

fn read_file(path: &Path) -> Result<String, BoundError> {
    let unreadable = |why: String| BoundError::Unreadable {
        origin: path.display().to_string(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
    if meta.len() > MAX_FILE {
        return Err(unreadable(format!(
            "{} bytes is more than a binding holds",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use postern_common::binding::{Credentials, Spec};
    use postern_common::pki::{Ca, Kind, LeafSpec};
    use serde_json::json;

    use super::*;

    /// Real PEMs: a CA and a client certificate it issued.
    fn pems() -> (String, String, String) {
        let (ca, _key) = Ca::generate("Bound Test CA", 1).expect("ca");
        let issued = ca
            .issue(&LeafSpec::new(Kind::Client, "binding-1", 1))
            .expect("issue");
        (ca.cert_pem.clone(), issued.cert_pem, issued.key_pem)
    }

    fn credentials(local_port: Option<u16>) -> Value {
        let (ca, cert, key) = pems();
        Credentials::new(&Spec {
            service: "orders".into(),
            identity: "binding-1".into(),
            host: "127.0.0.1".into(),
            port: local_port.unwrap_or(3306),
            local_port,
            database: "appdb".into(),
            username: "app".into(),
            password: "secret".into(),
            ca_pem: ca,
            cert_pem: cert,
            key_pem: key,
            relays: vec!["quic://relay.example.com:7443".into()],
            server_name: Some("relay.example.com".into()),
            jdbc_url: true,
            expires_at: None,
        })
        .to_value()
    }

    fn vcap_env(services: &Value) -> BTreeMap<&'static str, String> {
        BTreeMap::from([("VCAP_SERVICES", services.to_string())])
    }

    fn services() -> Value {
        json!({
            "postern": [{
                "name": "db", "binding_name": "orders-db", "instance_name": "db-instance",
                "label": "postern", "tags": ["mysql"], "credentials": credentials(Some(3306)),
            }],
            "p.redis": [{
                "name": "cache", "binding_name": null, "instance_name": "cache",
                "label": "p.redis", "tags": [], "credentials": {"host": "redis"},
            }],
        })
    }

    #[test]
    fn names_match_binding_name_then_name_then_instance_name() {
        let env = vcap_env(&services());
        for name in ["orders-db", "db", "db-instance", ""] {
            let b = from_env(name, &env).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!(b.name, "orders-db");
            assert_eq!(b.view.service, "orders");
            assert_eq!(b.view.local_port, Some(3306));
            assert_eq!(b.view.server_name.as_deref(), Some("relay.example.com"));
            assert_eq!(b.view.username, "app");
            b.material().expect("real PEMs");
        }
        // binding_name wins over another binding's name.
        let mut s = services();
        s["other"] = json!([{"name": "orders-db", "label": "other", "credentials": {}}]);
        assert_eq!(
            from_env("orders-db", &vcap_env(&s)).unwrap().name,
            "orders-db"
        );
    }

    #[test]
    fn errors_name_the_bindings_present() {
        let env = vcap_env(&services());
        let e = from_env("nope", &env).unwrap_err().to_string();
        assert!(e.contains("\"nope\""), "{e}");
        assert!(
            e.contains("orders-db (label postern, Postern credentials)"),
            "{e}"
        );
        assert!(e.contains("cache (label p.redis)"), "{e}");

        let e = from_env("cache", &env).unwrap_err().to_string();
        assert!(e.contains("binding \"cache\" is not usable"), "{e}");
        assert!(e.contains("postern"), "{e}");

        let none: BTreeMap<&str, String> = BTreeMap::new();
        let e = from_env("db", &none).unwrap_err().to_string();
        assert!(e.contains("VCAP_SERVICES"), "{e}");

        let mut s = services();
        s["postern"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "db2", "label": "postern", "credentials": credentials(None)}));
        let e = from_env("", &vcap_env(&s)).unwrap_err().to_string();
        assert!(e.starts_with("2 Postern bindings"), "{e}");
        assert!(e.contains("db2"), "{e}");

        let bad: BTreeMap<&str, String> = BTreeMap::from([("VCAP_SERVICES", "{oops".into())]);
        let e = from_env("db", &bad).unwrap_err().to_string();
        assert!(e.starts_with("VCAP_SERVICES: not JSON"), "{e}");
    }

    #[test]
    fn bad_pem_is_reported_without_the_key() {
        let mut c = credentials(None);
        c["tls"]["cert"]["private_key"] = json!("-----BEGIN PRIVATE KEY-----\nnot a key\n");
        let env = vcap_env(&json!({"postern": [{"name": "db", "credentials": c}]}));
        let e = from_env("db", &env)
            .unwrap()
            .material()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "binding \"db\": the client key is not valid PEM (no private key in it)"
        );

        let mut c = credentials(None);
        c["tls"]["cert"]["certificate"] = json!("hello");
        let env = vcap_env(&json!({"postern": [{"name": "db", "credentials": c}]}));
        let e = from_env("db", &env)
            .unwrap()
            .material()
            .unwrap_err()
            .to_string();
        assert!(e.contains("the client certificate is not valid PEM"), "{e}");
    }

    #[test]
    fn file_based_bindings_are_read() {
        let dir = tempfile::tempdir().unwrap();
        // VCAP_SERVICES_FILE_PATH: the same JSON in a file.
        let file = dir.path().join("vcap.json");
        std::fs::write(&file, services().to_string()).unwrap();
        let env = BTreeMap::from([("VCAP_SERVICES_FILE_PATH", file.display().to_string())]);
        assert_eq!(from_env("db", &env).unwrap().view.service, "orders");

        // SERVICE_BINDING_ROOT: a file per key, nested values as JSON text, numbers as text.
        let root = dir.path().join("bindings");
        let b = root.join("orders-db");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        std::fs::write(root.join("other").join("type"), "p.redis").unwrap();
        let c = credentials(Some(3307));
        for (k, v) in c.as_object().unwrap() {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            std::fs::write(b.join(k), text).unwrap();
        }
        std::fs::write(b.join("type"), "postern").unwrap();
        let env = BTreeMap::from([("SERVICE_BINDING_ROOT", root.display().to_string())]);
        let bound = from_env("orders-db", &env).unwrap();
        assert_eq!(bound.view.local_port, Some(3307));
        assert_eq!(bound.view.relays, ["quic://relay.example.com:7443"]);
        bound.material().expect("PEMs from files");
        assert_eq!(from_env("", &env).unwrap().name, "orders-db");
        let e = from_env("x", &env).unwrap_err().to_string();
        assert!(
            e.contains("orders-db (label postern, Postern credentials), other (label p.redis)"),
            "{e}"
        );
    }

    #[test]
    fn service_keys_with_header_wrapped_or_not() {
        let c = credentials(None);
        let plain = serde_json::to_string_pretty(&c).unwrap();
        let wrapped = serde_json::to_string_pretty(&json!({"credentials": c})).unwrap();
        for text in [
            plain.clone(),
            wrapped.clone(),
            format!("Getting key laptop for service instance db as dev...\n\n{plain}\n"),
            format!("Getting key laptop for service instance db as dev...\n\n{wrapped}\n"),
        ] {
            let b = from_service_key(&text, "stdin").unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(b.view.service, "orders");
            assert_eq!(b.view.password, "secret");
            b.material().expect("PEMs");
        }
        let e = from_service_key("Getting key laptop...\nFAILED\n", "stdin")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no service key JSON"), "{e}");
        let e = from_service_key("{\"uri\": \"mysql://x\"}", "key.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("service key from key.json"), "{e}");
        assert!(e.contains("postern"), "{e}");
    }
}
