//! The `certs` subcommand of the real binary: files, modes, refusals, revocation.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use postern_tests::procs::bin;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

fn certs(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("postern-relay"))
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn init_issue_and_revoke_make_the_files_a_deployment_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let out = certs(&dir, &["init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("sha256 fingerprint"), "{stdout}");

    for args in [
        vec![
            "issue",
            "server",
            "relay",
            "--dns",
            "relay.example.com",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
        vec!["issue", "agent", "db-host-1"],
        vec!["issue", "client", "alice", "--days", "7"],
    ] {
        let out = certs(&dir, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(!printed.contains("PRIVATE KEY"), "keys are never printed");
    }
    for (cert, key) in [
        ("ca.pem", "ca-key.pem"),
        ("server-relay.pem", "server-relay-key.pem"),
        ("agent-db-host-1.pem", "agent-db-host-1-key.pem"),
        ("client-alice.pem", "client-alice-key.pem"),
    ] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
        assert!(dir.join(cert).is_file());
    }
    let alice = CertificateDer::from_pem_file(dir.join("client-alice.pem")).unwrap();
    assert_eq!(
        postern_common::pki::identity_of(&alice)
            .unwrap()
            .to_string(),
        "postern://client/alice"
    );

    // Nothing is overwritten without --force, and a refused command writes nothing.
    let before = std::fs::read(dir.join("client-alice-key.pem")).unwrap();
    let out = certs(&dir, &["issue", "client", "alice"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists (use --force to overwrite)")
    );
    assert_eq!(
        std::fs::read(dir.join("client-alice-key.pem")).unwrap(),
        before
    );
    let out = certs(&dir, &["init"]);
    assert!(!out.status.success());
    assert!(
        certs(&dir, &["issue", "client", "alice", "--force"])
            .status
            .success()
    );
    assert_ne!(
        std::fs::read(dir.join("client-alice-key.pem")).unwrap(),
        before
    );

    // A server certificate needs a name clients can verify.
    let out = certs(&dir, &["issue", "server", "bare"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dns"));

    // Revocation accumulates in crl.pem.
    let alice_path = dir.join("client-alice.pem");
    assert!(
        certs(&dir, &["revoke", alice_path.to_str().unwrap()])
            .status
            .success()
    );
    let agent_path = dir.join("agent-db-host-1.pem");
    let out = certs(&dir, &["revoke", agent_path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crl =
        rustls_pki_types::CertificateRevocationListDer::from_pem_file(dir.join("crl.pem")).unwrap();
    let (_, parsed) = x509_parser::parse_x509_crl(&crl).unwrap();
    let listed: Vec<Vec<u8>> = parsed
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    let serial = |p: &std::path::Path| {
        postern_common::pki::serial_of(&CertificateDer::from_pem_file(p).unwrap()).unwrap()
    };
    assert_eq!(
        listed,
        vec![serial(&alice_path), serial(&agent_path)],
        "both certificates are listed"
    );
}
