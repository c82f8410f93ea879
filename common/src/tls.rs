//! TLS configurations for every link Postern runs, all with the ring provider (and the hybrid
//! post-quantum key exchange of [`kx`] preferred) and mutual TLS.
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
//!
//! # Refusals in words
//!
//! [`TlsFailure`] is the one describer of failed handshakes, for QUIC, the WebSocket link and the
//! TLS listeners alike: from a typed [`rustls::Error`], an I/O error wrapping one, or a bare TLS
//! alert (all a QUIC close carries), it says who refused and why ("certificate signed by an
//! unknown CA (unknown issuer "Postern CA 1a2b3c4d"; trusted: "Postern CA 9f8e7d6c")", "the peer
//! does not trust the CA that issued our certificate"), so that the same failure reads the same
//! whichever way it travelled. The names come from the verifiers, which note them beside the
//! error they return ([`Note`], [`accept`]): rustls picks the alert from the error alone.

use std::cell::RefCell;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, server};

use crate::pki::{self, Identity};

pub mod expiry;
pub mod kx;
use crate::protocol::ALPN;

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file (or what the PEM text was for).
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds nothing of what was asked for.
    #[error("{path}: no {what} in file")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("{path}: not a usable CA certificate: {source}")]
    Root {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: rustls::Error,
    },
    /// A host that TLS cannot verify a certificate against.
    #[error("{name:?} is not a valid server name")]
    ServerName {
        /// The host.
        name: String,
        /// Why not.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// rustls refused the material.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate verifier could not be built.
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
    /// The same CA certificates as they were read, for what the trust store does not keep
    /// (their expiry, see [`expiry`]).
    pub trusted: Arc<Vec<CertificateDer<'static>>>,
    /// Revocation lists: a client certificate listed in one is refused. Shared by every
    /// verifier made from this material, and reloadable while they run.
    pub revocations: Arc<Revocations>,
}

impl Material {
    /// Whether `other` is the same certificate set: chain, key and CA.
    pub fn same_as(&self, other: &Self) -> bool {
        self.chain == other.chain
            && self.key.secret_der() == other.key.secret_der()
            && self.roots.roots == other.roots.roots
    }

    /// Loads PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let (roots, trusted) = load_roots(ca)?;
        let chain = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            trusted: Arc::new(trusted),
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
        let trusted = CertificateDer::pem_slice_iter(ca.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("<ca>", e))?;
        for c in &trusted {
            roots.add(c.clone())?;
        }
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("<cert>", e))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| pem_err("<key>", e))?;
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            trusted: Arc::new(trusted),
            revocations: Arc::new(Revocations::default()),
        })
    }

    /// The identity in our own certificate, if any.
    pub fn identity(&self) -> Option<Identity> {
        self.chain.first().and_then(|c| pki::identity_of(c).ok())
    }
}

/// The crypto provider used everywhere: ring, with the hybrid post-quantum group
/// X25519MLKEM768 ([`kx`]) first among its key exchange groups, so that it is offered and chosen
/// on every TLS 1.3 link, and ring's classic groups after it for peers that lack it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups.insert(0, kx::X25519MLKEM768);
    Arc::new(p)
}

/// Server config for the agent/client link: TLS 1.3, ALPN `postern/1`, client cert required.
pub fn link_server(m: &Material) -> Result<ServerConfig, TlsError> {
    ServerTls::link(m)?.config(None)
}

/// Client config for the agent/client link: TLS 1.3, ALPN `postern/1`, our certificate.
pub fn link_client(m: &Material) -> Result<ClientConfig, TlsError> {
    Ok(ClientTls::link(m)?.config(None))
}

/// Server config for client-facing listeners: TLS 1.2 and 1.3, client cert required.
pub fn listener_server(m: &Material) -> Result<ServerConfig, TlsError> {
    ServerTls::new(m, BOTH_VERSIONS, false, Vec::new())?.config(None)
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
    ServerTls::new(m, BOTH_VERSIONS, true, Vec::new())?.config(None)
}

/// Client config for a TLS-first connection to a relay listener (tests, sidecars).
pub fn listener_client(m: &Material) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(BOTH_VERSIONS)?
        .with_root_certificates(m.roots.clone())
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?)
}

