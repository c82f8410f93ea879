//! Certificates: a Postern CA, the leaf certificates it signs, and identities read back from them.
//!
//! An identity is a URI subject alternative name: `postern://agent/NAME` for an agent and
//! `postern://client/NAME` for a client (an application or a person). Server certificates (the
//! relay's, or an agent's service certificate) carry DNS and IP names instead, so that clients can
//! verify them with `VERIFY_IDENTITY`. Private keys are ECDSA P-256, written with mode 0600.
//!
//! # Root and intermediate CAs
//!
//! A root made by [`Ca::generate`] allows one level of intermediate CA below it (path length 1),
//! so that a signing key that must be online (the relay's service broker issues a client
//! certificate per binding) can be an intermediate while the root key stays offline:
//! [`Ca::intermediate`] makes one (`postern-relay certs issue intermediate NAME`). Roots made
//! before allow none (path length 0); [`Ca::intermediate`] says so rather than making a CA that
//! no verifier would accept.
//!
//! A CA loaded for signing ([`Ca::from_pem`], [`Ca::load_files`]) knows the certificates above
//! it up to, not including, the root: for an intermediate, itself. [`Ca::issue`] appends them to
//! the leaf's [`Issued::cert_pem`], so that a client presenting that file sends the whole chain;
//! the peer trusts only the root (`ca.pem`) and finds the intermediate in what the client sent.
//! For the broker:
//!
//! ```no_run
//! # fn f(chain_pem: &str, key_pem: &str) -> Result<(), postern_common::pki::PkiError> {
//! use postern_common::pki::{CLIENT_DAYS, Ca, Kind, LeafSpec};
//! let ca = Ca::from_pem(chain_pem, key_pem)?; // the intermediate's certificate and key
//! let issued = ca.issue(&LeafSpec::new(Kind::Client, "binding-1234", CLIENT_DAYS))?;
//! // issued.cert_pem: leaf then intermediate; issued.key_pem; issued.expires_at(): RFC 3339
//! # Ok(()) }
//! ```

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

/// Default lifetime of a CA certificate, in days.
pub const CA_DAYS: u32 = 3650;
/// Default lifetime of an intermediate CA certificate, in days.
pub const INTERMEDIATE_DAYS: u32 = 1825;
/// Default lifetime of agent and server certificates, in days.
pub const SERVER_DAYS: u32 = 365;
/// Default lifetime of client certificates, in days (short: clients are easy to re-issue).
pub const CLIENT_DAYS: u32 = 30;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An agent: dials the relay, identity `postern://agent/NAME`.
    Agent,
    /// A client: reaches services, identity `postern://client/NAME`.
    Client,
    /// A TLS server (relay, or an agent's service listener): DNS and IP names.
    Server,
}

impl Kind {
    /// The word used on the command line and in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// Who a peer is, as read from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// `postern://agent/NAME`
    Agent(String),
    /// `postern://client/NAME`
    Client(String),
}

impl Identity {
    /// The name without its kind.
    pub fn name(&self) -> &str {
        match self {
            Self::Agent(n) | Self::Client(n) => n,
        }
    }

    /// The identity as a URI.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(n) => write!(f, "postern://agent/{n}"),
            Self::Client(n) => write!(f, "postern://client/{n}"),
        }
    }
}

/// Errors from certificate work.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A file exists and overwriting was not asked for.
    #[error("{0} already exists (use --force to overwrite)")]
    Exists(PathBuf),
    /// A certificate or revocation list could not be parsed.
    #[error("cannot parse {what}: {source}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: x509_parser::error::X509Error,
    },
    /// A revocation list is not valid PEM.
    #[error("cannot read revocation list: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// The certificate carries no Postern identity.
    #[error(
        "certificate has no postern identity (a URI SAN postern://agent/NAME or postern://client/NAME)"
    )]
    NoIdentity,
    /// A PEM text holds no certificate.
    #[error("no certificate in the CA's PEM text")]
    NoCertificate,
    /// The certificate loaded to sign with is not a CA certificate.
    #[error("{0:?} is not a CA certificate (it cannot sign certificates)")]
    NotCa(String),
    /// The private key given with a CA certificate is not that certificate's key.
    #[error("the private key does not belong to the CA certificate {0:?}")]
    KeyMismatch(String),
    /// The CA may not sign another CA (its path length constraint says so).
    #[error(
        "CA {0:?} may not sign an intermediate CA (its path length is 0: CAs made before intermediates were supported, and intermediates themselves); make a new root with `postern-relay certs init`"
    )]
    NoIntermediate(String),
    /// A name that cannot be an identity.
    #[error("invalid name {0:?}: use 1-64 characters from a-z, A-Z, 0-9, '.', '_' and '-'")]
    BadName(String),
}

