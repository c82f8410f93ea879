//! Services whose TLS ends at this agent (`tls_termination: agent`): the relay's rules for
//! them, one set per relay session ([`EndToEnd`]), and the MySQL front end's state, one per
//! process ([`FrontEnd`]: greeting templates, connection ids, handshake gates, events).
//!
//! The relay sends [`Control::Policy`] after its welcome and again when its revocation lists
//! change; each message replaces the previous one whole. Until one arrives (an older relay
//! never sends one) end-to-end streams are refused, so a client is never admitted on rules
//! this agent has not been given.
//!
//! [`Control::Policy`]: postern_common::protocol::Control::Policy

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use postern_common::events::Events;
use postern_common::mysql::server::{ConnIds, Gate, Greetings};
use postern_common::pki::Identity;
use postern_common::policy::{ServicePolicy, is_binding};
use postern_common::protocol::{Code, Refusal};
use postern_common::tls::{self, Revocations};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;

/// How long an end-to-end stream waits for the relay's first policy.
const FIRST_POLICY_WAIT: Duration = Duration::from_secs(1);

/// What the agent's MySQL front end keeps across relay sessions, one per process: a `KILL`
/// or a flood of silent sockets may come through any relay instance.
pub(crate) struct FrontEnd {
    /// Where refusals and opened and closed tunnels go.
    pub(crate) events: Events,
    /// The greeting templates, by service.
    pub(crate) greetings: Greetings,
    /// The connection ids handed out in this agent's own greetings.
    pub(crate) ids: ConnIds,
    /// Connections in their handshake, by service ([`FrontEnd::gate`]).
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl FrontEnd {
    /// A front end for the services of `config`.
    pub(crate) fn new(config: &Config, events: Events) -> Self {
        Self {
            events,
            greetings: Greetings::new(),
            ids: ConnIds::new(),
            gates: Mutex::new(
                config
                    .services
                    .keys()
                    .map(|name| (name.clone(), Arc::new(Gate::new())))
                    .collect(),
            ),
        }
    }

    /// The handshake gate of `service` (a service added by a reload gets one here).
    pub(crate) fn gate(&self, service: &str) -> Arc<Gate> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets what was learnt of `service` (its greeting template, its gate): it was removed,
    /// or its backends changed, by a reload.
    pub(crate) fn forget(&self, service: &str) {
        self.greetings.forget(service);
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service);
    }
}

/// The policy of one relay session, and the TLS acceptors that follow its revocation lists.
pub(crate) struct EndToEnd {
    services: RwLock<Option<HashMap<String, Arc<ServicePolicy>>>>,
    /// Set once the first policy is in.
    arrived: watch::Sender<bool>,
    revocations: Arc<Revocations>,
    acceptors: HashMap<String, TlsAcceptor>,
    /// One token per live binding of the service broker: cancelled when a policy no longer
    /// lists the binding, which cuts its open connections (as the relay cuts those whose TLS
    /// ends there).
    binding_cuts: Mutex<HashMap<String, CancellationToken>>,
}

impl EndToEnd {
    /// No policy yet; an acceptor for every service with a certificate (`services.NAME.tls`).
    pub(crate) fn new(config: &Config) -> Self {
        let revocations = Arc::new(Revocations::default());
        let mut acceptors = HashMap::new();
        for svc in config.services.values() {
            let Some(material) = &svc.tls else { continue };
            let mut material = material.clone();
            material.revocations = revocations.clone();
            match tls::mysql_listener_server(&material) {
                Ok(c) => {
                    acceptors.insert(svc.name.clone(), TlsAcceptor::from(Arc::new(c)));
                }
                Err(e) => error!(service = %svc.name, error = %e, "service certificate unusable"),
            }
        }
        Self {
            services: RwLock::new(None),
            arrived: watch::Sender::new(false),
            revocations,
            acceptors,
            binding_cuts: Mutex::default(),
        }
    }

    /// Takes a policy from the relay. Revocation lists that do not parse leave no service
    /// usable (refusing is safer than admitting a revoked certificate).
    pub(crate) fn apply(&self, services: Vec<ServicePolicy>, crl_pem: Option<String>) {
        let mut current = self.services.write().unwrap_or_else(|p| p.into_inner());
        let mut services: HashMap<String, Arc<ServicePolicy>> = services
            .into_iter()
            .map(|s| (s.name.clone(), Arc::new(s)))
            .collect();
        if let Err(e) = self
            .revocations
            .replace_pem(crl_pem.as_deref().unwrap_or_default().as_bytes())
        {
            error!(error = %e, "revocation list from the relay unusable: end-to-end clients refused");
            services.clear();
        }
        info!(services = ?services.keys().collect::<Vec<_>>(), revocations = crl_pem.is_some(), "policy received from the relay");
        {
            let live: std::collections::HashSet<&String> = services
                .values()
                .flat_map(|s| s.bindings.0.keys())
                .collect();
            let mut cuts = self.binding_cuts.lock().unwrap_or_else(|p| p.into_inner());
            cuts.retain(|name, cut| {
                let keep = live.contains(name);
                if !keep {
                    info!(client = %name, "binding withdrawn: its connections are closed");
                    cut.cancel();
                }
                keep
            });
            for name in live {
                cuts.entry(name.clone()).or_default();
            }
        }
        *current = Some(services);
        drop(current);
        self.arrived.send_replace(true);
    }

