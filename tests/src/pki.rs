//! Certificates for tests, made at test time with Postern's own PKI code.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use postern_common::pki::{Ca, Kind, LeafSpec};
use postern_common::tls::Material;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

/// A CA in a temp dir, with a relay server certificate (`localhost`, `127.0.0.1`).
pub struct TestPki {
    dir: TempDir,
    ca: Ca,
    /// The revocation list written last by [`TestPki::revoke`].
    crl: Mutex<Option<String>>,
    /// How long the CA and the certificates it issues are valid.
    days: u32,
}

impl TestPki {
    /// Makes a CA and the relay's server certificate `server-relay`, valid for a day.
    pub fn new() -> Self {
        Self::lasting(1)
    }

    /// [`new`](Self::new), with the CA and every certificate it issues valid for `days` (a
    /// setup that `diagnose` finds far from expiring).
    pub fn lasting(days: u32) -> Self {
        let dir = temp_dir();
        let (ca, key) =
            Ca::generate(&format!("Test CA {}", rand::random::<u32>()), days).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("write ca");
        std::fs::write(dir.path().join("ca-key.pem"), key).expect("write ca key");
        Self::around(dir, ca, days)
    }

    /// A CA made as an operator makes one, with `postern-relay certs init` (so named as that
    /// names CAs), and the relay's server certificate `server-relay`.
    pub fn from_certs_init() -> Self {
        let dir = temp_dir();
        let out = std::process::Command::new(crate::procs::bin("postern-relay"))
            .args(["certs", "init", "--dir"])
            .arg(dir.path())
            .output()
            .expect("run postern-relay certs init");
        assert!(
            out.status.success(),
            "certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = Ca::load(dir.path()).expect("load the CA certs init made");
        Self::around(dir, ca, 1)
    }

    /// The CA `ca` whose files are in `dir`, with the relay's server certificate.
    fn around(dir: TempDir, ca: Ca, days: u32) -> Self {
        let pki = Self {
            dir,
            ca,
            crl: Mutex::new(None),
            days,
        };
        pki.issue_server("relay");
        pki
    }

    /// The name of the CA (its certificate's subject common name).
    pub fn ca_name(&self) -> String {
        let der = CertificateDer::from_pem_file(self.ca()).expect("read ca.pem");
        postern_common::pki::issuer_name(&der).expect("CA name")
    }

    /// The directory holding every file (configs go here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// Issues `KIND-NAME.pem` / `KIND-NAME-key.pem` if not there yet; returns the base name.
    pub fn issue(&self, kind: Kind, name: &str) -> String {
        let base = format!("{}-{name}", kind.as_str());
        if !self.dir().join(format!("{base}.pem")).exists() {
            self.write(&base, &LeafSpec::new(kind, name, self.days));
        }
        base
    }

    /// Issues a server certificate `server-NAME` for `localhost` and `127.0.0.1`, for a TLS
    /// server other than the relay (e.g. [`MariaDb::start_with_tls`](crate::MariaDb::start_with_tls)),
    /// if not there yet; returns the base name.
    pub fn issue_server(&self, name: &str) -> String {
        let base = format!("{}-{name}", Kind::Server.as_str());
        if !self.dir().join(format!("{base}.pem")).exists() {
            let mut spec = LeafSpec::new(Kind::Server, name, self.days);
            spec.dns = vec!["localhost".into()];
            spec.ips = vec!["127.0.0.1".parse().expect("ip")];
            self.write(&base, &spec);
        }
        base
    }

    /// Issues a certificate that expired yesterday.
    pub fn issue_expired(&self, kind: Kind, name: &str) -> String {
        let base = format!("{}-{name}-expired", kind.as_str());
        let mut spec = LeafSpec::new(kind, name, 1);
        let now = OffsetDateTime::now_utc();
        spec.not_before = now - Duration::days(3);
        spec.not_after = now - Duration::days(1);
        self.write(&base, &spec);
        base
    }

    /// Writes `base.pem` and `base-key.pem` for `spec`.
    pub fn write(&self, base: &str, spec: &LeafSpec) {
        let issued = self.ca.issue(spec).expect("issue");
        std::fs::write(self.dir().join(format!("{base}.pem")), issued.cert_pem)
            .expect("write cert");
        std::fs::write(self.dir().join(format!("{base}-key.pem")), issued.key_pem)
            .expect("write key");
    }

    /// Paths of `base.pem` and `base-key.pem`.
    pub fn files(&self, base: &str) -> (PathBuf, PathBuf) {
        (
            self.dir().join(format!("{base}.pem")),
            self.dir().join(format!("{base}-key.pem")),
        )
    }

    /// Adds the certificates `bases` (e.g. `client-bob`) to the CA's revocation list and writes
    /// it to `crl.pem` (atomically, as an operator's `certs revoke` does); returns the path.
    pub fn revoke(&self, bases: &[&str]) -> PathBuf {
        let serials: Vec<_> = bases
            .iter()
            .map(|base| {
                let der = CertificateDer::from_pem_file(self.files(base).0).expect("read cert");
                postern_common::pki::serial_of(&der).expect("serial")
            })
            .collect();
        self.write_crl(&serials)
    }

    fn write_crl(&self, serials: &[Vec<u8>]) -> PathBuf {
        let mut last = self.crl.lock().unwrap_or_else(|p| p.into_inner());
        let pem = self.ca.revoke(last.as_deref(), serials).expect("revoke");
        let path = self.crl_path();
        let tmp = self.dir().join("crl.pem.tmp");
        std::fs::write(&tmp, &pem).expect("write crl");
        std::fs::rename(&tmp, &path).expect("rename crl");
        *last = Some(pem);
        path
    }

    /// Adds `count` made-up serial numbers to the revocation list (as a CA in use for years
    /// has revoked many certificates) and writes it; returns the path.
    pub fn revoke_unknown(&self, count: u32) -> PathBuf {
        let serials: Vec<Vec<u8>> = (0..count)
            .map(|i| {
                let mut serial = vec![0x7f, 0x50, 0x53];
                serial.extend_from_slice(&i.to_be_bytes());
                serial
            })
            .collect();
        self.write_crl(&serials)
    }

    /// Where [`revoke`](Self::revoke) writes the revocation list.
    pub fn crl_path(&self) -> PathBuf {
        self.dir().join("crl.pem")
    }

    /// TLS material of client `name` (issued on first use).
    pub fn client_material(&self, name: &str) -> Material {
        let base = self.issue(Kind::Client, name);
        self.material(&base)
    }

    /// TLS material for `base`.
    pub fn material(&self, base: &str) -> Material {
        let (cert, key) = self.files(base);
        Material::load(&self.ca(), &cert, &key).expect("load material")
    }
}

/// A fresh directory for a CA and everything issued from it.
fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("postern-pki")
        .tempdir()
        .expect("tempdir")
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