/// A CA loaded for signing: a root, or an intermediate signed by one.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate in PEM (this CA's own certificate only).
    pub cert_pem: String,
    /// The certificates a leaf carries after itself (PEM): this CA's and those above it, the
    /// root excluded. Empty for a root.
    chain_pem: String,
    /// The CA's name (its common name).
    name: String,
    /// End of the CA's validity: no leaf outlives it.
    not_after: OffsetDateTime,
    /// Whether the CA may sign another CA.
    signs_cas: bool,
}

/// A freshly made certificate and its key, both PEM.
pub struct Issued {
    /// Certificate chain in PEM: the leaf, then the intermediate CA that signed it if any (the
    /// root is distributed separately, as `ca.pem`).
    pub cert_pem: String,
    /// Private key in PEM (PKCS#8).
    pub key_pem: String,
    /// The leaf's serial number (big-endian bytes, as a revocation list names it).
    pub serial: Vec<u8>,
    /// End of the leaf's validity (the spec's, or the CA's if that comes first).
    pub not_after: OffsetDateTime,
}

impl Issued {
    /// When the certificate expires, RFC 3339 in UTC (`2025-01-31T12:00:00Z`).
    pub fn expires_at(&self) -> String {
        rfc3339(self.not_after)
    }

    /// The serial number in hex (lowercase, no separators).
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial_hex())
            .field("not_after", &self.expires_at())
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Agent, client or server.
    pub kind: Kind,
    /// The identity name (agent, client) or a label (server; goes into the CN).
    pub name: String,
    /// DNS names (servers).
    pub dns: Vec<String>,
    /// IP addresses (servers).
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A spec valid from an hour ago (clock skew) for `days` days.
    pub fn new(kind: Kind, name: &str, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            kind,
            name: name.to_owned(),
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

impl Ca {
    /// Makes a new self-signed root CA, which may sign one level of intermediate CA.
    pub fn generate(common_name: &str, days: u32) -> Result<(Self, String), PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(days));
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let certified = CertifiedIssuer::self_signed(params, key)?;
        let cert_pem = certified.pem();
        // Re-read the issuer from its PEM so that `Ca` owns it without borrowing `certified`.
        let ca = Self::from_pem(&cert_pem, &key_pem)?;
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate and key PEM. `cert_pem` is the CA's certificate, first,
    /// optionally followed by those above it (an intermediate's file may carry the root too,
    /// which is left out of the chains leaves carry). Fails when the first certificate is not a
    /// CA, or when the key is not its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(PkiError::Pem)?;
        let own = certs.first().ok_or(PkiError::NoCertificate)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(own).map_err(|e| parse_error("certificate", e))?;
        let name = display_name(x509.subject());
        let constraints = x509
            .basic_constraints()
            .map_err(|e| PkiError::Parse {
                what: "certificate constraints",
                source: e,
            })?
            .map(|c| c.value);
        let signs_cas = match constraints {
            Some(c) if c.ca => c.path_len_constraint.is_none_or(|n| n > 0),
            _ => return Err(PkiError::NotCa(name)),
        };
        let key = KeyPair::from_pem(key_pem)?;
        if key.der_bytes() != &*x509.public_key().subject_public_key.data {
            return Err(PkiError::KeyMismatch(name));
        }
        let not_after = OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let issuer = Issuer::from_ca_cert_der(own, key)?;
        let mut chain_pem = String::new();
        for der in &certs {
            let (_, c) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| parse_error("certificate", e))?;
            // The root is what every peer trusts already; a self-signed certificate is one.
            if c.subject().as_raw() != c.issuer().as_raw() {
                chain_pem.push_str(&pem_cert(der));
            }
        }
        Ok(Self {
            issuer,
            cert_pem: pem_cert(own),
            chain_pem,
            name,
            not_after,
            signs_cas,
        })
    }

    /// Loads a CA from a certificate file (the CA first, as for [`from_pem`](Self::from_pem))
    /// and its key file.
    pub fn load_files(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        Self::from_pem(&read_to_string(cert)?, &read_to_string(key)?)
    }

    /// The CA's name (its certificate's common name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this CA is a root (self-signed): its leaves carry no chain.
    pub fn is_root(&self) -> bool {
        self.chain_pem.is_empty()
    }

    /// What leaves this CA signs carry after themselves (PEM): empty for a root, the
    /// intermediate's certificate for an intermediate.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// End of this CA's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Makes an intermediate CA signed by this root, named "ROOT NAME / `name`", valid for
    /// `days` days or until the root expires, whichever comes first. The intermediate may sign
    /// leaves only (path length 0). Returns it and its key (PEM).
    pub fn intermediate(&self, name: &str, days: u32) -> Result<(Self, String), PkiError> {
        check_name(name)?;
        if !self.signs_cas {
            return Err(PkiError::NoIntermediate(self.name.clone()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("{} / {name}", self.name));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = (now + Duration::days(i64::from(days))).min(self.not_after);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = format!("{}{}", cert.pem(), self.chain_pem);
        Ok((Self::from_pem(&chain, &key_pem)?, key_pem))
    }

    /// Loads a CA from `ca.pem` and `ca-key.pem` in `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert = read_to_string(&dir.join("ca.pem"))?;
        let key = read_to_string(&dir.join("ca-key.pem"))?;
        Self::from_pem(&cert, &key)
    }

    /// Signs a new leaf certificate. Its [`Issued::cert_pem`] is the leaf followed by
    /// [`chain_pem`](Self::chain_pem); a leaf never outlives its CA (its end is cut to the
    /// CA's, and [`Issued::not_after`] says which it got).
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        check_name(&spec.name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&spec.name);
        params.not_before = spec.not_before;
        params.not_after = spec.not_after.min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut sans = Vec::new();
        match spec.kind {
            Kind::Agent | Kind::Client => {
                let id = if spec.kind == Kind::Agent {
                    Identity::Agent(spec.name.clone())
                } else {
                    Identity::Client(spec.name.clone())
                };
                sans.push(SanType::URI(id.uri().try_into()?));
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Kind::Server => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
        }
        for name in &spec.dns {
            sans.push(SanType::DnsName(name.clone().try_into()?));
        }
        for ip in &spec.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            serial: serial_of(cert.der())?,
            not_after: params.not_after,
        })
    }
}

