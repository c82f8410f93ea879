//! Who may use which service: the one owner of client access rules and revocations.
//!
//! Every front end asks here (the TLS-first listener, `connect` streams, the MySQL-native
//! listener through the rules it gets from [`Access::rules`]), and agents that end TLS
//! themselves get the same rules and revocation lists from [`Access::agent_policy`]. The rules
//! start as `relay.yaml` says and can change while the relay runs: the revocation list file is
//! re-read when it changes (on a blocking thread, every [`REVOCATION_POLL`]), and a service's
//! clients can be granted or withdrawn ([`Access::update`]), and a reload puts a new `relay.yaml`'s
//! rules and revocation list file in force ([`Access::reconfigure`]). The service broker's bindings
//! ([`Access::set_bindings`]) are kept apart from the configured clients: a binding's identity
//! (`postern://client/binding-…`) reaches only the service it was bound to, even where
//! `clients` is `"*"`, and when a binding goes away its open connections are cut
//! ([`Access::binding_cut`]). Every change bumps a generation that agents' control streams watch
//! ([`Access::changes`]), so the rules the agents apply follow without a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use postern_common::mysql::server::Rules;
use postern_common::pki::Identity;
use postern_common::policy::{Acl, AllowedUsers, Bindings, ServicePolicy, is_binding};
use postern_common::protocol::{Code, Refusal};
use postern_common::tls::Revocations;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, Service};

/// How often the revocation list file is checked for changes.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);

/// The access rules of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccess {
    /// Who may connect.
    pub clients: Acl,
    /// Which MySQL users each client may log in as.
    pub allowed_users: AllowedUsers,
    /// The service broker's live bindings of the service.
    pub bindings: Bindings,
}

impl ServiceAccess {
    /// Whether `client` may use the service: a broker binding by the bindings, anyone else by
    /// `clients`.
    pub fn allows(&self, client: &Identity) -> bool {
        match client {
            Identity::Client(name) if is_binding(name) => self.bindings.allows(name),
            other => self.clients.allows(other),
        }
    }
}

/// One live binding, as [`Access::set_bindings`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingGrant {
    /// The service it was bound to.
    pub service: String,
    /// The MySQL user it is limited to, when it has one of its own.
    pub user: Option<String>,
}

/// The relay's access rules and revocation lists. One per relay.
pub struct Access {
    services: RwLock<BTreeMap<String, Arc<ServiceAccess>>>,
    /// The lists the TLS verifiers in force check against (a reload may bring new ones).
    revocations: RwLock<Arc<Revocations>>,
    /// The revocation lists as read (PEM), for agents; `None` without `tls.crl`.
    crl: RwLock<Crl>,
    changes: watch::Sender<u64>,
    /// One token per live binding identity: cancelled when the binding goes away, which cuts
    /// its open connections.
    binding_cuts: Mutex<HashMap<String, CancellationToken>>,
}