const LINK_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
const BOTH_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The server side of one kind of link, prepared once: [`ServerTls::config`] makes a config for
/// a handshake, cheaply (the key is parsed once; the session cache is shared), so that each
/// handshake can have its own [`Note`].
#[derive(Clone, Debug)]
pub struct ServerTls {
    provider: Arc<CryptoProvider>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    verifier: Arc<VerifierShared>,
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    alpn: Vec<Vec<u8>>,
}

impl ServerTls {
    /// The relay's side of the agent/client link (QUIC, and TLS inside a WebSocket).
    pub fn link(m: &Material) -> Result<Self, TlsError> {
        Self::new(m, LINK_VERSIONS, false, vec![ALPN.to_vec()])
    }

    fn new(
        m: &Material,
        versions: &'static [&'static rustls::SupportedProtocolVersion],
        optional: bool,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let key =
            rustls::sign::CertifiedKey::from_der(m.chain.clone(), m.key.clone_key(), &provider)?;
        Ok(Self {
            verifier: Arc::new(VerifierShared::new(
                m.roots.clone(),
                provider.clone(),
                m.revocations.clone(),
                optional,
            )?),
            resolver: Arc::new(rustls::sign::SingleCertAndKey::from(key)),
            sessions: rustls::server::ServerSessionMemoryCache::new(256),
            provider,
            versions,
            alpn,
        })
    }

    /// A server config whose client verifier leaves the details of a refused certificate in
    /// `note` (or, without one, where [`accept`] finds them).
    pub fn config(&self, note: Option<Note>) -> Result<ServerConfig, TlsError> {
        let verifier = Verifier {
            shared: self.verifier.clone(),
            note,
        };
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(self.versions)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.resolver.clone());
        cfg.alpn_protocols = self.alpn.clone();
        cfg.session_storage = self.sessions.clone();
        Ok(cfg)
    }
}

/// The dialling side of the agent/client link, prepared once; see [`ServerTls`].
#[derive(Clone, Debug)]
pub struct ClientTls {
    base: ClientConfig,
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
    trusted: Arc<[String]>,
    issuer: Option<String>,
}

