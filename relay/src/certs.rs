//! `postern-relay certs`: make a CA and issue agent, client and server certificates.
//!
//! Every CA gets its own name ("Postern CA" and 8 random hex digits unless `--name` says
//! otherwise). A verifier looks a certificate's CA up by name: were two CAs to share one, a
//! certificate from the other would fail on its signature ("decrypt error") instead of as a
//! certificate from an unknown CA, and refusals could not say which CA signed what. CAs made
//! before, all called "Postern CA", keep working.
//!
//! Files go to one directory (default `./certs`): `ca.pem`/`ca-key.pem`, and for a leaf
//! `KIND-NAME.pem`/`KIND-NAME-key.pem`. Keys are written with mode 0600 and never printed
//! (but for `--cf-ups`, whose whole point is the credentials); nothing is overwritten unless
//! `--force` is given, and a refused command writes nothing.
//!
//! An intermediate CA (`certs issue intermediate NAME`: `intermediate-NAME.pem`, holding its
//! certificate only, and `intermediate-NAME-key.pem`) is signed by the root, so that a key that
//! must be online, the service broker's, is not the root's: the root key can stay offline.
//! `certs issue KIND NAME --issuer NAME` signs with it; the leaf's file then holds the chain
//! (leaf, then intermediate), which clients send whole. Peers still trust `ca.pem` only.
//! Revoking the intermediate (`certs revoke intermediate-NAME.pem`) refuses all its leaves.
//!
//! `certs issue client NAME --cf-ups SERVICE` also prints, on stdout, the credentials of a Cloud
//! Foundry user-provided service ([`postern_common::binding::Credentials`], the fields a broker
//! binding carries) for platforms where no broker may be registered.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use postern_common::binding::{Credentials, Spec};
use postern_common::pki::{self, Ca, Issued, Kind, LeafSpec};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::cli::UpsArgs;

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
    print_fingerprint(&cert, &mut std::io::stdout())?;
    Ok(name)
}

/// What `certs issue` is asked to make (agent, client and server certificates).
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    /// Where the CA is and the files go.
    pub dir: &'a Path,
    /// Agent, client or server.
    pub kind: Kind,
    /// The identity name, or the server's label.
    pub name: &'a str,
    /// DNS names (servers).
    pub dns: &'a [String],
    /// IP addresses (servers).
    pub ips: &'a [IpAddr],
    /// Lifetime in days.
    pub days: u32,
    /// Overwrite existing files.
    pub force: bool,
    /// Sign with intermediate CA `intermediate-NAME` in `dir` instead of the root.
    pub issuer: Option<&'a str>,
}

/// What `certs issue` made.
#[derive(Debug)]
pub struct IssuedFiles {
    /// The certificate file (the chain when an intermediate signed it).
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
    /// The certificate and key.
    pub issued: Issued,
}

/// What `certs issue` does; says what it made on `out`.
pub fn issue(req: &IssueRequest<'_>, out: &mut dyn Write) -> Result<IssuedFiles> {
    let (dir, kind, name, days) = (req.dir, req.kind, req.name, req.days);
    if kind == Kind::Server && req.dns.is_empty() && req.ips.is_empty() {
        bail!(
            "a server certificate needs at least one --dns NAME or --ip ADDR (what clients dial)"
        );
    }
    let ca = match req.issuer {
        None => Ca::load(dir).with_context(|| {
            format!(
                "load the CA from {} (run `postern-relay certs init` first)",
                dir.display()
            )
        })?,
        Some(issuer) => {
            let (cert, key) = files(dir, "intermediate", issuer);
            Ca::load_files(&cert, &key).with_context(|| {
                format!(
                    "load intermediate CA {issuer:?} from {} (make it with `postern-relay certs issue intermediate {issuer}`)",
                    dir.display()
                )
            })?
        }
    };
    let (cert, key) = files(dir, kind.as_str(), name);
    pki::check_absent(&[&cert, &key], req.force)?;
    let mut spec = LeafSpec::new(kind, name, days);
    spec.dns = req.dns.to_vec();
    spec.ips = req.ips.to_vec();
    let issued = ca.issue(&spec)?;
    pki::write_private(&key, &issued.key_pem, req.force)?;
    pki::write_public(&cert, &issued.cert_pem, req.force)?;
    let valid = format!("valid until {}", issued.expires_at());
    match kind {
        Kind::Agent | Kind::Client => {
            writeln!(
                out,
                "issued {} certificate postern://{}/{name} ({valid})",
                kind.as_str(),
                kind.as_str()
            )?;
        }
        Kind::Server => {
            let names: Vec<String> = req
                .dns
                .iter()
                .cloned()
                .chain(req.ips.iter().map(|i| i.to_string()))
                .collect();
            writeln!(
                out,
                "issued server certificate for {} ({valid})",
                names.join(", ")
            )?;
        }
    }
    if !ca.is_root() {
        writeln!(
            out,
            "  signed by intermediate CA {:?}; the certificate file holds the chain (leaf, then intermediate)",
            ca.name()
        )?;
    }
    writeln!(out, "  certificate: {}", cert.display())?;
    writeln!(out, "  private key: {}", key.display())?;
    print_fingerprint(&cert, out)?;
    Ok(IssuedFiles { cert, key, issued })
}

