//! Reload: a new `relay.yaml`, and the certificates it names, put in force while the relay runs
//! (SIGHUP, `systemctl reload`), without dropping the connections it does not concern.
//!
//! Everything that can fail is done first, and a failure changes nothing: the new certificate
//! must be in date and make a TLS config, and every new service listener must bind. Then, in
//! one step for each part:
//! * the config is swapped: connections already open keep the one they started with, new ones
//!   take the new one (timeouts, limits, the API's credentials);
//! * services removed lose their listeners, and their open connections are cut (the client
//!   sees the connection close); services added get theirs; a listener whose address changed
//!   is bound anew before the old one closes;
//! * access rules and revocation lists follow the file (the service broker's bindings stay);
//!   agents that end TLS get them at once;
//! * agents whose accepted services change (one they offered is now allowed, or one they serve
//!   is gone) are asked to drain: they open a new session, welcomed with the new set, while the
//!   old one finishes its streams; agents no longer listed are disconnected;
//! * new handshakes, on every listener and over QUIC, use the new certificate.
//!
//! Some settings are read once at start and need a restart: the QUIC, HTTP and health
//! listeners, `instance`, the broker, and what the platform says. A reload that changes them
//! keeps the running values and says so. A new `heartbeat_interval` applies to sessions that
//! start after it.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};

use postern_common::protocol::Control;
use postern_common::tls::TlsError;
use postern_common::transport::quic::EndpointError;
use tracing::{info, warn};

use crate::config::Config;
use crate::listen::{self, BindError};
use crate::state::{Acceptors, Shared, resize};

/// Reloads a running relay's configuration ([`Relay::reloader`](crate::Relay::reloader)).
#[derive(Clone)]
pub struct Reloader {
    pub(crate) shared: Arc<Shared>,
}

/// Why a reload was refused; the relay goes on with the configuration it has.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The relay is shutting down.
    #[error("the relay is shutting down")]
    Stopping,
    /// The new certificate cannot be used today.
    #[error("the relay certificate {0}")]
    Certificate(String),
    /// The new certificates do not make a TLS config.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint refused the new certificates.
    #[error(transparent)]
    Quic(#[from] EndpointError),
    /// A new listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Services defined now that were not before.
    pub added: Vec<String>,
    /// Services no longer defined (their connections were cut).
    pub removed: Vec<String>,
    /// Services whose settings changed (new connections use the new ones).
    pub changed: Vec<String>,
    /// Listeners opened, as `service/kind@address`.
    pub opened: Vec<String>,
    /// Listeners closed, as `service/kind@address`.
    pub closed: Vec<String>,
    /// Connections cut because their service was removed.
    pub cut: u64,
    /// Agents disconnected: they are no longer listed.
    pub agents_dropped: Vec<String>,
    /// Agents asked for a new session: the services they may offer changed.
    pub agents_renewed: Vec<String>,
    /// The certificate, key or CA changed: new handshakes use the new ones.
    pub certificates: bool,
    /// Settings that changed in the file and need a restart (the running values stay).
    pub need_restart: Vec<&'static str>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let mut list = |what: &str, names: &[String]| {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        };
        list("services added", &self.added);
        list("services removed", &self.removed);
        list("services changed", &self.changed);
        list("listeners opened", &self.opened);
        list("listeners closed", &self.closed);
        list("agents disconnected", &self.agents_dropped);
        list("agents asked for a new session", &self.agents_renewed);
        if self.cut > 0 {
            parts.push(format!("connections cut: {}", self.cut));
        }
        if self.certificates {
            parts.push("certificates renewed".into());
        }
        if parts.is_empty() {
            parts.push("nothing changed".into());
        }
        f.write_str(&parts.join("; "))
    }
}