impl Ca {
    /// Makes a new revocation list (PEM) holding every entry of `previous` (a CRL this CA signed
    /// before, PEM) plus the certificates with `serials`, with the next CRL number.
    pub fn revoke(&self, previous: Option<&str>, serials: &[Vec<u8>]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked = Vec::new();
        let mut number: u64 = 0;
        if let Some(pem) = previous {
            let der =
                rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
                    .map_err(PkiError::Pem)?;
            let (_, crl) =
                x509_parser::parse_x509_crl(&der).map_err(|e| parse_error("revocation list", e))?;
            number = crl
                .crl_number()
                .map(|n| {
                    n.to_bytes_be().iter().fold(0u64, |acc, b| {
                        acc.saturating_mul(256).saturating_add(u64::from(*b))
                    })
                })
                .unwrap_or(0);
            for rc in crl.iter_revoked_certificates() {
                let when = OffsetDateTime::from_unix_timestamp(rc.revocation_date.timestamp())
                    .unwrap_or(now);
                revoked.push(revoked_entry(rc.raw_serial(), when));
            }
        }
        for serial in serials {
            if !revoked
                .iter()
                .any(|r| r.serial_number.to_bytes() == *serial)
            {
                revoked.push(revoked_entry(serial, now));
            }
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(365),
            crl_number: rcgen::SerialNumber::from((number + 1).to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn revoked_entry(serial: &[u8], when: OffsetDateTime) -> rcgen::RevokedCertParams {
    rcgen::RevokedCertParams {
        serial_number: rcgen::SerialNumber::from_slice(serial),
        revocation_time: when,
        reason_code: None,
        invalidity_date: None,
    }
}

/// The serial number of a DER certificate (to revoke it).
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, PkiError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| parse_error("certificate", e))?;
    Ok(x509.raw_serial().to_vec())
}

/// Reads the Postern identity from a DER certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, PkiError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| parse_error("certificate", e))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse {
            what: "certificate names",
            source: e,
        })?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && let Some(id) = parse_identity(uri)
        {
            return Ok(id);
        }
    }
    Err(PkiError::NoIdentity)
}