/// What `certs issue intermediate NAME` does: an intermediate CA signed by the root in `dir`,
/// written to `intermediate-NAME.pem` (its certificate) and `intermediate-NAME-key.pem`.
pub fn issue_intermediate(
    dir: &Path,
    name: &str,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    let root = Ca::load(dir).with_context(|| {
        format!(
            "load the CA from {} (run `postern-relay certs init` first)",
            dir.display()
        )
    })?;
    let (cert, key) = files(dir, "intermediate", name);
    pki::check_absent(&[&cert, &key], force)?;
    let (ca, key_pem) = root.intermediate(name, days)?;
    pki::write_private(&key, &key_pem, force)?;
    pki::write_public(&cert, &ca.cert_pem, force)?;
    let until = pki::rfc3339(ca.not_after());
    println!(
        "issued intermediate CA {:?}, signed by {:?} (valid until {until})",
        ca.name(),
        root.name()
    );
    println!(
        "  certificate: {}  (the relay's broker signs with it; peers still trust ca.pem only)",
        cert.display()
    );
    println!(
        "  private key: {}  (the signing key that may be online; ca-key.pem can now stay offline)",
        key.display()
    );
    println!(
        "  issue with it: postern-relay certs issue client NAME --issuer {name} --dir {}",
        dir.display()
    );
    print_fingerprint(&cert, &mut std::io::stdout())?;
    Ok((cert, key))
}

/// The password, username and endpoint of `--cf-ups`, checked before anything is written.
#[derive(Clone)]
pub struct UpsPlan {
    service: String,
    instance: String,
    host: String,
    port: u16,
    local_port: Option<u16>,
    database: String,
    username: String,
    password: String,
    relays: Vec<String>,
    server_name: Option<String>,
    jdbc_url: bool,
}

impl UpsPlan {
    /// Checks `args` (given `--cf-ups SERVICE`) and reads the password.
    pub fn new(service: &str, args: &UpsArgs) -> Result<Self> {
        pki::check_name(service).context("--cf-ups SERVICE")?;
        let password = match (&args.password_env, &args.password_file) {
            (Some(var), _) => std::env::var(var).with_context(|| {
                format!("--password-env {var}: the environment variable is not set (or not UTF-8)")
            })?,
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("--password-file {}", file.display()))?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                text.strip_suffix('\r').unwrap_or(text).to_owned()
            }
            (None, None) => bail!(
                "--cf-ups needs the MySQL password from --password-env VAR or --password-file FILE \
                 (never on the command line; an empty one: --password-file /dev/null)"
            ),
        };
        let Some(username) = args.username.clone().filter(|u| !u.is_empty()) else {
            bail!("--cf-ups needs --username (the MySQL user apps log in as)");
        };
        if args.relays.is_empty() {
            bail!(
                "--cf-ups needs at least one --relay URL (quic://HOST:PORT or wss://HOST), which the sidecar dials"
            );
        }
        let (host, port) = match (args.local_port, &args.host) {
            (Some(0), _) => bail!("--local-port must not be 0"),
            (Some(p), _) => ("127.0.0.1".to_owned(), p),
            (None, Some(h)) if !h.is_empty() => (h.clone(), args.port),
            (None, _) => bail!(
                "--cf-ups needs --host (where apps reach the relay's MySQL listener) or --local-port (apps connect to the sidecar)"
            ),
        };
        Ok(Self {
            service: service.to_owned(),
            instance: args
                .cf_instance
                .clone()
                .unwrap_or_else(|| service.to_owned()),
            host,
            port,
            local_port: args.local_port,
            database: args.database.clone(),
            username,
            password,
            relays: args.relays.clone(),
            server_name: args.server_name.clone().filter(|s| !s.is_empty()),
            jdbc_url: !args.no_jdbc_url,
        })
    }

    /// The credentials for client `identity`'s certificate, and the CA in `dir` (`ca.pem`,
    /// which signed the relay's certificate).
    pub fn credentials(&self, dir: &Path, identity: &str, issued: &Issued) -> Result<Credentials> {
        let ca = dir.join("ca.pem");
        let ca_pem =
            std::fs::read_to_string(&ca).with_context(|| format!("read {}", ca.display()))?;
        Ok(Credentials::new(&Spec {
            service: self.service.clone(),
            identity: identity.to_owned(),
            host: self.host.clone(),
            port: self.port,
            local_port: self.local_port,
            database: self.database.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            ca_pem,
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone(),
            relays: self.relays.clone(),
            server_name: self.server_name.clone(),
            jdbc_url: self.jdbc_url,
            expires_at: Some(issued.expires_at()),
        }))
    }

    /// The one-line `cf` command that makes the service from the printed JSON: with the path
    /// of stdout when it is a file, else with FILE standing for it.
    pub fn hint(&self) -> String {
        let file = std::fs::read_link("/proc/self/fd/1")
            .ok()
            .filter(|p| p.is_absolute() && std::fs::metadata(p).is_ok_and(|m| m.is_file()));
        match file {
            Some(path) => format!(
                "create the service with: cf create-user-provided-service {} -t mysql -p {}",
                self.instance,
                shell_quote(&path.display().to_string())
            ),
            None => format!(
                "save the JSON above to FILE (it holds the private key and the password) and run: cf create-user-provided-service {} -t mysql -p FILE",
                self.instance
            ),
        }
    }
}

