//! The relay's rules for services whose TLS ends at this agent (`tls_termination: agent`), one
//! set per relay session.
//!
//! The relay sends [`Control::Policy`] after its welcome and again when its revocation lists
//! change; each message replaces the previous one whole. Until one arrives (an older relay
//! never sends one) end-to-end streams are refused, so a client is never admitted on rules
//! this agent has not been given.
//!
//! [`Control::Policy`]: postern_common::protocol::Control::Policy

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use postern_common::policy::ServicePolicy;
use postern_common::tls::{self, Revocations};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

use crate::config::Config;

/// How long an end-to-end stream waits for the relay's first policy.
const FIRST_POLICY_WAIT: Duration = Duration::from_secs(1);

/// The policy of one relay session, and the TLS acceptors that follow its revocation lists.
pub(crate) struct SessionPolicy {
    services: RwLock<Option<HashMap<String, Arc<ServicePolicy>>>>,
    /// Set once the first policy is in.
    arrived: watch::Sender<bool>,
    revocations: Arc<Revocations>,
    acceptors: HashMap<String, TlsAcceptor>,
}

impl SessionPolicy {
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
        }
    }

    /// Takes a policy from the relay. Revocation lists that do not parse leave no service
    /// usable (refusing is safer than admitting a revoked certificate).
    pub(crate) fn apply(&self, services: Vec<ServicePolicy>, crl_pem: Option<String>) {
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
        *self.services.write().unwrap_or_else(|p| p.into_inner()) = Some(services);
        self.arrived.send_replace(true);
    }

    /// The rules and the acceptor for an end-to-end stream of `service`, or why there are none.
    ///
    /// The relay sends its policy right after the welcome, on the control stream; a data stream
    /// may still overtake it, so a stream that finds none waits for it briefly.
    pub(crate) async fn for_service(
        &self,
        agent: &str,
        service: &str,
    ) -> Result<(Arc<ServicePolicy>, TlsAcceptor), String> {
        let Some(acceptor) = self.acceptors.get(service) else {
            return Err(format!(
                "service {service:?} ends TLS at the agent, and agent {agent} has no certificate \
                 for it (services.{service}.tls in agent.yaml)"
            ));
        };
        let mut arrived = self.arrived.subscribe();
        let _ = tokio::time::timeout(FIRST_POLICY_WAIT, arrived.wait_for(|a| *a)).await;
        let guard = self.services.read().unwrap_or_else(|p| p.into_inner());
        let Some(services) = guard.as_ref() else {
            return Err(format!(
                "service {service:?} is unavailable end to end: agent {agent} has no policy \
                 received from the relay"
            ));
        };
        match services.get(service) {
            Some(p) => Ok((p.clone(), acceptor.clone())),
            None => Err(format!(
                "service {service:?} is unavailable end to end: the relay's policy for agent \
                 {agent} does not include it (see the relay's log)"
            )),
        }
    }
}
