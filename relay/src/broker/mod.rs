//! The Open Service Broker API v2, served by the relay under `/v2/` (`osb`): Cloud Foundry
//! (or any OSB platform) provisions a service instance per `cf create-service postern PLAN
//! NAME`, and every `cf bind-service` or `cf create-service-key` gets a binding of its own:
//!
//! * a fresh client certificate, identity `postern://client/binding-ID`, signed by the broker's
//!   intermediate CA (the root's key stays offline), valid `certificate_days`, admitted for the
//!   plan's service only (`clients: "*"` does not admit it; see
//!   [`postern_common::policy::BINDING_PREFIX`]);
//! * MySQL credentials: the operator's user for the plan, or a user of its own that the agent
//!   makes (with the grants in the agent's config; the admin credential never leaves the
//!   private network) and drops on unbind;
//! * credentials every common library finds ([`postern_common::binding`]), pointing at the
//!   relay's MySQL listener at `broker.host`, or, with the bind parameter `local_port`, at a
//!   sidecar inside the app's container (`postern-agent connect --binding`).
//!
//! Unbinding revokes: the binding is stamped revoked in the [`store`], every relay instance
//! sees the change within [`POLL`] and cuts the binding's open connections, and new ones are
//! refused (the certificate itself stays valid until it expires, but no relay admits it).
//!
//! The store is shared by every relay instance (PostgreSQL or MySQL) or is an SQLite file for
//! one relay. Every operation completes within the call (well inside the platform's 60 s
//! timeout: a per-binding user is one round trip to the agent, bounded by
//! [`USER_TIMEOUT`]), so the broker never answers 202 and `last_operation` only reports
//! `succeeded` for what exists.

pub(crate) mod osb;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use postern_common::binding::{Credentials, Spec};
use postern_common::pki::{self, Ca, Kind, LeafSpec};
use postern_common::policy::BINDING_PREFIX;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access::{Access, BindingGrant};
use crate::config::broker::{Broker as Settings, Plan, PlanCredentials};
use store::{Binding, Instance, Store, StoreError};

/// How often every instance checks the store for changes (binds and unbinds made through
/// another instance).
pub const POLL: Duration = Duration::from_secs(1);
/// The longest the broker waits for the agent to make or drop a binding's MySQL user.
pub const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// The broker: its settings, the signing CA, the store.
pub(crate) struct Broker {
    pub(crate) settings: Settings,
    ca: Ca,
    pub(crate) store: Store,
    /// The service offering's id and each plan's id (by service), stable across restarts and
    /// instances: derived from the names.
    pub(crate) offering_id: String,
    pub(crate) plan_ids: BTreeMap<String, String>,
}

