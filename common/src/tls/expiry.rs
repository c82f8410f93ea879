//! Certificate expiry: when each certificate a process presents or trusts runs out, warnings
//! well ahead of it, and how many of the client certificates it verified lately are close to
//! theirs.
//!
//! A certificate that expires is an outage that was announced months before: every peer refuses
//! it at once. So the relay and the agent log a warning for each of their certificates (their
//! own, its intermediates, the CAs they trust, the agent's service certificates) that expires
//! within [`WARN_WITHIN`], at start, at each reload and once a day, and an error for one that
//! has expired; the relay's `/metrics` shows each expiry as a timestamp
//! (`postern_certificate_expiry_timestamp_seconds`). Clients renew their own certificates; the
//! relay counts the distinct client certificates it verified in the last [`SEEN_WITHIN`] that
//! expire within [`WARN_WITHIN`] (`postern_client_certificates_expiring`), so an operator sees
//! the clients that are about to be locked out. Renewed certificates are put in force by a
//! reload (SIGHUP), without dropping sessions.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use tokio::time::Instant;
use tracing::{error, warn};

use super::Material;
use crate::pki;

/// How far ahead of its expiry a certificate is warned about.
pub const WARN_WITHIN: Duration = Duration::from_secs(30 * 86_400);
/// How long a verified client certificate is remembered for [`clients_expiring`].
pub const SEEN_WITHIN: Duration = Duration::from_secs(86_400);
/// How many client certificates are remembered at most (each is a name and two times); past
/// this, new ones are not counted until old ones age out.
const SEEN_MAX: usize = 100_000;

/// One certificate's end of validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// What it is to this process: `ca`, `intermediate`, or the role of its own certificate
    /// (`relay`, `agent`, `service`).
    pub role: &'static str,
    /// Its subject's common name (or whole name).
    pub name: String,
    /// The end of its validity.
    pub not_after: SystemTime,
}

impl Expiry {
    /// Reads a certificate's name and end of validity; `None` if it does not parse (it would not
    /// have been loaded).
    pub fn of(role: &'static str, der: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let secs = cert.validity().not_after.timestamp();
        let not_after = match u64::try_from(secs) {
            Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
            Err(_) => UNIX_EPOCH,
        };
        let name = pki::name_of(cert.subject().as_raw()).unwrap_or_default();
        Some(Self {
            role,
            name,
            not_after,
        })
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> i64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    /// Whole days left at `now` (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(d) => i64::try_from(d.as_secs() / 86_400).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs().div_ceil(86_400)).unwrap_or(i64::MAX),
        }
    }
}

/// The certificates of `m`: our own (as `role`), the intermediates of our chain, and every CA we
/// trust.
pub fn of_material(m: &Material, role: &'static str) -> Vec<Expiry> {
    let own = m
        .chain
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Expiry::of(if i == 0 { role } else { "intermediate" }, c));
    let cas = m.trusted.iter().filter_map(|c| Expiry::of("ca", c));
    own.chain(cas).collect()
}

/// Logs an error for each certificate of `certs` that has expired at `now`, a warning for each
/// that expires within [`WARN_WITHIN`]; returns how many it logged.
pub fn warn_ahead(certs: &[Expiry], now: SystemTime) -> usize {
    let mut logged = 0;
    for c in certs {
        let expires_at = pki::rfc3339_unix(c.unix());
        let days_left = c.days_left(now);
        if c.not_after <= now {
            error!(role = c.role, name = %c.name, %expires_at, "certificate has expired: peers refuse it; renew it and reload");
        } else if c.not_after <= now + WARN_WITHIN {
            warn!(role = c.role, name = %c.name, %expires_at, days_left, "certificate expires soon: renew it and reload (SIGHUP)");
        } else {
            continue;
        }
        logged += 1;
    }
    logged
}

/// How often [`watch`] looks again.
pub const RECHECK: Duration = Duration::from_secs(86_400);