impl std::fmt::Debug for UpsPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpsPlan")
            .field("service", &self.service)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn files(dir: &Path, kind: &str, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{kind}-{name}.pem")),
        dir.join(format!("{kind}-{name}-key.pem")),
    )
}

/// What `certs revoke` does: adds the certificates to `crl.pem` in `dir`, keeping what it
/// already listed. The list is signed by the CA that signed the certificates: the root, or with
/// `issuer` the intermediate CA `intermediate-NAME` (a list covers only what its signer
/// signed, so each CA's list is kept in `crl.pem`, one after the other). A relay with `tls.crl`
/// pointing at it picks it up without a restart.
pub fn revoke(dir: &Path, certs: &[PathBuf], issuer: Option<&str>) -> Result<PathBuf> {
    let ca = match issuer {
        None => Ca::load(dir).with_context(|| format!("load the CA from {}", dir.display()))?,
        Some(name) => {
            let (cert, key) = files(dir, "intermediate", name);
            Ca::load_files(&cert, &key)
                .with_context(|| format!("load intermediate CA {name:?} from {}", dir.display()))?
        }
    };
    let mut serials = Vec::new();
    for path in certs {
        let der = CertificateDer::from_pem_file(path)
            .with_context(|| format!("read {}", path.display()))?;
        let signer = pki::issuer_name(&der).unwrap_or_default();
        if signer != ca.name() {
            bail!(
                "{} was signed by {signer:?}, not by {:?}, whose list this would be: {}",
                path.display(),
                ca.name(),
                match issuer {
                    None => "for a certificate an intermediate signed, add --issuer NAME",
                    Some(_) => "give the --issuer that signed it, or none for the root",
                }
            );
        }
        let id = pki::identity_of(&der)
            .map(|i| i.to_string())
            .unwrap_or_else(|_| "(no identity)".into());
        serials.push(pki::serial_of(&der)?);
        println!("revoking {id} ({})", path.display());
    }
    let crl = dir.join("crl.pem");
    let text = match std::fs::read_to_string(&crl) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", crl.display())),
    };
    // Each CA's list in turn; this CA's is replaced, the others kept as they are.
    let mut lists = Vec::new();
    let mut previous = None;
    for block in crl_blocks(&text) {
        let by = pki::crl_issuer_name(&block).with_context(|| format!("read {}", crl.display()))?;
        if by == ca.name() {
            previous = Some(block);
        } else {
            lists.push(block);
        }
    }
    lists.push(ca.revoke(previous.as_deref(), &serials)?);
    // Replace atomically: a relay may be reading the file right now.
    let tmp = dir.join(".crl.pem.tmp");
    std::fs::write(&tmp, lists.concat()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &crl).with_context(|| format!("write {}", crl.display()))?;
    println!(
        "  revocation list: {} (set tls.crl in relay.yaml to use it)",
        crl.display()
    );
    Ok(crl)
}

/// The PEM blocks of revocation lists in `text`, each with its END line and a newline.
fn crl_blocks(text: &str) -> Vec<String> {
    const END: &str = "-----END X509 CRL-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(END) {
        let (block, tail) = rest.split_at(at + END.len());
        if let Some(start) = block.find("-----BEGIN X509 CRL-----") {
            out.push(format!("{}\n", &block[start..]));
        }
        rest = tail;
    }
    out
}

fn print_fingerprint(cert: &Path, out: &mut dyn Write) -> Result<()> {
    let der =
        CertificateDer::from_pem_file(cert).with_context(|| format!("read {}", cert.display()))?;
    let digest = ring_sha256(&der);
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    writeln!(out, "  sha256 fingerprint: {}", hex.join(":"))?;
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