impl ClientTls {
    /// The agent's (or a `connect` client's) side of the link: TLS 1.3, ALPN `postern/1`, our
    /// certificate, the relay verified against the Postern CA.
    pub fn link(m: &Material) -> Result<Self, TlsError> {
        let p = provider();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots.clone(), p.clone())
                .build()?;
        let mut base = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(LINK_VERSIONS)?
            .with_root_certificates(m.roots.clone())
            .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
        base.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            base,
            verifier,
            trusted: ca_names(&m.roots).into(),
            issuer: m.chain.first().and_then(pki::issuer_name),
        })
    }

    /// A client config whose server verifier leaves the details of a refused certificate in
    /// `note`.
    pub fn config(&self, note: Option<Note>) -> ClientConfig {
        let mut cfg = self.base.clone();
        cfg.dangerous()
            .set_certificate_verifier(Arc::new(ServerVerifier {
                inner: self.verifier.clone(),
                trusted: self.trusted.clone(),
                note,
            }));
        cfg
    }

    /// Completes what we know of a failure: when the peer refused our certificate, the name of
    /// the CA that issued it.
    pub fn explain(&self, failure: TlsFailure) -> TlsFailure {
        failure.with_our_issuer(self.issuer.as_deref())
    }

    /// The name of the CA that issued our certificate.
    pub(crate) fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }
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
            return Err(TlsError::Empty {
                path: path.to_path_buf(),
                what: "revocation list (X509 CRL)",
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

/// A client verifier that follows [`Revocations`] (it rebuilds its webpki verifier when the
/// lists change) and says why it refused a certificate (see [`Note`]).
#[derive(Debug)]
struct Verifier {
    shared: Arc<VerifierShared>,
    note: Option<Note>,
}

#[derive(Debug)]
struct VerifierShared {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    revocations: Arc<Revocations>,
    optional: bool,
    hints: Vec<rustls::DistinguishedName>,
    /// The trusted CAs' names, for refusals.
    trusted: Arc<[String]>,
    current: std::sync::RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl VerifierShared {
    fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        revocations: Arc<Revocations>,
        optional: bool,
    ) -> Result<Self, TlsError> {
        let (generation, inner) = build_webpki(&roots, &provider, &revocations, optional)?;
        Ok(Self {
            hints: inner.root_hint_subjects().to_vec(),
            trusted: ca_names(&roots).into(),
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
    // Unknown revocation status is allowed: webpki checks every certificate of the chain
    // against the lists it has, and by default refuses one whose issuer published none. A leaf
    // from an intermediate CA (the service broker's) has no list here, since the intermediate
    // publishes none and its revocations live in the relay's access rules, so the default
    // would refuse every such leaf once a root list is configured. The intermediate itself is
    // still checked against the root's list: revoking it there refuses all of its leaves. A
    // leaf of the root is always covered by the root's list, so nothing the root revoked
    // passes.
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(st.crls.iter().cloned())
        .allow_unknown_revocation_status();
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
        !self.shared.optional
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.shared.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.shared
            .inner()
            .verify_client_cert(end_entity, intermediates, now)
            .inspect(|_| expiry::saw_client(end_entity))
            .inspect_err(|e| {
                note(
                    self.note.as_ref(),
                    TlsFailure::from_rustls(e).with_names(end_entity, &self.shared.trusted),
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.shared
            .inner()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.shared
            .inner()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.shared.inner().supported_verify_schemes()
    }
}

/// The dialling side's check of the relay's certificate: webpki's, noting why it refused.
#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    trusted: Arc<[String]>,
    note: Option<Note>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                note(
                    self.note.as_ref(),
                    TlsFailure::from_rustls(e).with_names(end_entity, &self.trusted),
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Where a verifier leaves why it refused a certificate, for one handshake.
///
/// The details (which CA issued the certificate, which ones are trusted) cannot travel inside
/// the error the verifier returns: rustls picks the alert the peer sees from the error variant
/// alone, and a refusal dressed up as `CertificateError::Other` would reach the peer as
/// `certificate_unknown` instead of `unknown_ca`. So the verifier returns rustls' own error and
/// writes the details here, and whoever reports the failed handshake reads them back.
#[derive(Clone, Debug, Default)]
pub struct Note(Arc<Mutex<Option<TlsFailure>>>);

impl Note {
    /// A fresh note for one handshake.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the verifier refused, if it refused anything.
    pub fn take(&self) -> Option<TlsFailure> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn set(&self, failure: TlsFailure) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(failure);
    }
}

thread_local! {
    /// What the last verifier without a [`Note`] refused on this thread; see [`accept`].
    static LAST_REFUSAL: RefCell<Option<TlsFailure>> = const { RefCell::new(None) };
}

fn note(into: Option<&Note>, failure: TlsFailure) {
    match into {
        Some(n) => n.set(failure),
        None => LAST_REFUSAL.with(|l| *l.borrow_mut() = Some(failure)),
    }
}

/// Runs a TLS server handshake with an acceptor shared by many connections, and on failure
/// hands back an error that [`TlsFailure::from_io`] reads with the verifier's details.
///
/// A shared config cannot carry a [`Note`] per handshake. rustls is synchronous, though: the
/// verifier runs inside one poll of this handshake, which returns its error from that same poll,
/// on the same thread. So the verifier's details are left in a thread-local slot, cleared before
/// each poll and read right after the poll that failed; nothing else can run on the thread in
/// between.
pub async fn accept<IO>(acceptor: &TlsAcceptor, io: IO) -> io::Result<server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut handshake = std::pin::pin!(acceptor.accept(io));
    poll_fn(|cx| {
        LAST_REFUSAL.with(|l| l.borrow_mut().take());
        match handshake.as_mut().poll(cx) {
            Poll::Ready(Err(e)) => {
                let noted = LAST_REFUSAL.with(|l| l.borrow_mut().take());
                Poll::Ready(Err(with_note(e, noted)))
            }
            other => other,
        }
    })
    .await
}

/// `e` with the verifier's details in place of rustls' bare error, when there are any.
pub(crate) fn with_note(e: io::Error, noted: Option<TlsFailure>) -> io::Error {
    match noted {
        Some(f) if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
            io::Error::new(e.kind(), f)
        }
        _ => e,
    }
}

/// Who refused a TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// This side: it checked the peer's certificate and refused it, or failed on its own.
    Us,
    /// The peer, which said why with a TLS alert.
    Peer,
}

/// What was wrong in a failed TLS handshake, as far as the side that tells can know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCause {
    /// The certificate was not issued by a trusted CA (alert `unknown_ca`).
    UnknownCa {
        /// The name of the CA that issued the certificate, when known.
        issuer: Option<String>,
        /// The names of the CAs the refusing side trusts, when known.
        trusted: Vec<String>,
    },
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// Expired or not valid yet: one alert (`certificate_expired`) stands for both.
    NotValidNow,
    /// The certificate is on a revocation list.
    Revoked,
    /// The certificate does not carry the name that was dialled.
    WrongName {
        /// The name dialled.
        expected: Option<String>,
        /// The names the certificate carries.
        presented: Vec<String>,
    },
    /// No certificate was presented where one is required.
    NoCertificate,
    /// The certificate's signature does not verify: usually a CA of the same name but another
    /// key (every CA made before CA names were distinct was called "Postern CA").
    BadSignature {
        /// The name of the CA the certificate claims as its issuer, when known.
        issuer: Option<String>,
    },
    /// The certificate is not for this use (extended key usage).
    WrongPurpose,
    /// An alert with nothing more specific to say.
    Alert(rustls::AlertDescription),
    /// Anything else (the rustls error says what).
    Other,
}

/// Why a TLS handshake failed, in words an operator can act on: the one describer of TLS
/// failures for both transports and every listener.
///
/// Built from a [`rustls::Error`] ([`from_rustls`](Self::from_rustls)), an I/O error wrapping
/// one ([`from_io`](Self::from_io)), or a TLS alert alone ([`from_alert`](Self::from_alert):
/// what a QUIC connection close carries), so that the same failure reads the same whichever way
/// it was reported.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFailure {
    /// Who refused.
    pub by: RefusedBy,
    /// What was wrong.
    pub cause: TlsCause,
    /// The rustls error, when this side failed.
    error: Option<Arc<rustls::Error>>,
}

impl TlsFailure {
    /// A failure rustls reported on this side (an alert it received means the peer refused).
    pub fn from_rustls(e: &rustls::Error) -> Self {
        use rustls::{CertificateError as C, Error as E};
        let cause = match e {
            E::AlertReceived(a) => return Self::from_alert(*a, RefusedBy::Peer),
            E::NoCertificatesPresented => TlsCause::NoCertificate,
            E::InvalidCertificate(c) => match c {
                C::UnknownIssuer => TlsCause::UnknownCa {
                    issuer: None,
                    trusted: Vec::new(),
                },
                C::Expired | C::ExpiredContext { .. } => TlsCause::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => TlsCause::NotYetValid,
                C::Revoked => TlsCause::Revoked,
                C::NotValidForName => TlsCause::WrongName {
                    expected: None,
                    presented: Vec::new(),
                },
                C::NotValidForNameContext {
                    expected,
                    presented,
                } => TlsCause::WrongName {
                    expected: Some(expected.to_str().into_owned()),
                    presented: presented.iter().map(|n| bare_name(n)).collect(),
                },
                C::BadSignature => TlsCause::BadSignature { issuer: None },
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => TlsCause::WrongPurpose,
                _ => TlsCause::Other,
            },
            _ => TlsCause::Other,
        };
        Self {
            by: RefusedBy::Us,
            cause,
            error: Some(Arc::new(e.clone())),
        }
    }

    /// A failure known only by its alert: sent by the peer, or (`by` [`RefusedBy::Us`]) the one
    /// this side sent.
    pub fn from_alert(alert: rustls::AlertDescription, by: RefusedBy) -> Self {
        use rustls::AlertDescription as A;
        let cause = match alert {
            A::UnknownCA => TlsCause::UnknownCa {
                issuer: None,
                trusted: Vec::new(),
            },
            A::CertificateExpired => TlsCause::NotValidNow,
            A::CertificateRevoked => TlsCause::Revoked,
            A::DecryptError => TlsCause::BadSignature { issuer: None },
            A::CertificateRequired => TlsCause::NoCertificate,
            A::UnsupportedCertificate => TlsCause::WrongPurpose,
            other => TlsCause::Alert(other),
        };
        Self {
            by,
            cause,
            error: None,
        }
    }

    /// The failure inside an I/O error from a TLS handshake, if it is one.
    pub fn from_io(e: &io::Error) -> Option<Self> {
        let inner = e.get_ref()?;
        if let Some(f) = inner.downcast_ref::<Self>() {
            return Some(f.clone());
        }
        inner.downcast_ref::<rustls::Error>().map(Self::from_rustls)
    }

    /// The failure a QUIC connection close code stands for: TLS alerts travel as crypto errors,
    /// `0x100` plus the alert.
    pub fn from_quic_code(code: u64, by: RefusedBy) -> Option<Self> {
        let alert = u8::try_from(code.checked_sub(0x100)?).ok()?;
        Some(Self::from_alert(alert.into(), by))
    }

    /// The rustls error this side failed with, if it is known.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        self.error.as_deref()
    }

    /// Adds the names of the CA that issued `cert` and of the `trusted` ones, where they say
    /// more.
    fn with_names(mut self, cert: &CertificateDer<'_>, trusted: &[String]) -> Self {
        match &mut self.cause {
            TlsCause::UnknownCa { issuer, trusted: t } => {
                *issuer = pki::issuer_name(cert);
                *t = trusted.to_vec();
            }
            TlsCause::BadSignature { issuer } => *issuer = pki::issuer_name(cert),
            _ => {}
        }
        self
    }

    /// When the peer refused our certificate: the name of the CA that issued it.
    pub(crate) fn with_our_issuer(mut self, ours: Option<&str>) -> Self {
        if self.by == RefusedBy::Peer
            && let TlsCause::UnknownCa { issuer, .. } | TlsCause::BadSignature { issuer } =
                &mut self.cause
            && issuer.is_none()
        {
            *issuer = ours.map(str::to_owned);
        }
        self
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.by, &self.cause) {
            (RefusedBy::Us, TlsCause::UnknownCa { issuer, trusted }) => {
                f.write_str("certificate signed by an unknown CA (unknown issuer")?;
                if let Some(i) = issuer {
                    write!(f, " {i:?}")?;
                }
                if !trusted.is_empty() {
                    write!(f, "; trusted: {}", quoted(trusted))?;
                }
                f.write_str(")")
            }
            (RefusedBy::Us, TlsCause::Expired) => f.write_str("certificate has expired"),
            (RefusedBy::Us, TlsCause::NotYetValid) => f.write_str("certificate is not valid yet"),
            (RefusedBy::Us, TlsCause::NotValidNow) => {
                f.write_str("certificate has expired or is not valid yet")
            }
            (RefusedBy::Us, TlsCause::Revoked) => f.write_str("certificate has been revoked"),
            (
                RefusedBy::Us,
                TlsCause::WrongName {
                    expected,
                    presented,
                },
            ) => {
                f.write_str("certificate is not valid for the name dialled")?;
                if let Some(e) = expected {
                    write!(f, " {e:?}")?;
                }
                if !presented.is_empty() {
                    write!(f, " (it is for {})", quoted(presented))?;
                }
                Ok(())
            }
            (RefusedBy::Us, TlsCause::NoCertificate) => {
                f.write_str("client presented no certificate")
            }
            (RefusedBy::Us, TlsCause::BadSignature { issuer }) => {
                f.write_str("certificate signature does not verify (signed by another CA")?;
                match issuer {
                    Some(i) => write!(f, " also named {i:?}?)"),
                    None => f.write_str(" of the same name?)"),
                }
            }
            (RefusedBy::Us, TlsCause::WrongPurpose) => {
                f.write_str("certificate is not meant for this use (extended key usage)")
            }
            (RefusedBy::Us, TlsCause::Alert(a)) => {
                write!(f, "tls handshake failed ({})", alert_name(*a))
            }
            (RefusedBy::Us, TlsCause::Other) => match &self.error {
                Some(e) => write!(f, "tls handshake failed: {e}"),
                None => f.write_str("tls handshake failed"),
            },
            (RefusedBy::Peer, TlsCause::UnknownCa { issuer, .. }) => {
                f.write_str("the peer does not trust the CA that issued our certificate")?;
                match issuer {
                    Some(i) => write!(f, " (unknown CA: ours is {i:?})"),
                    None => f.write_str(" (unknown CA)"),
                }
            }
            (
                RefusedBy::Peer,
                TlsCause::Expired | TlsCause::NotYetValid | TlsCause::NotValidNow,
            ) => f.write_str("the peer refused our certificate: expired or not valid yet"),
            (RefusedBy::Peer, TlsCause::Revoked) => {
                f.write_str("the peer refused our certificate: revoked")
            }
            (RefusedBy::Peer, TlsCause::WrongName { .. }) => {
                f.write_str("the peer refused our certificate: not valid for its name")
            }
            (RefusedBy::Peer, TlsCause::NoCertificate) => {
                f.write_str("the peer requires a certificate and got none")
            }
            (RefusedBy::Peer, TlsCause::BadSignature { issuer }) => {
                f.write_str(
                    "the peer cannot verify our certificate's signature (it trusts another CA",
                )?;
                match issuer {
                    Some(i) => write!(f, " also named {i:?}?)"),
                    None => f.write_str(" of the same name?)"),
                }
            }
            (RefusedBy::Peer, TlsCause::WrongPurpose) => {
                f.write_str("the peer refused our certificate: not meant for this use")
            }
            (RefusedBy::Peer, TlsCause::Alert(a)) => {
                write!(f, "the peer refused the tls handshake ({})", alert_name(*a))
            }
            (RefusedBy::Peer, TlsCause::Other) => f.write_str("the peer refused the tls handshake"),
        }
    }
}

