//! Certificates for tests, made at test time with Postern's own PKI code.

use std::path::{Path, PathBuf};

use postern_common::pki::{Ca, Kind, LeafSpec};
use postern_common::tls::Material;
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

/// A CA in a temp dir, with a relay server certificate (`localhost`, `127.0.0.1`).
pub struct TestPki {
    dir: TempDir,
    ca: Ca,
}

impl TestPki {
    /// Makes a CA and the relay's server certificate `server-relay`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-pki")
            .tempdir()
            .expect("tempdir");
        let (ca, key) = Ca::generate(&format!("Test CA {}", rand::random::<u32>()), 1).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("write ca");
        std::fs::write(dir.path().join("ca-key.pem"), key).expect("write ca key");
        let pki = Self { dir, ca };
        let mut spec = LeafSpec::new(Kind::Server, "relay", 1);
        spec.dns = vec!["localhost".into()];
        spec.ips = vec!["127.0.0.1".parse().expect("ip")];
        pki.write("server-relay", &spec);
        pki
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
            self.write(&base, &LeafSpec::new(kind, name, 1));
        }
        base
    }

    /// Issues a server certificate `server-NAME` for `localhost` and `127.0.0.1`, for a TLS
    /// server other than the relay (e.g. [`MariaDb::start_with_tls`](crate::MariaDb::start_with_tls)),
    /// if not there yet; returns the base name.
    pub fn issue_server(&self, name: &str) -> String {
        let base = format!("{}-{name}", Kind::Server.as_str());
        if !self.dir().join(format!("{base}.pem")).exists() {
            let mut spec = LeafSpec::new(Kind::Server, name, 1);
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

    /// A `tls:` YAML block using `base`.
    pub fn tls_yaml(&self, base: &str) -> String {
        let (cert, key) = self.files(base);
        format!(
            "tls:\n  ca: {}\n  cert: {}\n  key: {}\n",
            self.ca().display(),
            cert.display(),
            key.display()
        )
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

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