/// Why the broker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The signing CA was refused.
    #[error("broker.signing: {0}")]
    Signing(#[from] pki::PkiError),
    /// The store cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Broker {
    /// Opens the store (creating its tables) and loads the signing CA.
    pub(crate) async fn open(settings: Settings) -> Result<Self, BrokerError> {
        let ca = Ca::from_pem(&settings.signing_cert_pem, &settings.signing_key_pem)?;
        let store = Store::open(&settings.store).await?;
        if settings.store_is_default {
            info!(store = %store.describe, "broker bindings kept in a local SQLite file: right for one relay instance; give broker.store_* a shared PostgreSQL or MySQL database for several");
        } else {
            info!(store = %store.describe, "broker store ready");
        }
        let offering_id = stable_id(&format!("offering/{}", settings.offering));
        let plan_ids = settings
            .plans
            .keys()
            .map(|s| {
                (
                    s.clone(),
                    stable_id(&format!("plan/{}/{s}", settings.offering)),
                )
            })
            .collect();
        Ok(Self {
            settings,
            ca,
            store,
            offering_id,
            plan_ids,
        })
    }

    /// The plan with id `plan_id`.
    pub(crate) fn plan_by_id(&self, plan_id: &str) -> Option<&Plan> {
        let service = self
            .plan_ids
            .iter()
            .find(|(_, id)| id.as_str() == plan_id)?
            .0;
        self.settings.plans.get(service)
    }

    /// Reads the live bindings and makes them the relay's.
    pub(crate) async fn apply(&self, access: &Access) -> Result<usize, StoreError> {
        let live = self.store.live_bindings().await?;
        let grants: BTreeMap<String, BindingGrant> = live
            .into_iter()
            .map(|b| {
                let user = (b.per_binding && !b.username.is_empty()).then_some(b.username);
                (
                    b.identity,
                    BindingGrant {
                        service: b.service,
                        user,
                    },
                )
            })
            .collect();
        access.set_bindings(&grants);
        Ok(grants.len())
    }

    /// Follows the store until `stop`: whenever its generation changes, the live bindings are
    /// applied again. A store that cannot be read keeps the bindings as they were.
    pub(crate) async fn follow(self: Arc<Self>, access: Arc<Access>, stop: CancellationToken) {
        let mut seen: Option<i64> = None;
        let mut failing = false;
        loop {
            match self.store.generation().await {
                Ok(g) if Some(g) == seen => {}
                Ok(g) => match self.apply(&access).await {
                    Ok(n) => {
                        if seen.is_some() {
                            info!(bindings = n, "broker bindings changed");
                        }
                        seen = Some(g);
                        failing = false;
                    }
                    Err(e) => {
                        if !failing {
                            warn!(error = %e, "cannot read the broker's bindings; keeping the previous ones");
                        }
                        failing = true;
                    }
                },
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "cannot read the broker's store; keeping the bindings as they were");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// A fresh client certificate for the binding `id`: its identity, chain, key and expiry.
    pub(crate) fn issue(&self, identity: &str) -> Result<Issued, pki::PkiError> {
        let spec = LeafSpec::new(Kind::Client, identity, self.settings.certificate_days);
        let issued = self.ca.issue(&spec)?;
        Ok(Issued {
            expires_ms: i64::try_from(issued.not_after.unix_timestamp_nanos() / 1_000_000)
                .unwrap_or(i64::MAX),
            expires_at: issued.expires_at(),
            // The leaf, then the intermediate: clients send the chain up to the root the relay
            // (or the agent) trusts.
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }

    /// The credentials of a binding of `plan`.
    pub(crate) fn credentials(
        &self,
        plan: &Plan,
        identity: &str,
        cert: &Issued,
        (username, password): (&str, &str),
        params: &BindParams,
    ) -> Credentials {
        let s = &self.settings;
        let (host, port) = match params.local_port {
            Some(p) => ("127.0.0.1".to_owned(), p),
            None => (s.host.clone(), plan.port),
        };
        Credentials::new(&Spec {
            service: plan.service.clone(),
            identity: identity.to_owned(),
            host,
            port,
            local_port: params.local_port,
            database: plan.database.clone(),
            username: username.to_owned(),
            password: password.to_owned(),
            ca_pem: s.ca_pem.clone(),
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.clone(),
            relays: s.relays.clone(),
            server_name: s.server_name.clone(),
            jdbc_url: params.jdbc_url,
            expires_at: Some(cert.expires_at.clone()),
        })
    }

    /// The plan's fixed MySQL credentials, or `None` when each binding gets a user of its own.
    pub(crate) fn fixed_user(plan: &Plan) -> Option<(&str, &str)> {
        match &plan.credentials {
            PlanCredentials::Fixed { username, password } => {
                Some((username.as_str(), password.as_str()))
            }
            PlanCredentials::PerBinding => None,
        }
    }

    /// Records a provisioned instance; `Ok(None)` if it is new, `Ok(Some(existing))` if one with
    /// the id exists.
    pub(crate) async fn provision(
        &self,
        instance: &Instance,
    ) -> Result<Option<Instance>, StoreError> {
        if self.store.insert_instance(instance).await? {
            info!(instance = %instance.id, service = %instance.service, "service instance provisioned");
            return Ok(None);
        }
        self.store.instance(&instance.id).await
    }

    /// Records a binding made on this instance and applies it here at once.
    pub(crate) async fn record(&self, b: &Binding, access: &Access) -> Result<bool, StoreError> {
        let new = self.store.insert_binding(b).await?;
        if new {
            self.apply(access).await?;
        }
        Ok(new)
    }

    /// Revokes a binding and applies it here at once (other instances follow within
    /// [`POLL`]).
    pub(crate) async fn revoke(&self, id: &str, access: &Access) -> Result<(), StoreError> {
        self.store.revoke(id).await?;
        self.apply(access).await?;
        Ok(())
    }
}

/// A binding's client certificate.
pub(crate) struct Issued {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) expires_ms: i64,
    pub(crate) expires_at: String,
}

/// The bind parameters the broker understands (`cf bind-service APP SI -c '{...}'`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BindParams {
    /// Point the credentials at a sidecar on `127.0.0.1:local_port` in the app's container.
    #[serde(default)]
    pub(crate) local_port: Option<u16>,
    /// Include `jdbcUrl` (default true; file-based bindings refuse its capital letter).
    #[serde(default = "yes")]
    pub(crate) jdbc_url: bool,
}

impl Default for BindParams {
    fn default() -> Self {
        Self {
            local_port: None,
            jdbc_url: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// The client identity name of the binding `id`: `binding-` and the id when it is a plain name
/// that fits (platform GUIDs do), else `binding-` and a digest of it.
pub(crate) fn identity_of(binding_id: &str) -> String {
    let plain = format!("{BINDING_PREFIX}{binding_id}");
    if pki::check_name(&plain).is_ok() {
        return plain;
    }
    let digest = Sha256::digest(binding_id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{BINDING_PREFIX}{hex}")
}

/// A GUID-shaped id derived from `name` (so every instance and every restart agree).
fn stable_id(name: &str) -> String {
    let d = Sha256::digest(format!("postern-broker/{name}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_and_ids_are_stable_and_valid() {
        let guid = "3f9c1b2a-0d4e-4c5f-9a8b-7c6d5e4f3a2b";
        assert_eq!(identity_of(guid), format!("binding-{guid}"));
        let odd = identity_of("not/a name");
        assert!(
            odd.starts_with("binding-") && pki::check_name(&odd).is_ok(),
            "{odd}"
        );
        assert_eq!(identity_of("not/a name"), odd);
        let id = stable_id("plan/postern/orders");
        assert_eq!(id.len(), 36);
        assert_eq!(id, stable_id("plan/postern/orders"));
        assert_ne!(id, stable_id("plan/postern/billing"));
    }

    #[test]
    fn bind_parameters_are_strict() {
        let p: BindParams = serde_json::from_str(r#"{"local_port": 3306}"#).unwrap();
        assert_eq!(p.local_port, Some(3306));
        assert!(p.jdbc_url);
        assert!(serde_json::from_str::<BindParams>(r#"{"local_prot": 3306}"#).is_err());
        assert!(serde_json::from_str::<BindParams>(r#"{"local_port": 70000}"#).is_err());
    }
}