impl std::error::Error for TlsFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// An alert's name as the TLS specification writes it (`bad_certificate`).
fn alert_name(a: rustls::AlertDescription) -> String {
    let camel = format!("{a:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.char_indices() {
        let prev_lower = camel[..i].chars().last().is_some_and(|p| !p.is_uppercase());
        if c.is_uppercase() && i > 0 && prev_lower {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// A name as rustls presents it (`DnsName("db.example")`, `IpAddress(10.0.0.1)`), bare.
fn bare_name(presented: &str) -> String {
    let inner = presented
        .strip_prefix("DnsName(")
        .or_else(|| presented.strip_prefix("IpAddress("))
        .and_then(|s| s.strip_suffix(')'));
    match inner {
        Some(s) => s.trim_matches('"').to_owned(),
        None => presented.to_owned(),
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The names of the CAs in `roots`.
fn ca_names(roots: &RootCertStore) -> Vec<String> {
    roots
        .subjects()
        .iter()
        .filter_map(|dn| pki::name_of(dn.as_ref()))
        .collect()
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
    ServerName::try_from(host.to_owned()).map_err(|source| TlsError::ServerName {
        name: host.to_owned(),
        source,
    })
}

/// Describes a TLS handshake failure for a log line: why the peer was refused, or why it refused
/// us ([`TlsFailure`]'s words), or the I/O error when the handshake did not get that far.
pub fn describe_handshake_error(err: &io::Error) -> String {
    match TlsFailure::from_io(err) {
        Some(f) => f.to_string(),
        None => err.to_string(),
    }
}

fn load_roots(path: &Path) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = load_certs(path)?;
    for c in &certs {
        roots.add(c.clone()).map_err(|source| TlsError::Root {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok((roots, certs))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn pem_err(path: impl AsRef<Path>, source: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.as_ref().to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Kind, LeafSpec};
    use time::{Duration, OffsetDateTime};
    use tokio::io::AsyncReadExt;

    fn issue(ca: &Ca, roots_from: &Ca, spec: &LeafSpec) -> Material {
        let issued = ca.issue(spec).unwrap();
        Material::from_pem(&roots_from.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap()
    }

    fn relay(ca: &Ca) -> Material {
        let mut spec = LeafSpec::new(Kind::Server, "relay", 1);
        spec.dns.push("localhost".into());
        issue(ca, ca, &spec)
    }

    /// One handshake between a client-facing listener shared by all connections and a client:
    /// the listener's error and the client's.
    async fn handshake(acceptor: &TlsAcceptor, client: &Material) -> (io::Error, io::Error) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(listener_client(client).unwrap()));
        let server = async {
            match accept(acceptor, a).await {
                Ok(_) => panic!("the listener accepted the certificate"),
                Err(e) => e,
            }
        };
        let client = async {
            // TLS 1.3 lets the client finish first; the refusal then arrives on its first read.
            let mut s = connector
                .connect(server_name("localhost").unwrap(), b)
                .await?;
            let mut x = [0u8; 1];
            s.read_exact(&mut x).await.map(|_| ())
        };
        let (server, client) = tokio::join!(server, client);
        (server, client.expect_err("the client got through"))
    }

    fn acceptor(m: &Material) -> TlsAcceptor {
        TlsAcceptor::from(Arc::new(listener_server(m).unwrap()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_certificate_from_another_ca_is_an_unknown_ca_naming_both() {
        let (ours, _) = Ca::generate("Postern CA 0000aaaa", 1).unwrap();
        let acceptor = acceptor(&relay(&ours));
        let foreign: Vec<(String, Material)> = ["Postern CA 1111bbbb", "Postern CA 2222cccc"]
            .iter()
            .map(|name| {
                let (ca, _) = Ca::generate(name, 1).unwrap();
                let m = issue(&ca, &ours, &LeafSpec::new(Kind::Client, "alice", 1));
                (name.to_string(), m)
            })
            .collect();
        // Many at once on a shared acceptor: each refusal names its own issuer.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (name, m) = foreign[i % 2].clone();
            let acceptor = acceptor.clone();
            tasks.push(tokio::spawn(async move {
                let (server, client) = handshake(&acceptor, &m).await;
                (name, server, client)
            }));
        }
        for t in tasks {
            let (name, server, client) = t.await.unwrap();
            assert_eq!(
                describe_handshake_error(&server),
                format!(
                    "certificate signed by an unknown CA (unknown issuer {name:?}; trusted: \"Postern CA 0000aaaa\")"
                )
            );
            // The client sees the alert `unknown_ca`, not a failed signature.
            let f = TlsFailure::from_io(&client).unwrap();
            assert_eq!(
                (f.by, &f.cause),
                (
                    RefusedBy::Peer,
                    &TlsCause::UnknownCa {
                        issuer: None,
                        trusted: Vec::new(),
                    }
                )
            );
            assert_eq!(
                f.to_string(),
                "the peer does not trust the CA that issued our certificate (unknown CA)"
            );
        }
    }

    #[tokio::test]
    async fn cas_of_the_same_name_fail_on_the_signature_and_say_so() {
        // What every `certs init` before distinct names made.
        let (ours, _) = Ca::generate("Postern CA", 1).unwrap();
        let (theirs, _) = Ca::generate("Postern CA", 1).unwrap();
        let alice = issue(&theirs, &ours, &LeafSpec::new(Kind::Client, "alice", 1));
        let (server, client) = handshake(&acceptor(&relay(&ours)), &alice).await;
        assert_eq!(
            describe_handshake_error(&server),
            "certificate signature does not verify (signed by another CA also named \"Postern CA\"?)"
        );
        let f = TlsFailure::from_io(&client).unwrap();
        assert_eq!(f.cause, TlsCause::BadSignature { issuer: None });
        assert!(f.to_string().contains("same name"), "{f}");
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_certificates_say_so() {
        let (ca, _) = Ca::generate("Postern CA 0000aaaa", 1).unwrap();
        let acceptor = acceptor(&relay(&ca));
        let now = OffsetDateTime::now_utc();
        for (from, to, words) in [
            (
                now - Duration::days(3),
                now - Duration::days(1),
                "certificate has expired",
            ),
            (
                now + Duration::days(1),
                now + Duration::days(3),
                "certificate is not valid yet",
            ),
        ] {
            let mut spec = LeafSpec::new(Kind::Client, "alice", 1);
            spec.not_before = from;
            spec.not_after = to;
            let (server, client) = handshake(&acceptor, &issue(&ca, &ca, &spec)).await;
            assert_eq!(describe_handshake_error(&server), words);
            assert_eq!(
                TlsFailure::from_io(&client).unwrap().to_string(),
                "the peer refused our certificate: expired or not valid yet"
            );
        }
    }

    /// A handshake that the listener must accept: the listener writes a byte, the client
    /// reads it. `Err` holds the listener's error.
    async fn handshake_result(acceptor: &TlsAcceptor, client: &Material) -> Result<(), io::Error> {
        use tokio::io::AsyncWriteExt;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(listener_client(client).unwrap()));
        let server = async {
            let mut s = accept(acceptor, a).await?;
            s.write_all(b"!").await?;
            s.flush().await
        };
        let client = async {
            let mut s = connector
                .connect(server_name("localhost").unwrap(), b)
                .await?;
            let mut x = [0u8; 1];
            s.read_exact(&mut x).await.map(|_| ())
        };
        let (server, client) = tokio::join!(server, client);
        server?;
        client
    }

    #[tokio::test]
    async fn leaves_of_an_intermediate_pass_a_root_list_until_the_intermediate_is_revoked() {
        let (root, _) = Ca::generate("Postern CA 0000aaaa", 1).unwrap();
        let (broker, _) = root.intermediate("broker", 1).unwrap();
        let server = relay(&root);
        let acceptor = acceptor(&server);
        let carol = issue(&broker, &root, &LeafSpec::new(Kind::Client, "binding-1", 1));
        assert_eq!(carol.chain.len(), 2, "the client sends the intermediate");
        let bob_issued = root.issue(&LeafSpec::new(Kind::Client, "bob", 1)).unwrap();
        let bob =
            Material::from_pem(&root.cert_pem, &bob_issued.cert_pem, &bob_issued.key_pem).unwrap();
        let alice = issue(&root, &root, &LeafSpec::new(Kind::Client, "alice", 1));

        // The root's list revokes bob; the intermediate publishes none.
        let crl = root
            .revoke(None, std::slice::from_ref(&bob_issued.serial))
            .unwrap();
        server.revocations.replace_pem(crl.as_bytes()).unwrap();
        handshake_result(&acceptor, &carol)
            .await
            .expect("a leaf of the intermediate passes");
        handshake_result(&acceptor, &alice)
            .await
            .expect("a leaf of the root not on the list passes");
        let (refused, _) = handshake(&acceptor, &bob).await;
        assert_eq!(
            describe_handshake_error(&refused),
            "certificate has been revoked"
        );

        // The intermediate revoked in the root's list: every leaf it signed is refused.
        let intermediate = CertificateDer::from_pem_slice(broker.cert_pem.as_bytes()).unwrap();
        let crl = root
            .revoke(Some(&crl), &[pki::serial_of(&intermediate).unwrap()])
            .unwrap();
        server.revocations.replace_pem(crl.as_bytes()).unwrap();
        let (refused, _) = handshake(&acceptor, &carol).await;
        assert_eq!(
            describe_handshake_error(&refused),
            "certificate has been revoked"
        );
        handshake_result(&acceptor, &alice)
            .await
            .expect("alice still passes");
    }

    #[tokio::test]
    async fn a_leaf_of_an_intermediate_without_its_chain_is_refused() {
        // A client that sends the leaf alone: the verifier cannot reach the root.
        let (root, _) = Ca::generate("Postern CA 0000aaaa", 1).unwrap();
        let (broker, _) = root.intermediate("broker", 1).unwrap();
        let mut carol = issue(&broker, &root, &LeafSpec::new(Kind::Client, "carol", 1));
        carol.chain.truncate(1);
        let (refused, _) = handshake(&acceptor(&relay(&root)), &carol).await;
        let words = describe_handshake_error(&refused);
        assert!(words.contains("unknown CA"), "{words}");
    }

    #[test]
    fn alerts_and_quic_codes_read_as_their_failures() {
        use rustls::AlertDescription as A;
        assert_eq!(alert_name(A::UnknownCA), "unknown_ca");
        assert_eq!(alert_name(A::BadCertificate), "bad_certificate");
        assert_eq!(alert_name(A::DecryptError), "decrypt_error");
        let f = TlsFailure::from_quic_code(0x100 + 48, RefusedBy::Peer).unwrap();
        assert!(matches!(f.cause, TlsCause::UnknownCa { .. }));
        assert_eq!(
            f.clone().with_our_issuer(Some("Postern CA 1")).to_string(),
            "the peer does not trust the CA that issued our certificate (unknown CA: ours is \"Postern CA 1\")"
        );
        assert_eq!(TlsFailure::from_quic_code(0x30, RefusedBy::Peer), None);
        assert_eq!(TlsFailure::from_quic_code(0x300, RefusedBy::Peer), None);
        let f = TlsFailure::from_alert(A::BadCertificate, RefusedBy::Peer);
        assert_eq!(
            f.to_string(),
            "the peer refused the tls handshake (bad_certificate)"
        );
        // The same failure, reported by rustls, keeps rustls' error as its source.
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked);
        let f = TlsFailure::from_rustls(&e);
        assert_eq!(f.to_string(), "certificate has been revoked");
        assert_eq!(f.rustls_error(), Some(&e));
        assert!(std::error::Error::source(&f).is_some());
        assert_eq!(bare_name("DnsName(\"db.example\")"), "db.example");
        assert_eq!(bare_name("IpAddress(10.0.0.1)"), "10.0.0.1");
    }
}
