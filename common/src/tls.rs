//! TLS configurations for every link Postern runs, all with the ring provider and mutual TLS.
//!
//! * The agent and client link to the relay (QUIC or TLS inside a WebSocket): TLS 1.3 only,
//!   ALPN `postern/1`, client certificate required and verified against the Postern CA.
//! * The relay's client-facing listeners: TLS 1.2 and 1.3 (older MySQL drivers), client
//!   certificate required (for the MySQL-native listener, required by the MySQL front end after
//!   the handshake, so a client without one gets a MySQL error it can show).
//!
//! Authentication is a verifier choice, never a separate code path: every server config here
//! verifies the client certificate against the configured CA (all but the MySQL-native one also
//! refuse a handshake without one), and the identity is read from the verified certificate
//! afterwards with [`peer_identity`], which fails when there is none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};

use crate::pki::{self, Identity};
use crate::protocol::ALPN;

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("tls: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The certificate, key and trusted CA of one side.
#[derive(Clone, Debug)]
pub struct Material {
    /// Our certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// The CA certificates we trust for peers.
    pub roots: Arc<RootCertStore>,
    /// Revocation lists: a client certificate listed in one is refused. Shared by every
    /// verifier made from this material, and reloadable while they run.
    pub revocations: Arc<Revocations>,
}

impl Material {
    /// Loads PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(ca)?;
        let chain = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
            path: key.to_path_buf(),
            reason: format!("no usable private key: {e}"),
        })?;
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            revocations: Arc::new(Revocations::default()),
        })
    }

    /// Uses the revocation lists in the PEM file `path` (and re-reads it on
    /// [`Revocations::reload`]).
    pub fn with_crl_file(mut self, path: &Path) -> Result<Self, TlsError> {
        self.revocations = Arc::new(Revocations::load(path)?);
        Ok(self)
    }

    /// Builds material from PEM strings (tests and the demo).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            let c = c.map_err(|e| pem_err("<ca>", e))?;
            roots.add(c)?;
        }
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("<cert>", e))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| pem_err("<key>", e))?;
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            revocations: Arc::new(Revocations::default()),
        })
    }

    /// The identity in our own certificate, if any.
    pub fn identity(&self) -> Option<Identity> {
        self.chain.first().and_then(|c| pki::identity_of(c).ok())
    }
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server config for the agent/client link: TLS 1.3, ALPN `postern/1`, client cert required.
pub fn link_server(m: &Material) -> Result<ServerConfig, TlsError> {
    let p = provider();
    let verifier = client_verifier(m, &p, false)?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Client config for the agent/client link: TLS 1.3, ALPN `postern/1`, our certificate.
pub fn link_client(m: &Material) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(m.roots.clone())
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Server config for client-facing listeners: TLS 1.2 and 1.3, client cert required.
pub fn listener_server(m: &Material) -> Result<ServerConfig, TlsError> {
    let p = provider();
    let verifier = client_verifier(m, &p, false)?;
    let cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    Ok(cfg)
}

/// Server config for the MySQL-native listener: TLS 1.2 and 1.3; a client certificate is
/// requested and verified against the CA, but the handshake also completes without one.
///
/// The certificate is still required: the MySQL front end refuses a client that sent none, but
/// with a MySQL ERR packet over the finished handshake, which the client shows ("a client
/// certificate is required"), instead of a TLS alert that drivers report as a bare handshake
/// failure. A certificate that is presented and does not verify still fails the handshake.
///
/// Revoked certificates fail the handshake too (the lists in `m.revocations`, followed as they
/// change).
pub fn mysql_listener_server(m: &Material) -> Result<ServerConfig, TlsError> {
    let p = provider();
    let verifier = client_verifier(m, &p, true)?;
    let cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    Ok(cfg)
}

/// Client config for a TLS-first connection to a relay listener (tests, sidecars).
pub fn listener_client(m: &Material) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(m.roots.clone())
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?)
}

/// The client-certificate verifier every server config uses: the CA roots and the current
/// revocation lists.
fn client_verifier(
    m: &Material,
    p: &Arc<CryptoProvider>,
    optional: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(Arc::new(Verifier::new(
        m.roots.clone(),
        p.clone(),
        m.revocations.clone(),
        optional,
    )?))
}

