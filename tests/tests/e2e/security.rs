//! Certificates that must be refused, each with a log line that says why, while everyone else
//! keeps working.

use std::sync::Arc;
use std::time::Duration;

use postern_common::pki::Kind;
use postern_tests::procs::RelayProc;
use postern_tests::*;
use tokio::io::AsyncReadExt;

async fn start_relay(pki: &TestPki) -> RelayProc {
    RelayProc::start(pki.dir(), &relay_yaml(pki, "db1", "orders", &["alice"])).await
}

async fn wait_log(relay: &RelayProc, needle: &str) -> String {
    relay.wait_log(needle).await
}

/// Connects to the TLS-first listener with `material` (or no client certificate) and returns the
/// first packet's bytes, or the error.
async fn tls_client(
    pki: &TestPki,
    port: u16,
    material: Option<postern_common::tls::Material>,
) -> Result<Vec<u8>, String> {
    let cfg = match material {
        Some(m) => postern_common::tls::listener_client(&m).unwrap(),
        None => {
            let roots = pki.material("server-relay").roots;
            rustls::ClientConfig::builder_with_provider(postern_common::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 4];
    conn.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_with_reasons_and_disturb_no_one() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    pki.issue(Kind::Client, "mallory");
    let db = MariaDb::start().await;
    let relay = start_relay(&pki).await;
    let tls_port = relay.listener("orders", "tls").port();
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    let good = || async {
        matches!(tls_client(&pki, tls_port, Some(pki.client_material("alice"))).await, Ok(b) if b[0] == 10)
    };
    assert!(good().await);

    // An agent certificate from another CA.
    // It trusts the relay's CA, so the relay is the side that refuses.
    let other = TestPki::new();
    other.issue(Kind::Agent, "db1");
    let (cert, key) = other.files("agent-db1");
    let (good_cert, good_key) = pki.files("agent-db1");
    let yaml = agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend())
        .replace(good_cert.to_str().unwrap(), cert.to_str().unwrap())
        .replace(good_key.to_str().unwrap(), key.to_str().unwrap());
    let foreign = AgentRun::start(other.dir(), &yaml);
    let line = wait_log(&relay, "unknown issuer").await;
    assert!(line.contains("refused connection"), "{line}");
    foreign.stop().await;

    // An expired agent certificate.
    let base = pki.issue_expired(Kind::Agent, "db1");
    let dir = tempfile::tempdir().unwrap();
    let yaml = agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend())
        .replace("agent-db1.pem", &format!("{base}.pem"))
        .replace("agent-db1-key.pem", &format!("{base}-key.pem"));
    let expired = AgentRun::start(dir.path(), &yaml);
    let line = wait_log(&relay, "certificate has expired").await;
    assert!(line.contains("refused connection"), "{line}");
    expired.stop().await;

    // A client certificate not allowed for the service: the client sees a MySQL error.
    let got = tls_client(&pki, tls_port, Some(pki.client_material("mallory")))
        .await
        .unwrap();
    assert_eq!(got[0], 0xff, "an ERR packet");
    assert_eq!(u16::from_le_bytes([got[1], got[2]]), 1045);
    let text = String::from_utf8_lossy(&got[9..]).into_owned();
    assert!(
        text.contains("postern://client/mallory is not allowed to use service \"orders\""),
        "{text}"
    );
    let line = wait_log(&relay, "mallory is not allowed").await;
    assert!(line.contains("refused"), "{line}");

    // A client with no certificate at all.
    assert!(tls_client(&pki, tls_port, None).await.is_err());
    let line = wait_log(&relay, "client presented no certificate").await;
    assert!(line.contains("tls handshake failed"), "{line}");

    // An expired client certificate.
    let base = pki.issue_expired(Kind::Client, "alice");
    assert!(
        tls_client(&pki, tls_port, Some(pki.material(&base)))
            .await
            .is_err()
    );
    wait_log(&relay, "tls handshake failed").await;

    // Through all of this the good agent stayed connected and good clients are served.
    assert!(matches!(
        *agent.status.borrow(),
        postern_agent::Status::Connected { .. }
    ));
    assert!(good().await);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_client_not_allowed_sees_a_mysql_error() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    let db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    let c = ConnectRun::start(&pki, relay.quic, "mallory", "orders").await;
    let out = std::process::Command::new(mariadb::find("mariadb"))
        .args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "--protocol=TCP",
            "-uroot",
            "-e",
            "SELECT 1",
        ])
        .arg(format!("-P{}", c.addr.port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The client names the error number and shows the relay's reason.
    assert!(
        err.contains("1045") && err.contains("mallory is not allowed to use service"),
        "{err}"
    );
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_without_restarting_the_relay() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    pki.issue(Kind::Client, "bob");
    let db = MariaDb::start().await;
    // Start with a list that revokes someone else.
    let ca = postern_common::pki::Ca::from_pem(
        &std::fs::read_to_string(pki.ca()).unwrap(),
        &std::fs::read_to_string(pki.dir().join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let serial = |base: &str| {
        let der = rustls_pki_types::pem::PemObject::from_pem_file(pki.files(base).0).unwrap();
        postern_common::pki::serial_of(&der).unwrap()
    };
    let crl_path = pki.dir().join("crl.pem");
    let first = ca.revoke(None, &[serial("client-bob")]).unwrap();
    std::fs::write(&crl_path, &first).unwrap();
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice", "bob"]).replace(
        "heartbeat_interval:",
        &format!("  crl: {}\nheartbeat_interval:", crl_path.display()),
    );
    let relay = RelayRun::start(pki.dir(), &yaml).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    let port = relay.tls_service("orders").port();

    // bob is already revoked; alice is served.
    assert!(
        tls_client(&pki, port, Some(pki.client_material("bob")))
            .await
            .is_err()
    );
    let alice = tls_client(&pki, port, Some(pki.client_material("alice")))
        .await
        .unwrap();
    assert_eq!(alice[0], 10);

    // Revoke alice: written next to the relay's config, picked up within a few seconds.
    let second = ca.revoke(Some(&first), &[serial("client-alice")]).unwrap();
    std::fs::write(pki.dir().join("crl.tmp"), second).unwrap();
    std::fs::rename(pki.dir().join("crl.tmp"), &crl_path).unwrap();
    eventually(Duration::from_secs(6), "alice to be refused", || async {
        tls_client(&pki, port, Some(pki.client_material("alice")))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // New QUIC sessions with alice's certificate are refused too.
    let target = postern_agent::config::RelayTarget {
        quic: Some(format!("quic://{}", relay.quic).parse().unwrap()),
        websocket: None,
    };
    let err = ConnectRun::start_with(
        &pki,
        target,
        postern_agent::config::TransportChoice::Quic,
        Default::default(),
        "alice",
        "orders",
    )
    .await
    .err()
    .map(|e| format!("{e:#}"));
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("CertificateRevoked") || e.contains("revoked")),
        "{err:?}"
    );
    // The agent was never disturbed.
    assert!(matches!(
        *agent.status.borrow(),
        postern_agent::Status::Connected { .. }
    ));
    agent.stop().await;
    relay.stop().await;
}

/// Two CAs made by `certs init`, as an operator makes them: a client certificate from the other
/// one is refused as coming from an unknown CA (not as a failed signature, which is what CAs of
/// the same name gave), the relay's log names both CAs, and the client is told its CA is not
/// trusted, over QUIC and over the MySQL listener's TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_postern_ca_is_refused_as_from_an_unknown_ca() {
    use postern_common::transport::{CloseReason, Liveness, quic};
    use std::process::Command;
    use tokio::io::AsyncWriteExt;

    init_logging();
    let certs = |dir: &std::path::Path, args: &[&str]| {
        let out = Command::new(procs::bin("postern-relay"))
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca_name = |dir: &std::path::Path| {
        let der = rustls_pki_types::pem::PemObject::from_pem_file(dir.join("ca.pem")).unwrap();
        postern_common::pki::issuer_name(&der).unwrap()
    };
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ours, theirs) = (ours.path(), theirs.path());
    certs(ours, &["init"]);
    certs(
        ours,
        &[
            "issue",
            "server",
            "relay",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
    );
    certs(ours, &["issue", "agent", "db1"]);
    certs(theirs, &["init"]);
    certs(theirs, &["issue", "client", "alice"]);
    let (trusted, foreign) = (ca_name(ours), ca_name(theirs));
    assert_ne!(trusted, foreign);

    let db = MariaDb::start().await;
    let tls = |dir: &std::path::Path, base: &str| {
        format!(
            "tls:\n  ca: {}\n  cert: {}\n  key: {}\n",
            dir.join("ca.pem").display(),
            dir.join(format!("{base}.pem")).display(),
            dir.join(format!("{base}-key.pem")).display()
        )
    };
    let relay = RelayProc::start(
        ours,
        &format!(
            "listen:\n  quic: 127.0.0.1:0\n  http: 127.0.0.1:0\n{}heartbeat_interval: 1s\nhandshake_timeout: 5s\nagents:\n  db1:\n    services: [orders]\nservices:\n  orders:\n    listen: 127.0.0.1:0\n    clients: [alice]\n",
            tls(ours, "server-relay")
        ),
    )
    .await;
    let mut agent = AgentRun::start(
        ours,
        &format!(
            "relay: quic://{}\nserver_name: localhost\n{}services:\n  orders:\n    backend: {}\n",
            relay.quic,
            tls(ours, "agent-db1"),
            db.backend()
        ),
    );
    agent.wait_connected().await;
    let named_both = |line: &str| {
        line.contains("unknown CA")
            && line.contains(&format!("{foreign:?}"))
            && line.contains(&format!("{trusted:?}"))
            && !line.contains("decrypt")
    };

    // Over QUIC: alice of the other CA, trusting our relay.
    let alice = postern_common::tls::Material::load(
        &ours.join("ca.pem"),
        &theirs.join("client-alice.pem"),
        &theirs.join("client-alice-key.pem"),
    )
    .unwrap();
    let ep = quic::client(relay.quic, &alice, Liveness::CONNECT).unwrap();
    let seen = match ep.connect(relay.quic, "localhost").await {
        Err(e) => e.close_reason().cloned().expect("a refusal"),
        Ok(session) => {
            // TLS 1.3 lets the client finish first; the refusal ends the session.
            if let Ok(mut s) = session.open().await {
                let _ = s.write_all(b"?").await;
            }
            tokio::time::timeout(Duration::from_secs(5), session.closed())
                .await
                .expect("the relay ends the session")
        }
    };
    let CloseReason::Tls(f) = &seen else {
        panic!("not a tls refusal: {seen}");
    };
    assert_eq!(
        f.to_string(),
        format!(
            "the peer does not trust the CA that issued our certificate (unknown CA: ours is {foreign:?})"
        )
    );
    let line = wait_log(&relay, "refused connection").await;
    assert!(named_both(&line), "{line}");

    // Over the MySQL listener's TLS, with the MariaDB client.
    let port = relay.listener("orders", "mysql").port();
    let args = [
        format!("--ssl-ca={}", ours.join("ca.pem").display()),
        "--ssl-verify-server-cert".to_owned(),
        format!("--ssl-cert={}", theirs.join("client-alice.pem").display()),
        format!(
            "--ssl-key={}",
            theirs.join("client-alice-key.pem").display()
        ),
    ];
    let err = crate::mysql_tls::failed(&crate::mysql_tls::cli(port, "root", &args, "SELECT 1"));
    assert!(err.to_lowercase().contains("unknown ca"), "{err}");
    assert!(!err.to_lowercase().contains("decrypt"), "{err}");
    let line = wait_log(&relay, "refused client: tls handshake failed").await;
    assert!(named_both(&line), "{line}");
    agent.stop().await;
}