/// The name of the CA that issued a DER certificate: its common name, or else the whole
/// distinguished name. `None` if the certificate does not parse.
pub fn issuer_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(display_name(x509.issuer()))
}

/// When a certificate may be used, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: i64,
    /// Not valid after.
    pub not_after: i64,
}

/// The validity period of a DER certificate.
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<Validity, PkiError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| parse_error("certificate", e))?;
    Ok(Validity {
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
    })
}

/// Why certificate `leaf` cannot be used now, in words that follow "the certificate": it
/// "expired at …", "is not valid before …", or "is unreadable: …". A peer would refuse it, so a
/// reload keeps the one in use.
pub fn unusable_now(leaf: &CertificateDer<'_>) -> Option<String> {
    let v = match validity_of(leaf) {
        Ok(v) => v,
        Err(e) => return Some(format!("is unreadable: {e}")),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now > v.not_after {
        return Some(format!("expired at {}", rfc3339_unix(v.not_after)));
    }
    if now < v.not_before {
        return Some(format!(
            "is not valid before {}",
            rfc3339_unix(v.not_before)
        ));
    }
    None
}

/// The name a DER certificate is for: its subject's common name, or else the whole
/// distinguished name. `None` if the certificate does not parse.
pub fn subject_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(display_name(x509.subject()))
}

/// A time in seconds since the Unix epoch as RFC 3339 in UTC ([`rfc3339`]); out of range
/// times as the number.
pub fn rfc3339_unix(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs).map_or_else(|_| secs.to_string(), rfc3339)
}

/// The name of the CA that signed a revocation list (PEM): its common name, or else the whole
/// distinguished name.
pub fn crl_issuer_name(pem: &str) -> Result<String, PkiError> {
    let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
        .map_err(PkiError::Pem)?;
    let (_, crl) =
        x509_parser::parse_x509_crl(&der).map_err(|e| parse_error("revocation list", e))?;
    Ok(display_name(crl.issuer()))
}

/// The name in a DER distinguished name (a SEQUENCE, as TLS carries CA names): its common name,
/// or else the whole name.
pub fn name_of(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, name) = x509_parser::x509::X509Name::from_der(der).ok()?;
    Some(display_name(&name))
}

fn display_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    name.iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| name.to_string())
}

/// A name for a new CA: `Postern CA` and eight random hex digits, so that two CAs never share a
/// name. A verifier finds a certificate's CA by name; when two CAs share one, a certificate
/// from the other fails on its signature ("decrypt error") instead of as an unknown CA.
pub fn new_ca_name() -> String {
    format!("Postern CA {:08x}", rand::random::<u32>())
}

fn parse_error(
    what: &'static str,
    e: x509_parser::nom::Err<x509_parser::error::X509Error>,
) -> PkiError {
    PkiError::Parse {
        what,
        source: e.into(),
    }
}

/// Parses `postern://agent/NAME` or `postern://client/NAME`.
pub fn parse_identity(uri: &str) -> Option<Identity> {
    let rest = uri.strip_prefix("postern://")?;
    let (kind, name) = rest.split_once('/')?;
    check_name(name).ok()?;
    match kind {
        "agent" => Some(Identity::Agent(name.to_owned())),
        "client" => Some(Identity::Client(name.to_owned())),
        _ => None,
    }
}

/// Checks that `name` can be an identity or a service name.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

/// Writes a public file (certificate). Refuses to overwrite unless `force`.
pub fn write_public(path: &Path, contents: &str, force: bool) -> Result<(), PkiError> {
    write_file(path, contents, 0o644, force)
}