    /// The token cancelled when the binding `client` goes away (already cancelled if it is not
    /// live); `None` for clients that are not the broker's bindings.
    pub(crate) fn binding_cut(&self, client: &Identity) -> Option<CancellationToken> {
        let Identity::Client(name) = client else {
            return None;
        };
        if !is_binding(name) {
            return None;
        }
        let cuts = self.binding_cuts.lock().unwrap_or_else(|p| p.into_inner());
        Some(cuts.get(name).cloned().unwrap_or_else(|| {
            let gone = CancellationToken::new();
            gone.cancel();
            gone
        }))
    }

    /// The rules and the acceptor for an end-to-end stream of `service`, or why there are none.
    ///
    /// The relay sends its policy right after the welcome, on the control stream; a data stream
    /// may still overtake it, so a stream that finds none waits for it briefly.
    pub(crate) async fn for_service(
        &self,
        agent: &str,
        service: &str,
    ) -> Result<(Arc<ServicePolicy>, TlsAcceptor), Refusal> {
        let refused = |message: String| Refusal::new(Code::NotAuthorized, message);
        let Some(acceptor) = self.acceptors.get(service) else {
            return Err(refused(format!(
                "service {service:?} ends TLS at the agent, and agent {agent} has no certificate \
                 for it (services.{service}.tls in agent.yaml)"
            )));
        };
        let mut arrived = self.arrived.subscribe();
        let _ = tokio::time::timeout(FIRST_POLICY_WAIT, arrived.wait_for(|a| *a)).await;
        let guard = self.services.read().unwrap_or_else(|p| p.into_inner());
        let Some(services) = guard.as_ref() else {
            return Err(refused(format!(
                "service {service:?} is unavailable end to end: agent {agent} has no policy \
                 received from the relay"
            )));
        };
        match services.get(service) {
            Some(p) => Ok((p.clone(), acceptor.clone())),
            None => Err(refused(format!(
                "service {service:?} is unavailable end to end: the relay's policy for agent \
                 {agent} does not include it (see the relay's log)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::pki::{Ca, Kind, LeafSpec};
    use postern_common::policy::Acl;

    /// A session policy with an acceptor for `orders` and none for `plain`.
    fn session() -> EndToEnd {
        let (ca, _key) = Ca::generate("test", 1).unwrap();
        let mut spec = LeafSpec::new(Kind::Server, "orders", 1);
        spec.dns = vec!["localhost".into()];
        let issued = ca.issue(&spec).unwrap();
        let material =
            tls::Material::from_pem(&ca.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap();
        let config = tls::mysql_listener_server(&material).unwrap();
        EndToEnd {
            services: RwLock::new(None),
            arrived: watch::Sender::new(false),
            binding_cuts: Mutex::default(),
            revocations: Arc::new(Revocations::default()),
            acceptors: [("orders".to_owned(), TlsAcceptor::from(Arc::new(config)))].into(),
        }
    }

    fn rules(name: &str) -> ServicePolicy {
        ServicePolicy {
            name: name.into(),
            clients: Acl::Any,
            allowed_users: Default::default(),
            client_attribute: false,
            handshake_timeout_ms: 1000,
            first_packet_timeout_ms: 500,
            max_handshakes: 1,
            bindings: Default::default(),
        }
    }

    fn refusal(r: Result<(Arc<ServicePolicy>, TlsAcceptor), Refusal>) -> String {
        match r {
            Ok(_) => panic!("refused"),
            Err(e) => e.message,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn streams_wait_briefly_for_the_first_policy_then_say_why() {
        let p = session();
        let why = refusal(p.for_service("db1", "orders").await);
        assert!(why.contains("no policy received from the relay"), "{why}");
        let why = refusal(p.for_service("db1", "plain").await);
        assert!(
            why.contains("has no certificate for it (services.plain.tls in agent.yaml)"),
            "{why}"
        );
        p.apply(vec![rules("orders")], None);
        assert!(p.for_service("db1", "orders").await.is_ok());
        p.apply(vec![], None);
        let why = refusal(p.for_service("db1", "orders").await);
        assert!(why.contains("does not include it"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unusable_revocation_list_refuses_every_service() {
        let p = session();
        p.apply(
            vec![rules("orders")],
            Some("-----BEGIN X509 CRL-----\nnot base64!\n-----END X509 CRL-----\n".into()),
        );
        let why = refusal(p.for_service("db1", "orders").await);
        assert!(why.contains("does not include it"), "{why}");
    }
}
