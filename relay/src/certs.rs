//! `postern-relay certs`: make a CA and issue agent, client and server certificates.
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

/// What `certs init` does.
pub fn init(dir: &Path, days: u32, force: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let cert = dir.join("ca.pem");
    let key = dir.join("ca-key.pem");
    pki::check_absent(&[&cert, &key], force)?;
    let (ca, key_pem) = Ca::generate("Postern CA", days)?;
    pki::write_private(&key, &key_pem, force)?;
    pki::write_public(&cert, &ca.cert_pem, force)?;
    println!("created CA (valid {days} days)");
    println!(
        "  certificate: {}  (give this to agents, relays and clients)",
        cert.display()
    );
    println!(
        "  private key: {}  (keep it secret; only `certs issue` needs it)",
        key.display()
    );
    print_fingerprint(&cert)?;
    Ok(())
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