impl Reloader {
    /// Puts `config` in force (see the module docs); refused as a whole, changing nothing, when
    /// a part of it cannot be applied.
    pub async fn reload(&self, config: Config) -> Result<Reloaded, ReloadError> {
        let outcome = self.apply(config).await;
        log(&outcome);
        if matches!(&outcome, Ok(done) if done.certificates) {
            // The new certificates are warned about now, not at the next daily check.
            postern_common::tls::expiry::warn_ahead(
                &self.shared.certificates(),
                std::time::SystemTime::now(),
            );
        }
        outcome
    }

    async fn apply(&self, mut config: Config) -> Result<Reloaded, ReloadError> {
        let shared = &self.shared;
        let _one = shared.reloading.lock().await;
        if shared.stop.is_cancelled() {
            return Err(ReloadError::Stopping);
        }
        let old = shared.config();
        let mut done = Reloaded {
            need_restart: keep_restart_only(&old, &mut config),
            certificates: !old.tls.same_as(&config.tls),
            ..Reloaded::default()
        };
        // What can fail, first.
        if done.certificates
            && let Some(why) = config
                .tls
                .chain
                .first()
                .and_then(postern_common::pki::unusable_now)
        {
            return Err(ReloadError::Certificate(why));
        }
        // Made anew even for the same certificate: their verifiers check the revocation list
        // of the new material (`tls.crl` may have been added, moved or removed).
        let acceptors = Acceptors::new(&config.tls)?;
        let wanted = listen::wanted(&config);
        let (fresh, stale) = {
            let running = shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let same = |r: &listen::Running, w: &listen::Wanted| {
                r.service == w.service && r.kind == w.kind && r.configured == w.addr
            };
            let stale: Vec<usize> = (0..running.len())
                .filter(|&i| !wanted.iter().any(|w| same(&running[i], w)))
                .collect();
            let fresh: Vec<listen::Wanted> = wanted
                .into_iter()
                .filter(|w| !running.iter().any(|r| same(r, w)))
                .collect();
            (fresh, stale)
        };
        let bound = listen::bind(fresh).await?;
        if let Some(quic) = &shared.quic {
            quic.renew(&config.tls)?;
        }

        // Nothing can fail from here on.
        let names = |c: &Config| c.services.keys().cloned().collect::<BTreeSet<String>>();
        let (before, after) = (names(&old), names(&config));
        done.added = after.difference(&before).cloned().collect();
        done.removed = before.difference(&after).cloned().collect();
        done.changed = after
            .intersection(&before)
            .filter(|n| {
                format!("{:?}", old.services.get(*n)) != format!("{:?}", config.services.get(*n))
            })
            .cloned()
            .collect();
        let drain = Control::Drain {
            reason: format!("relay {} configuration changed", old.instance),
            grace_ms: u64::try_from(crate::SHUTDOWN_GRACE.as_millis()).unwrap_or(u64::MAX),
        };
        shared.replace_config(config);
        let config = shared.config();
        shared.resize(&old, &config);
        shared.set_acceptors(acceptors);
        {
            let mut running = shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for i in stale.into_iter().rev() {
                let r = running.remove(i);
                r.stop.cancel();
                let addr = r.bound.map(|a| a.to_string()).unwrap_or_default();
                info!(service = %r.service, kind = r.kind.as_str(), addr = %addr, "service listener closed");
                done.closed.push(describe(&r.service, r.kind, r.bound));
            }
            let wanted = listen::wanted(&config);
            for r in running.iter_mut() {
                let size = wanted
                    .iter()
                    .find(|w| w.service == r.service && w.kind == r.kind)
                    .map_or(r.size, |w| w.size);
                resize(&r.limit, r.size, size);
                r.size = size;
            }
        }
        for l in bound {
            done.opened
                .push(describe(&l.service, l.kind, l.socket.local_addr().ok()));
            listen::start(shared, l);
        }
        let kept: BTreeSet<&String> = config.services.keys().collect();
        done.cut = shared.cluster.retain_services(&kept);
        for name in &done.removed {
            shared.greetings.forget(name);
        }
        shared.access.reconfigure(&config);
        let (dropped, renewed) = shared
            .registry
            .realign(&config.agents, &config.services, &drain);
        done.agents_dropped = dropped;
        done.agents_renewed = renewed;
        Ok(done)
    }
}