/// Revocation lists that can be re-read while servers run: a certificate revoked with
/// `postern-relay certs revoke` is refused from the next handshake on, without a restart.
#[derive(Debug, Default)]
pub struct Revocations {
    path: Option<PathBuf>,
    state: std::sync::RwLock<CrlState>,
}

#[derive(Debug, Default)]
struct CrlState {
    crls: Vec<CertificateRevocationListDer<'static>>,
    modified: Option<std::time::SystemTime>,
    generation: u64,
}

impl Revocations {
    /// Reads the revocation lists in `path` (PEM).
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let me = Self {
            path: Some(path.to_path_buf()),
            state: Default::default(),
        };
        me.reload()?;
        Ok(me)
    }

    /// Re-reads the file if it changed since the last read. Returns whether it changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.read().modified {
            return Ok(false);
        }
        let crls = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| pem_err(path, e))?;
        if crls.is_empty() {
            return Err(TlsError::File {
                path: path.to_path_buf(),
                reason: "no revocation list (X509 CRL) in file".into(),
            });
        }
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        st.crls = crls;
        st.modified = modified;
        st.generation += 1;
        Ok(true)
    }

    /// Replaces the lists with those in `pem` (PEM text, possibly empty: no revocations). An
    /// agent takes them from the relay's policy this way.
    pub fn replace_pem(&self, pem: &[u8]) -> Result<(), TlsError> {
        let crls = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("<revocation list from the relay>", e))?;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if st.crls != crls {
            st.crls = crls;
            st.generation += 1;
        }
        Ok(())
    }

    /// The file the lists come from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CrlState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// A client verifier that follows [`Revocations`]: it rebuilds its webpki verifier when the
/// lists change.
#[derive(Debug)]
struct Verifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    revocations: Arc<Revocations>,
    optional: bool,
    hints: Vec<rustls::DistinguishedName>,
    current: std::sync::RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl Verifier {
    fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        revocations: Arc<Revocations>,
        optional: bool,
    ) -> Result<Self, TlsError> {
        let (generation, inner) = build_webpki(&roots, &provider, &revocations, optional)?;
        Ok(Self {
            hints: inner.root_hint_subjects().to_vec(),
            roots,
            provider,
            revocations,
            optional,
            current: std::sync::RwLock::new((generation, inner)),
        })
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let generation = self.revocations.read().generation;
        {
            let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
            if cur.0 == generation {
                return cur.1.clone();
            }
        }
        match build_webpki(
            &self.roots,
            &self.provider,
            &self.revocations,
            self.optional,
        ) {
            Ok((g, v)) => {
                let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
                *cur = (g, v.clone());
                v
            }
            // Lists that do not build keep the previous verifier (and the reload logged why).
            Err(_) => self
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone(),
        }
    }
}

fn build_webpki(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    revocations: &Revocations,
    optional: bool,
) -> Result<(u64, Arc<dyn ClientCertVerifier>), TlsError> {
    let st = revocations.read();
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(st.crls.iter().cloned());
    if optional {
        b = b.allow_unauthenticated();
    }
    Ok((st.generation, b.build()?))
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// Reads the identity of a verified peer from its certificate chain.
pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Result<Identity, pki::PkiError> {
    let leaf = chain
        .and_then(|c| c.first())
        .ok_or(pki::PkiError::NoIdentity)?;
    pki::identity_of(leaf)
}

/// Turns a host string into the name TLS verifies.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| TlsError::File {
        path: PathBuf::from(host),
        reason: format!("not a valid server name: {e}"),
    })
}

/// Describes a TLS handshake failure for a log line: why the peer was refused.
pub fn describe_handshake_error(err: &std::io::Error) -> String {
    use rustls::{CertificateError, Error as E};
    let Some(inner) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return err.to_string();
    };
    match inner {
        E::NoCertificatesPresented => "client presented no certificate".into(),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "certificate is not signed by the postern CA (unknown issuer)".into()
        }
        E::InvalidCertificate(CertificateError::Expired)
        | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "certificate has expired".into()
        }
        E::InvalidCertificate(CertificateError::NotValidYet)
        | E::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "certificate is not valid yet".into()
        }
        E::InvalidCertificate(CertificateError::Revoked) => "certificate has been revoked".into(),
        other => other.to_string(),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

fn pem_err(path: impl AsRef<Path>, e: rustls_pki_types::pem::Error) -> TlsError {
    let reason = match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not valid PEM: {other}"),
    };
    TlsError::File {
        path: path.as_ref().to_path_buf(),
        reason,
    }
}
