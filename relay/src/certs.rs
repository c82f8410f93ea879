//! `postern-relay certs`: make a CA and issue agent, client and server certificates.
//!
//! Every CA gets its own name ("Postern CA" and 8 random hex digits unless `--name` says
//! otherwise). A verifier looks a certificate's CA up by name: were two CAs to share one, a
//! certificate from the other would fail on its signature ("decrypt error") instead of as a
//! certificate from an unknown CA, and refusals could not say which CA signed what. CAs made
//! before, all called "Postern CA", keep working.
//!
//! Files go to one directory (default `./certs`): `ca.pem`/`ca-key.pem`, and for a leaf
//! `KIND-NAME.pem`/`KIND-NAME-key.pem`. Keys are written with mode 0600 and never printed;
//! nothing is overwritten unless `--force` is given, and a refused command writes nothing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use postern_common::pki::{self, Ca, Kind, LeafSpec};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// What `certs init` does; returns the CA's name.
pub fn init(dir: &Path, days: u32, name: Option<&str>, force: bool) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let cert = dir.join("ca.pem");
    let key = dir.join("ca-key.pem");
    pki::check_absent(&[&cert, &key], force)?;
    let name = match name {
        Some(n) if n.trim().is_empty() => bail!("--name must not be empty"),
        Some(n) => n.to_owned(),
        None => pki::new_ca_name(),
    };
    let (ca, key_pem) = Ca::generate(&name, days)?;
    pki::write_private(&key, &key_pem, force)?;
    pki::write_public(&cert, &ca.cert_pem, force)?;
    println!("created CA {name:?} (valid {days} days)");
    println!(
        "  certificate: {}  (give this to agents, relays and clients)",
        cert.display()
    );
    println!(
        "  private key: {}  (keep it secret; only `certs issue` needs it)",
        key.display()
    );
    print_fingerprint(&cert)?;
    Ok(name)
}

/// What `certs issue` does.
pub fn issue(
    dir: &Path,
    kind: Kind,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    if kind == Kind::Server && dns.is_empty() && ips.is_empty() {
        bail!(
            "a server certificate needs at least one --dns NAME or --ip ADDR (what clients dial)"
        );
    }
    let ca = Ca::load(dir).with_context(|| {
        format!(
            "load the CA from {} (run `postern-relay certs init` first)",
            dir.display()
        )
    })?;
    let base = format!("{}-{name}", kind.as_str());
    let cert = dir.join(format!("{base}.pem"));
    let key = dir.join(format!("{base}-key.pem"));
    pki::check_absent(&[&cert, &key], force)?;
    let mut spec = LeafSpec::new(kind, name, days);
    spec.dns = dns.to_vec();
    spec.ips = ips.to_vec();
    let issued = ca.issue(&spec)?;
    pki::write_private(&key, &issued.key_pem, force)?;
    pki::write_public(&cert, &issued.cert_pem, force)?;
    match kind {
        Kind::Agent | Kind::Client => {
            println!(
                "issued {} certificate postern://{}/{name} (valid {days} days)",
                kind.as_str(),
                kind.as_str()
            );
        }
        Kind::Server => {
            let names: Vec<String> = dns
                .iter()
                .cloned()
                .chain(ips.iter().map(|i| i.to_string()))
                .collect();
            println!(
                "issued server certificate for {} (valid {days} days)",
                names.join(", ")
            );
        }
    }
    println!("  certificate: {}", cert.display());
    println!("  private key: {}", key.display());
    print_fingerprint(&cert)?;
    Ok((cert, key))
}

/// What `certs revoke` does: adds the certificates to `crl.pem` in `dir` (signed by the CA),
/// keeping what it already listed. A relay with `tls.crl` pointing at it picks it up without a
/// restart.
pub fn revoke(dir: &Path, certs: &[PathBuf]) -> Result<PathBuf> {
    let ca = Ca::load(dir).with_context(|| format!("load the CA from {}", dir.display()))?;
    let mut serials = Vec::new();
    for path in certs {
        let der = CertificateDer::from_pem_file(path)
            .with_context(|| format!("read {}", path.display()))?;
        let id = pki::identity_of(&der)
            .map(|i| i.to_string())
            .unwrap_or_else(|_| "(no identity)".into());
        serials.push(pki::serial_of(&der)?);
        println!("revoking {id} ({})", path.display());
    }
    let crl = dir.join("crl.pem");
    let previous = match std::fs::read_to_string(&crl) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", crl.display())),
    };
    let pem = ca.revoke(previous.as_deref(), &serials)?;
    // Replace atomically: a relay may be reading the file right now.
    let tmp = dir.join(".crl.pem.tmp");
    std::fs::write(&tmp, pem).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &crl).with_context(|| format!("write {}", crl.display()))?;
    println!(
        "  revocation list: {} (set tls.crl in relay.yaml to use it)",
        crl.display()
    );
    Ok(crl)
}

fn print_fingerprint(cert: &Path) -> Result<()> {
    let der =
        CertificateDer::from_pem_file(cert).with_context(|| format!("read {}", cert.display()))?;
    let digest = ring_sha256(&der);
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    println!("  sha256 fingerprint: {}", hex.join(":"));
    Ok(())
}

fn ring_sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name in the CA certificate (self-signed: its issuer is itself).
    fn ca_name(dir: &Path) -> Option<String> {
        let der = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
        pki::issuer_name(&der)
    }

    #[test]
    fn every_ca_gets_its_own_name() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let na = init(a.path(), 1, None, false).unwrap();
        let nb = init(b.path(), 1, None, false).unwrap();
        assert_ne!(na, nb);
        for (dir, name) in [(&a, &na), (&b, &nb)] {
            assert!(name.starts_with("Postern CA "), "{name}");
            assert_eq!(ca_name(dir.path()).as_ref(), Some(name));
        }
        let nc = init(c.path(), 1, Some("Orders CA"), false).unwrap();
        assert_eq!(nc, "Orders CA");
        assert_eq!(ca_name(c.path()).as_deref(), Some("Orders CA"));
        assert!(init(c.path(), 1, Some(" "), true).is_err());
    }
}
