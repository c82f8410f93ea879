//! The relay's service broker as a platform calls it: [`Osb`] speaks Open Service Broker API v2
//! (basic auth, `X-Broker-API-Version`, JSON bodies) over [`crate::api::Api`]'s plain HTTP, so
//! a test sees exactly the status and body the relay wrote. [`Postgres`] gives each test a
//! database of its own on the machine's PostgreSQL; [`BindingFiles`] writes a binding's PEMs as
//! an app's driver would read them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::api::{Api, Response};

/// The user name of the broker in stacks with [`crate::stack::StackBuilder::broker`].
pub const BROKER_USER: &str = "cloud-controller";
/// The API version Cloud Foundry sends today.
pub const API_VERSION: &str = "2.17";

/// An OSB client.
#[derive(Debug, Clone)]
pub struct Osb {
    /// The relay's HTTP listener, with the broker's credentials.
    pub api: Api,
    /// What `X-Broker-API-Version` says (`None`: the header is left out).
    pub version: Option<String>,
}

/// The catalog's ids.
#[derive(Debug, Clone)]
pub struct CatalogIds {
    /// The offering's id.
    pub service_id: String,
    /// Plan name (the service) → id.
    pub plans: Vec<(String, String)>,
}

impl CatalogIds {
    /// The id of plan `name`.
    pub fn plan(&self, name: &str) -> &str {
        &self
            .plans
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no plan {name} in {:?}", self.plans))
            .1
    }
}

impl Osb {
    /// The broker at `api` (which carries its credentials), speaking [`API_VERSION`].
    pub fn new(api: Api) -> Self {
        Self {
            api,
            version: Some(API_VERSION.into()),
        }
    }

    /// A request as the platform makes it.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let mut headers = vec![(
            "X-Broker-API-Request-Identity",
            "e26cea32-0ac3-4d10-9a49-3c2aa4c6cf3b",
        )];
        if let Some(v) = &self.version {
            headers.push(("X-Broker-API-Version", v.as_str()));
        }
        let body = body.map(Value::to_string);
        self.api
            .request_with(method, path, &headers, body.as_deref())
            .await
    }

    /// `GET /v2/catalog`, which must answer 200; its ids.
    pub async fn catalog(&self) -> (Value, CatalogIds) {
        let c: Value = self
            .call("GET", "/v2/catalog", None)
            .await
            .expect(200)
            .json();
        let service = &c["services"][0];
        let ids = CatalogIds {
            service_id: service["id"].as_str().expect("service id").to_owned(),
            plans: service["plans"]
                .as_array()
                .expect("plans")
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().expect("plan name").to_owned(),
                        p["id"].as_str().expect("plan id").to_owned(),
                    )
                })
                .collect(),
        };
        (c, ids)
    }

    /// `PUT /v2/service_instances/ID` for `plan`.
    pub async fn provision(&self, ids: &CatalogIds, instance: &str, plan: &str) -> Response {
        let body = json!({
            "service_id": ids.service_id,
            "plan_id": ids.plan(plan),
            "organization_guid": "org-guid",
            "space_guid": "space-guid",
            "context": {"platform": "cloudfoundry", "organization_guid": "org-guid", "space_guid": "space-guid", "instance_name": "db"},
        });
        self.call(
            "PUT",
            &format!("/v2/service_instances/{instance}"),
            Some(&body),
        )
        .await
    }

    /// `PUT …/service_bindings/ID` for an app, with `parameters`.
    pub async fn bind(
        &self,
        ids: &CatalogIds,
        instance: &str,
        binding: &str,
        plan: &str,
        parameters: Value,
    ) -> Response {
        let body = json!({
            "service_id": ids.service_id,
            "plan_id": ids.plan(plan),
            "bind_resource": {"app_guid": "app-guid"},
            "context": {"platform": "cloudfoundry"},
            "parameters": parameters,
        });
        self.call(
            "PUT",
            &format!("/v2/service_instances/{instance}/service_bindings/{binding}"),
            Some(&body),
        )
        .await
    }

    /// `DELETE …/service_bindings/ID?service_id&plan_id`.
    pub async fn unbind(
        &self,
        ids: &CatalogIds,
        instance: &str,
        binding: &str,
        plan: &str,
    ) -> Response {
        self.call(
            "DELETE",
            &format!(
                "/v2/service_instances/{instance}/service_bindings/{binding}?service_id={}&plan_id={}",
                ids.service_id,
                ids.plan(plan)
            ),
            None,
        )
        .await
    }

    /// `DELETE /v2/service_instances/ID?service_id&plan_id`.
    pub async fn deprovision(&self, ids: &CatalogIds, instance: &str, plan: &str) -> Response {
        self.call(
            "DELETE",
            &format!(
                "/v2/service_instances/{instance}?service_id={}&plan_id={}",
                ids.service_id,
                ids.plan(plan)
            ),
            None,
        )
        .await
    }
}

/// A database of its own on the machine's PostgreSQL (127.0.0.1:5432, trust auth), dropped
/// with this value.
pub struct Postgres {
    /// The database name.
    pub name: String,
}

impl Postgres {
    /// Creates a fresh database.
    pub fn create() -> Self {
        let name = format!("postern_test_{:016x}", rand::random::<u64>());
        psql(&format!("CREATE DATABASE {name}"));
        Self { name }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    /// Runs `sql` in the database; its output (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                &self.name,
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-c", sql])
        .output()
        .expect("run psql (PostgreSQL must run on 127.0.0.1:5432 with trust auth)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A binding's TLS material written as files (`ca.pem`, `cert.pem`, `key.pem`), as a driver
/// reads it, from the credentials' `tls.cert` object.
pub struct BindingFiles {
    /// The CA.
    pub ca: PathBuf,
    /// The client certificate chain.
    pub cert: PathBuf,
    /// The client key.
    pub key: PathBuf,
}

impl BindingFiles {
    /// Writes the files of `credentials` into `dir` (a directory of its own).
    pub fn write(credentials: &Value, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("binding dir");
        let tls = &credentials["tls"]["cert"];
        let file = |name: &str, field: &str| {
            let path = dir.join(name);
            std::fs::write(
                &path,
                tls[field]
                    .as_str()
                    .unwrap_or_else(|| panic!("tls.cert.{field}")),
            )
            .expect("write binding file");
            path
        };
        Self {
            ca: file("ca.pem", "ca"),
            cert: file("cert.pem", "certificate"),
            key: file("key.pem", "private_key"),
        }
    }

    /// `mariadb` at `port` with these files and the credentials' user and password.
    pub fn cli(&self, port: u16, credentials: &Value) -> crate::Cli {
        crate::Cli::at(port)
            .user(credentials["username"].as_str().expect("username"))
            .password(credentials["password"].as_str().expect("password"))
            .arg(&format!("--ssl-ca={}", self.ca.display()))
            .arg("--ssl-verify-server-cert")
            .arg(&format!("--ssl-cert={}", self.cert.display()))
            .arg(&format!("--ssl-key={}", self.key.display()))
    }
}