/// Warns about the certificates `certs` lists ([`warn_ahead`]) now and every [`RECHECK`] until
/// `stop`. `certs` is asked each time, so a reload's new certificates are what is checked.
pub async fn watch(certs: impl Fn() -> Vec<Expiry>, stop: tokio_util::sync::CancellationToken) {
    loop {
        warn_ahead(&certs(), SystemTime::now());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

struct Seen {
    not_after: SystemTime,
    last: Instant,
}

static CLIENTS: Mutex<Option<HashMap<String, Seen>>> = Mutex::new(None);

/// Notes a client certificate this process has just verified, if it expires within
/// [`WARN_WITHIN`] (the others are not remembered at all).
pub(crate) fn saw_client(der: &CertificateDer<'_>) {
    let Some(e) = Expiry::of("client", der) else {
        return;
    };
    if e.not_after > SystemTime::now() + WARN_WITHIN {
        return;
    }
    let mut guard = CLIENTS.lock().unwrap_or_else(PoisonError::into_inner);
    let seen = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    if seen.len() >= SEEN_MAX && !seen.contains_key(&e.name) {
        seen.retain(|_, s| now.duration_since(s.last) < SEEN_WITHIN);
        if seen.len() >= SEEN_MAX {
            return;
        }
    }
    seen.insert(
        e.name,
        Seen {
            not_after: e.not_after,
            last: now,
        },
    );
}

/// How many distinct client certificates (by subject) this process verified in the last
/// [`SEEN_WITHIN`] that expire within [`WARN_WITHIN`] of `now`, expired ones included.
pub fn clients_expiring(now: SystemTime) -> usize {
    let mut guard = CLIENTS.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(seen) = guard.as_mut() else {
        return 0;
    };
    let recent = Instant::now();
    seen.retain(|_, s| recent.duration_since(s.last) < SEEN_WITHIN);
    seen.values()
        .filter(|s| s.not_after <= now + WARN_WITHIN)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    use crate::pki::{Ca, Kind, LeafSpec};

    fn material(ca: &Ca, name: &str, days: u32) -> Material {
        let leaf = ca.issue(&LeafSpec::new(Kind::Agent, name, days)).unwrap();
        Material::from_pem(&ca.cert_pem, &leaf.cert_pem, &leaf.key_pem).unwrap()
    }

    #[test]
    fn own_certificate_and_ca_are_listed_with_their_ends() {
        let (ca, _) = Ca::generate("expiry ca", 365).unwrap();
        let m = material(&ca, "db1", 10);
        let e = of_material(&m, "agent");
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!((e[0].role, e[1].role), ("agent", "ca"));
        assert_eq!(e[1].name, "expiry ca");
        let now = SystemTime::now();
        assert!((9..=10).contains(&e[0].days_left(now)), "{e:?}");
        assert!((363..=365).contains(&e[1].days_left(now)), "{e:?}");
        // The agent's certificate is within the window, the CA is not.
        assert_eq!(warn_ahead(&e, now), 1);
        // A year on, both have expired.
        let later = now + Duration::from_secs(400 * 86_400);
        assert_eq!(warn_ahead(&e, later), 2);
        assert!(e[0].days_left(later) < 0);
    }

    #[test]
    fn client_certificates_close_to_expiry_are_counted_once_each() {
        let (ca, _) = Ca::generate("clients ca", 365).unwrap();
        let now = SystemTime::now();
        let before = clients_expiring(now);
        for (name, days) in [("soon-a", 5), ("soon-b", 20), ("later", 200)] {
            let leaf = ca.issue(&LeafSpec::new(Kind::Client, name, days)).unwrap();
            let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
            saw_client(&der);
            saw_client(&der);
        }
        // Other tests of this process may have added their own short-lived certificates.
        let after = clients_expiring(now);
        assert!(after >= before + 2, "{before} -> {after}");
        let seen = CLIENTS.lock().unwrap();
        let seen = seen.as_ref().unwrap();
        assert!(seen.contains_key("soon-a") && seen.contains_key("soon-b"));
        assert!(!seen.contains_key("later"));
    }
}