/// `service/kind@address`, for the summary.
fn describe(
    service: &str,
    kind: listen::ListenerKind,
    addr: Option<std::net::SocketAddr>,
) -> String {
    let addr = addr.map(|a| a.to_string()).unwrap_or_default();
    format!("{service}/{}@{addr}", kind.as_str())
}

/// Keeps in `new` the running values of the settings only a restart changes; returns the names
/// of those the file changed.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.quic_listen != new.quic_listen {
        changed.push("listen.quic");
        new.quic_listen = old.quic_listen;
    }
    if old.http_listen != new.http_listen {
        changed.push("listen.http");
        new.http_listen = old.http_listen;
    }
    if old.health_listen != new.health_listen {
        changed.push("health_listen");
        new.health_listen = old.health_listen;
    }
    if old.instance != new.instance {
        changed.push("instance");
        new.instance = old.instance.clone();
    }
    if old.audit_log != new.audit_log {
        // The file is opened at start (the events sink appends to one file for its life).
        changed.push("audit_log");
        new.audit_log = old.audit_log.clone();
    }
    if old.platform != new.platform {
        changed.push("the platform's environment");
        new.platform = old.platform.clone();
    }
    let same_broker = match (&old.broker, &new.broker) {
        (None, None) => true,
        (Some(a), Some(b)) => same_broker(a, b),
        _ => false,
    };
    if !same_broker {
        changed.push("broker");
    }
    // The broker's settings include the ports it filled in at start: keep them whole.
    new.broker = old.broker.clone();
    changed
}

/// Whether two broker settings are the same, a plan's port 0 (filled in at start from the
/// bound listener) matching any port.
fn same_broker(a: &crate::config::broker::Broker, b: &crate::config::broker::Broker) -> bool {
    let plans = a.plans.len() == b.plans.len()
        && a.plans.iter().zip(&b.plans).all(|((na, pa), (nb, pb))| {
            let mut pb = pb.clone();
            if pb.port == 0 {
                pb.port = pa.port;
            }
            na == nb && *pa == pb
        });
    plans
        && a.username == b.username
        && a.password == b.password
        && a.signing_cert_pem == b.signing_cert_pem
        && a.signing_key_pem == b.signing_key_pem
        && a.ca_pem == b.ca_pem
        && a.store == b.store
        && a.host == b.host
        && a.relays == b.relays
        && a.server_name == b.server_name
        && a.certificate_days == b.certificate_days
        && a.offering == b.offering
}

/// Logs the outcome of a reload.
fn log(outcome: &Result<Reloaded, ReloadError>) {
    match outcome {
        Ok(done) => {
            info!("configuration reloaded: {done}");
            if !done.need_restart.is_empty() {
                warn!(
                    settings = %done.need_restart.join(", "),
                    "these settings changed in the file but apply only after a restart; the running values stay"
                );
            }
        }
        Err(e) => warn!(error = %e, "reload refused: the running configuration stays"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_new_audit_log_needs_a_restart_and_the_running_one_stays() {
        let (dir, head) = crate::config::tests::files();
        let path = dir.path().join("relay.yaml");
        let env = BTreeMap::<&str, &str>::new();
        let parse = |extra: &str| {
            Config::parse(
                &path,
                &format!("{extra}{head}  orders:\n    clients: [alice]\n"),
                &env,
            )
            .unwrap()
        };
        let old = parse("audit_log: a.jsonl\n");
        let mut new = parse("audit_log: b.jsonl\n");
        assert_eq!(keep_restart_only(&old, &mut new), vec!["audit_log"]);
        assert_eq!(new.audit_log, Some(dir.path().join("a.jsonl")));
        let mut same = parse("audit_log: a.jsonl\n");
        assert!(keep_restart_only(&old, &mut same).is_empty());
    }
}