/// Why the revocation list file cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CrlError {
    /// It cannot be read.
    #[error("cannot read it: {0}")]
    Read(#[source] Arc<std::io::Error>),
    /// Reading it on a blocking thread failed.
    #[error("reading it failed: {0}")]
    Blocking(#[source] Arc<tokio::task::JoinError>),
    /// It holds no revocation list.
    #[error("no revocation list (X509 CRL) in the file")]
    Empty,
}

#[derive(Debug, Default)]
struct Crl {
    path: Option<PathBuf>,
    pem: Option<Arc<str>>,
    modified: Option<SystemTime>,
    /// Why the file cannot be used, when it cannot: agents then refuse end-to-end clients.
    broken: Option<CrlError>,
}

impl Access {
    /// The rules of `config`, with its revocation lists as loaded.
    pub fn new(config: &Config) -> Self {
        let services = config
            .services
            .values()
            .map(|s| {
                let access = ServiceAccess {
                    clients: s.clients.clone(),
                    allowed_users: s.allowed_users.clone(),
                    bindings: Bindings::default(),
                };
                (s.name.clone(), Arc::new(access))
            })
            .collect();
        let path = config.tls.revocations.path().map(PathBuf::from);
        // The file was read moments ago by the config loader; read it again for its text.
        let (pem, modified, broken) = match &path {
            None => (None, None, None),
            Some(p) => match read_crl(p) {
                Ok((pem, modified)) => (Some(pem), modified, None),
                Err(e) => (None, None, Some(e)),
            },
        };
        Self {
            services: RwLock::new(services),
            revocations: RwLock::new(config.tls.revocations.clone()),
            crl: RwLock::new(Crl {
                path,
                pem,
                modified,
                broken,
            }),
            changes: watch::Sender::new(0),
            binding_cuts: Mutex::default(),
        }
    }

    /// The current rules of `service`.
    pub fn service(&self, service: &str) -> Option<Arc<ServiceAccess>> {
        self.read().get(service).cloned()
    }

    /// Whether `client` may use `service`.
    pub fn authorise(&self, service: &str, client: &Identity) -> Result<(), Refusal> {
        match self.service(service) {
            Some(a) if a.allows(client) => Ok(()),
            Some(_) => Err(Refusal::new(
                Code::NotAuthorized,
                format!("{client} is not allowed to use service {service:?}"),
            )),
            None => Err(Refusal::new(
                Code::UnknownService,
                format!("unknown service {service:?}"),
            )),
        }
    }

    /// The MySQL front end's view of `svc`'s rules, borrowing `access` (a snapshot from
    /// [`service`](Self::service), held for the connection).
    pub fn rules<'a>(
        svc: &'a Service,
        access: &'a ServiceAccess,
        handshake_timeout: Duration,
    ) -> Rules<'a> {
        Rules {
            service: &svc.name,
            clients: &access.clients,
            allowed_users: &access.allowed_users,
            bindings: &access.bindings,
            client_attribute: svc.client_attribute,
            handshake_timeout,
        }
    }

    /// Makes the rules those of a reloaded `config`: services added and removed, each one's
    /// `clients` and `allowed_users` as the file now says, the broker's bindings kept; the
    /// revocation lists of the new TLS material (its verifiers check those), read from its
    /// file. Agents that end TLS get the new rules.
    pub fn reconfigure(&self, config: &Config) {
        {
            let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
            let next: BTreeMap<String, Arc<ServiceAccess>> = config
                .services
                .values()
                .map(|s| {
                    let bindings = services
                        .get(&s.name)
                        .map(|a| a.bindings.clone())
                        .unwrap_or_default();
                    let access = ServiceAccess {
                        clients: s.clients.clone(),
                        allowed_users: s.allowed_users.clone(),
                        bindings,
                    };
                    (s.name.clone(), Arc::new(access))
                })
                .collect();
            *services = next;
        }
        *self.revocations.write().unwrap_or_else(|p| p.into_inner()) =
            config.tls.revocations.clone();
        let path = config.tls.revocations.path().map(PathBuf::from);
        let (pem, modified, broken) = match &path {
            None => (None, None, None),
            Some(p) => match read_crl(p) {
                Ok((pem, modified)) => (Some(pem), modified, None),
                Err(e) => (None, None, Some(e)),
            },
        };
        *self.crl.write().unwrap_or_else(|p| p.into_inner()) = Crl {
            path,
            pem,
            modified,
            broken,
        };
        self.changes.send_modify(|g| *g += 1);
    }

    /// Changes the rules of `service` (the broker grants and withdraws client identities this
    /// way); agents get the new rules at once. `false` if there is no such service.
    pub fn update(&self, service: &str, change: impl FnOnce(&mut ServiceAccess)) -> bool {
        let changed = {
            let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
            let Some(current) = services.get_mut(service) else {
                return false;
            };
            let mut next = ServiceAccess::clone(current);
            change(&mut next);
            let changed = next != **current;
            *current = Arc::new(next);
            changed
        };
        if changed {
            self.changes.send_modify(|g| *g += 1);
        }
        true
    }

    /// Makes `live` (binding identity name → grant) the service broker's bindings: new ones are
    /// admitted at once, and the connections of those no longer listed are cut. Agents that end
    /// TLS themselves get the new rules. Bindings naming an unknown service are ignored.
    pub fn set_bindings(&self, live: &BTreeMap<String, BindingGrant>) {
        let mut per_service: BTreeMap<&str, Bindings> = BTreeMap::new();
        for (name, grant) in live {
            per_service
                .entry(grant.service.as_str())
                .or_default()
                .0
                .insert(name.clone(), grant.user.clone());
        }
        let names: Vec<String> = self.read().keys().cloned().collect();
        for service in names {
            let next = per_service.remove(service.as_str()).unwrap_or_default();
            self.update(&service, |s| s.bindings = next);
        }
        let mut cuts = self.binding_cuts.lock().unwrap_or_else(|p| p.into_inner());
        cuts.retain(|name, cut| {
            let keep = live.contains_key(name);
            if !keep {
                info!(client = %name, "binding withdrawn: its connections are closed");
                cut.cancel();
            }
            keep
        });
        for name in live.keys() {
            cuts.entry(name.clone()).or_default();
        }
    }

    /// The token that is cancelled when the binding `client` goes away; `None` for clients that
    /// are not bindings. A binding that is already gone gets a cancelled token.
    pub fn binding_cut(&self, client: &Identity) -> Option<CancellationToken> {
        let name = match client {
            Identity::Client(n) if is_binding(n) => n,
            _ => return None,
        };
        let cuts = self.binding_cuts.lock().unwrap_or_else(|p| p.into_inner());
        Some(cuts.get(name).cloned().unwrap_or_else(|| {
            let gone = CancellationToken::new();
            gone.cancel();
            gone
        }))
    }

    /// A generation that grows whenever the rules or the revocation lists change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// What an agent that ends TLS for `services` must apply: their rules and this relay's
    /// revocation lists. `Err` says why the lists cannot be sent (the agent then gets no
    /// services, and refuses end-to-end clients rather than admit a revoked certificate).
    pub fn agent_policy(
        &self,
        services: &[&Service],
        handshake_timeout: Duration,
        first_packet_timeout: Duration,
    ) -> Result<(Vec<ServicePolicy>, Option<Arc<str>>), CrlError> {
        let crl = self.crl.read().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &crl.broken {
            return Err(why.clone());
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let policies = services
            .iter()
            .filter_map(|svc| {
                let access = self.service(&svc.name)?;
                Some(ServicePolicy {
                    name: svc.name.clone(),
                    clients: access.clients.clone(),
                    allowed_users: access.allowed_users.clone(),
                    client_attribute: svc.client_attribute,
                    handshake_timeout_ms: ms(handshake_timeout),
                    first_packet_timeout_ms: ms(first_packet_timeout),
                    max_handshakes: svc.max_handshakes,
                    bindings: access.bindings.clone(),
                })
            })
            .collect();
        Ok((policies, crl.pem.clone()))
    }

    /// Re-reads the revocation list file every [`REVOCATION_POLL`] until `stop`, on a blocking
    /// thread; a changed list applies to the next handshake and goes to the agents.
    pub async fn watch_revocations(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REVOCATION_POLL) => {}
            }
            // A reload may have set, changed or removed the file.
            let (path, known) = {
                let crl = self.crl.read().unwrap_or_else(|p| p.into_inner());
                (crl.path.clone(), crl.modified)
            };
            let Some(path) = path else { continue };
            let p = path.clone();
            let read = tokio::task::spawn_blocking(move || {
                let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
                if modified.is_some() && modified == known {
                    return Ok(None);
                }
                read_crl(&p).map(Some)
            })
            .await
            .unwrap_or_else(|e| Err(CrlError::Blocking(Arc::new(e))));
            match read {
                Ok(None) => {}
                Ok(Some((pem, modified))) => self.apply_crl(&path, pem, modified),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "revocation list not reloaded; keeping the previous one");
                }
            }
        }
    }

    fn apply_crl(&self, path: &std::path::Path, pem: Arc<str>, modified: Option<SystemTime>) {
        let revocations = self
            .revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Err(e) = revocations.replace_pem(pem.as_bytes()) {
            warn!(error = %e, "revocation list not reloaded; keeping the previous one");
            return;
        }
        {
            let mut crl = self.crl.write().unwrap_or_else(|p| p.into_inner());
            if crl.path.as_deref() != Some(path) {
                // A reload changed the file meanwhile: its own reading stands.
                return;
            }
            crl.pem = Some(pem);
            crl.modified = modified;
            crl.broken = None;
        }
        info!("revocation list reloaded");
        self.changes.send_modify(|g| *g += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<ServiceAccess>>> {
        self.services.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads a revocation list file: its text and when it was written.
fn read_crl(path: &std::path::Path) -> Result<(Arc<str>, Option<SystemTime>), CrlError> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let pem = std::fs::read_to_string(path).map_err(|e| CrlError::Read(Arc::new(e)))?;
    if !pem.contains("-----BEGIN X509 CRL-----") {
        return Err(CrlError::Empty);
    }
    Ok((pem.into(), modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(clients: Acl) -> Access {
        let services = [(
            "orders".to_owned(),
            Arc::new(ServiceAccess {
                clients,
                allowed_users: AllowedUsers::Any,
                bindings: Bindings::default(),
            }),
        )];
        Access {
            services: RwLock::new(services.into_iter().collect()),
            revocations: RwLock::default(),
            crl: RwLock::default(),
            changes: watch::Sender::new(0),
            binding_cuts: Mutex::default(),
        }
    }

    #[test]
    fn a_granted_identity_is_let_in_and_agents_are_told() {
        let a = access(Acl::Only(["alice".to_owned()].into()));
        let mut changes = a.changes();
        let bob = Identity::Client("bob".into());
        let r = a.authorise("orders", &bob).unwrap_err();
        assert_eq!(r.code, Code::NotAuthorized);
        assert!(
            r.message.contains("not allowed to use service \"orders\""),
            "{r}"
        );
        assert!(
            a.update("orders", |s| if let Acl::Only(names) = &mut s.clients {
                names.insert("bob".into());
            })
        );
        assert!(changes.has_changed().unwrap(), "agents see the change");
        changes.mark_unchanged();
        a.authorise("orders", &bob).unwrap();
        // The same rules again change nothing.
        a.update("orders", |_| {});
        assert!(!changes.has_changed().unwrap());
        assert!(!a.update("billing", |_| {}));
        assert_eq!(
            a.authorise("billing", &bob).unwrap_err().code,
            Code::UnknownService
        );
    }

    #[test]
    fn a_binding_reaches_only_its_service_and_is_cut_when_withdrawn() {
        let a = access(Acl::Any);
        let b = Identity::Client("binding-1".into());
        assert_eq!(
            a.authorise("orders", &b).unwrap_err().code,
            Code::NotAuthorized,
            "`*` does not admit a binding"
        );
        let changes = a.changes();
        let grant = |service: &str| BindingGrant {
            service: service.into(),
            user: Some("pb_1".into()),
        };
        a.set_bindings(&[("binding-1".to_owned(), grant("orders"))].into());
        assert!(changes.has_changed().unwrap(), "agents see the grant");
        a.authorise("orders", &b).unwrap();
        let cut = a.binding_cut(&b).unwrap();
        assert!(!cut.is_cancelled());
        assert!(a.binding_cut(&Identity::Client("alice".into())).is_none());
        // Bound to another service: refused here.
        a.set_bindings(&[("binding-1".to_owned(), grant("billing"))].into());
        assert!(a.authorise("orders", &b).is_err());
        a.set_bindings(&BTreeMap::new());
        assert!(cut.is_cancelled(), "withdrawing cuts the open connections");
        assert!(a.binding_cut(&b).unwrap().is_cancelled());
    }
}