/// Writes a private key with mode 0600. Refuses to overwrite unless `force`.
pub fn write_private(path: &Path, contents: &str, force: bool) -> Result<(), PkiError> {
    write_file(path, contents, 0o600, force)
}

/// Checks up front that none of `paths` exists (unless `force`), so that a refused command
/// writes nothing at all rather than half of its files.
pub fn check_absent(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    if force && path.exists() {
        // Recreate rather than truncate, so that the mode is the one asked for.
        std::fs::remove_file(path).map_err(io)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_path_buf())
            } else {
                io(e)
            }
        })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `der` as a PEM certificate block.
fn pem_cert(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A time as RFC 3339 in UTC, to the second (`2025-01-31T12:00:00Z`).
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Postern");
    dn.push(DnType::CommonName, common_name);
    dn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_leaves_carry_their_identity() {
        let (ca, _) = Ca::generate("test ca", 1).unwrap();
        for (kind, want) in [
            (Kind::Agent, Identity::Agent("db1".into())),
            (Kind::Client, Identity::Client("alice".into())),
        ] {
            let name = want.name().to_owned();
            let issued = ca.issue(&LeafSpec::new(kind, &name, 1)).unwrap();
            let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
            assert_eq!(identity_of(&der).unwrap(), want);
        }
        let mut spec = LeafSpec::new(Kind::Server, "relay", 1);
        spec.dns.push("localhost".into());
        let issued = ca.issue(&spec).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert!(matches!(identity_of(&der), Err(PkiError::NoIdentity)));
    }

    #[test]
    fn a_ca_reloaded_from_pem_signs_leaves() {
        let (ca, key) = Ca::generate("test ca", 1).unwrap();
        let again = Ca::from_pem(&ca.cert_pem, &key).unwrap();
        again.issue(&LeafSpec::new(Kind::Client, "bob", 1)).unwrap();
    }

    fn chain_of(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn subject_and_issuer(der: &CertificateDer<'_>) -> (String, String) {
        let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
        (display_name(x.subject()), display_name(x.issuer()))
    }

    #[test]
    fn an_intermediate_signs_leaves_that_carry_it() {
        let (root, _) = Ca::generate("Postern CA 0000aaaa", 10).unwrap();
        assert!(root.is_root());
        let (broker, key) = root.intermediate("broker", 5).unwrap();
        assert_eq!(broker.name(), "Postern CA 0000aaaa / broker");
        assert!(!broker.is_root());
        let issued = broker
            .issue(&LeafSpec::new(Kind::Client, "binding-1", 1))
            .unwrap();
        let chain = chain_of(&issued.cert_pem);
        assert_eq!(chain.len(), 2, "leaf, then the intermediate");
        assert_eq!(
            subject_and_issuer(&chain[0]),
            ("binding-1".into(), "Postern CA 0000aaaa / broker".into())
        );
        assert_eq!(
            subject_and_issuer(&chain[1]),
            (
                "Postern CA 0000aaaa / broker".into(),
                "Postern CA 0000aaaa".into()
            )
        );
        assert_eq!(
            identity_of(&chain[0]).unwrap(),
            Identity::Client("binding-1".into())
        );
        assert_eq!(issued.serial, serial_of(&chain[0]).unwrap());

        // Reloaded from its file, alone or followed by the root: leaves carry the same chain.
        for file in [
            broker.cert_pem.clone(),
            format!("{}{}", broker.cert_pem, root.cert_pem),
        ] {
            let again = Ca::from_pem(&file, &key).unwrap();
            assert_eq!(again.chain_pem(), broker.cert_pem);
            let leaf = again.issue(&LeafSpec::new(Kind::Client, "b", 1)).unwrap();
            assert_eq!(chain_of(&leaf.cert_pem)[1], chain[1]);
        }
        // Leaves of a root carry the leaf alone.
        let leaf = root.issue(&LeafSpec::new(Kind::Client, "c", 1)).unwrap();
        assert_eq!(chain_of(&leaf.cert_pem).len(), 1);
    }

    #[test]
    fn nothing_outlives_its_ca_and_expiry_reads_as_rfc3339() {
        let (root, _) = Ca::generate("root", 3).unwrap();
        let (broker, _) = root.intermediate("broker", 30).unwrap();
        assert_eq!(broker.not_after(), root.not_after());
        let issued = broker
            .issue(&LeafSpec::new(Kind::Client, "long", 365))
            .unwrap();
        assert_eq!(issued.not_after, root.not_after());
        let chain = chain_of(&issued.cert_pem);
        let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(
            x.validity().not_after.timestamp(),
            root.not_after().unix_timestamp()
        );
        let at = OffsetDateTime::from_unix_timestamp(1_738_324_800).unwrap(); // 2025-01-31 12:00
        assert_eq!(rfc3339(at), "2025-01-31T12:00:00Z");
        let expires = issued.expires_at();
        assert!(
            expires.len() == 20 && expires.ends_with('Z') && expires.as_bytes()[10] == b'T',
            "{expires}"
        );
        assert!(
            !format!("{issued:?}").contains("PRIVATE"),
            "the key is never printed"
        );
    }

    #[test]
    fn what_cannot_sign_says_why() {
        // A root as `certs init` made them before intermediates: path length 0.
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("Postern CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let old = Ca::from_pem(
            &params.self_signed(&key).unwrap().pem(),
            &key.serialize_pem(),
        )
        .unwrap();
        let e = old.intermediate("broker", 1).err().unwrap();
        assert!(matches!(e, PkiError::NoIntermediate(_)), "{e}");
        assert!(e.to_string().contains("certs init"), "{e}");
        old.issue(&LeafSpec::new(Kind::Client, "still-signs", 1))
            .unwrap();

        // An intermediate signs no CA.
        let (root, root_key) = Ca::generate("root", 1).unwrap();
        let (broker, _) = root.intermediate("broker", 1).unwrap();
        assert!(matches!(
            broker.intermediate("deeper", 1),
            Err(PkiError::NoIntermediate(_))
        ));
        assert!(matches!(
            root.intermediate("bad name", 1),
            Err(PkiError::BadName(_))
        ));

        // A leaf is no CA, a key must be the certificate's, and the text must hold one.
        let leaf = root.issue(&LeafSpec::new(Kind::Client, "x", 1)).unwrap();
        let e = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).err().unwrap();
        assert!(matches!(e, PkiError::NotCa(ref n) if n == "x"), "{e}");
        let e = Ca::from_pem(&broker.cert_pem, &root_key).err().unwrap();
        assert!(matches!(e, PkiError::KeyMismatch(_)), "{e}");
        assert!(matches!(
            Ca::from_pem("", &root_key),
            Err(PkiError::NoCertificate)
        ));
    }

    #[test]
    fn revocation_lists_accumulate_and_verify() {
        let (ca, _) = Ca::generate("test ca", 1).unwrap();
        let a = ca.issue(&LeafSpec::new(Kind::Client, "a", 1)).unwrap();
        let b = ca.issue(&LeafSpec::new(Kind::Client, "b", 1)).unwrap();
        let serial = |i: &Issued| {
            serial_of(&CertificateDer::from_pem_slice(i.cert_pem.as_bytes()).unwrap()).unwrap()
        };
        let first = ca.revoke(None, &[serial(&a)]).unwrap();
        let second = ca.revoke(Some(&first), &[serial(&b), serial(&a)]).unwrap();
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(second.as_bytes())
            .unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        assert_eq!(serials, vec![serial(&a), serial(&b)]);
        assert_eq!(crl.crl_number().unwrap().to_bytes_be(), vec![2]);
    }

    #[test]
    fn identities_parse_strictly() {
        assert_eq!(
            parse_identity("postern://client/a-b.c_d"),
            Some(Identity::Client("a-b.c_d".into()))
        );
        assert_eq!(parse_identity("postern://client/"), None);
        assert_eq!(parse_identity("postern://admin/x"), None);
        assert_eq!(parse_identity("postern://client/a/b"), None);
        assert_eq!(parse_identity("https://client/a"), None);
    }

    #[test]
    fn keys_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_private(&path, "secret", false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(matches!(
            write_private(&path, "other", false),
            Err(PkiError::Exists(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
        write_private(&path, "other", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "other");
    }
}
