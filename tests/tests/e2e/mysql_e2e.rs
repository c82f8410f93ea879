//! End-to-end TLS (`tls_termination: agent`): stock MySQL clients dial the relay, but TLS ends
//! at the agent, which presents the service certificate (carrying the relay's names), verifies
//! the client and applies the policy the relay sent it. The relay only carries ciphertext.
//!
//! That the relay cannot see the client's bytes is shown without any hook into it: clients dial
//! 127.0.0.1 and verify the server's name (VERIFY_IDENTITY), the service certificate at the
//! agent is the only one valid for that address, and the relay's own certificate is not (a
//! control service whose TLS ends at the relay is refused by the same client). A client that
//! logs in has therefore done TLS with the holder of the service key, the agent; the relay,
//! which holds neither that certificate nor its key, carried only ciphertext.

use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::*;
use postern_common::pki::{Kind, LeafSpec};
use postern_tests::procs::Proc;
use postern_tests::*;

use crate::mysql_tls::{cli, driver_opts, failed, ok, ssl_args};

/// Issues `server-orders`: the certificate the agent presents for service `orders`. Clients
/// dial the relay, so it carries the address they dial (here `127.0.0.1`).
fn service_certificate(pki: &TestPki) -> String {
    let mut spec = LeafSpec::new(Kind::Server, "orders", 1);
    spec.ips = vec!["127.0.0.1".parse().expect("ip")];
    pki.write("server-orders", &spec);
    "server-orders".into()
}

/// Replaces the relay's certificate with one for `localhost` only (agents dial it by that
/// name), so that no certificate the relay holds is valid for the address clients dial.
fn relay_certificate_without_the_client_address(pki: &TestPki) {
    let mut spec = LeafSpec::new(Kind::Server, "relay", 1);
    spec.dns = vec!["localhost".into()];
    pki.write("server-relay", &spec);
}

/// Relay YAML: agent `db1` serves `services` (YAML, indented by two spaces).
fn relay_yaml(pki: &TestPki, offered: &str, services: &str) -> String {
    format!(
        "listen:\n  quic: 127.0.0.1:0\n{tls}heartbeat_interval: 5s\nhandshake_timeout: 5s\n\
         agents:\n  db1:\n    services: [{offered}]\nservices:\n{services}",
        tls = pki.tls_yaml("server-relay"),
    )
}

/// Agent YAML for `db1` at `relay`: `services` (YAML, indented by two spaces).
fn agent_yaml(pki: &TestPki, relay: std::net::SocketAddr, services: &str) -> String {
    format!(
        "relay: quic://{relay}\nserver_name: localhost\n{tls}services:\n{services}",
        tls = pki.tls_yaml("agent-db1"),
    )
}

/// `services.orders.tls` of the agent.
fn agent_tls(pki: &TestPki, base: &str) -> String {
    let (cert, key) = pki.files(base);
    format!(
        "    tls: {{ cert: {}, key: {} }}\n",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_tls_runs_queries_and_keeps_the_relay_blind() {
    init_logging();
    let db = MariaDb::start().await;
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let cert = service_certificate(&pki);
    relay_certificate_without_the_client_address(&pki);
    let relay = RelayRun::start(
        pki.dir(),
        &relay_yaml(
            &pki,
            "orders, plain",
            "  orders:\n    listen: 127.0.0.1:0\n    clients: [alice]\n    tls_termination: agent\n    \
             allowed_users:\n      alice: [root, app]\n    client_attribute: true\n  \
             plain:\n    listen: 127.0.0.1:0\n    clients: [alice]\n",
        ),
    )
    .await;
    let backend = db.backend();
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(
            &pki,
            relay.quic,
            &format!(
                "  orders:\n    backend: {backend}\n{tls}  plain:\n    backend: {backend}\n",
                tls = agent_tls(&pki, &cert)
            ),
        ),
    );
    agent.wait_connected().await;
    relay.wait_agent("db1").await;
    let password = "e2e-Pa55word-never-at-the-relay";
    db.sql(&format!(
        "CREATE USER 'app'@'%' IDENTIFIED BY '{password}'; GRANT ALL ON *.* TO 'app'@'%'; \
         CREATE USER 'other'@'%' IDENTIFIED BY 'other-pass'; GRANT ALL ON *.* TO 'other'@'%';"
    ));
    let (orders, plain) = (
        relay.service("orders").port(),
        relay.service("plain").port(),
    );
    let alice = ssl_args(&pki, Some("client-alice"));
    let mut with_password = alice.clone();
    with_password.push(format!("--password={password}"));

    // The control: where TLS ends at the relay, the client that verifies the name it dials
    // refuses the relay's certificate. So does the driver.
    let err = failed(&cli(plain, "app", &with_password, "SELECT 1"));
    assert!(
        err.contains("2026") || err.contains("TLS/SSL error"),
        "{err}"
    );
    Conn::new(driver_opts(&pki, plain, "client-alice", "root", ""))
        .await
        .expect_err("the relay's certificate is not valid for 127.0.0.1");

    // End to end: the mariadb CLI verifies the agent's certificate by the address it dials.
    let out = ok(&cli(
        orders,
        "app",
        &with_password,
        "SELECT 'e2e-marker-0815', CURRENT_USER(); \
         SELECT ATTR_VALUE FROM performance_schema.session_connect_attrs \
         WHERE PROCESSLIST_ID = CONNECTION_ID() AND ATTR_NAME = 'postern_client'",
    ));
    assert!(out.starts_with("e2e-marker-0815\tapp@%\n"), "{out}");
    let status = ok(
        &crate::mysql_tls::client("mariadb", orders, "app", &with_password)
            .args(["-e", "status"])
            .output()
            .unwrap(),
    );
    assert!(status.contains("Cipher in use is"), "{status}");

    // The Rust driver with a client identity; then COM_CHANGE_USER, checked at the agent.
    let mut conn = Conn::new(driver_opts(&pki, orders, "client-alice", "root", ""))
        .await
        .expect("driver through end-to-end TLS");
    let got: Option<String> = conn
        .query_first("SELECT CONCAT('driver-', 'result'), 'driver-marker-2718'")
        .await
        .unwrap()
        .map(|(a, _): (String, String)| a);
    assert_eq!(got.as_deref(), Some("driver-result"));
    conn.change_user(
        mysql_async::ChangeUserOpts::default()
            .with_user(Some("app".into()))
            .with_pass(Some(password.into())),
    )
    .await
    .expect("change to an allowed user");
    let who: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(who.as_deref(), Some("app@%"));
    let err = conn
        .change_user(
            mysql_async::ChangeUserOpts::default()
                .with_user(Some("other".into()))
                .with_pass(Some("other-pass".into())),
        )
        .await
        .expect_err("change to a user outside the policy");
    let text = err.to_string();
    assert!(
        text.contains("1045")
            && text.contains("may not log in to service \"orders\" as MySQL user \"other\""),
        "{text}"
    );
    assert_eq!(
        db.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'other'"),
        "0\n"
    );

    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_refusals_say_why() {
    init_logging();
    let db = MariaDb::start().await;
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    pki.issue(Kind::Client, "mallory");
    let cert = service_certificate(&pki);
    let relay = RelayRun::start(
        pki.dir(),
        &relay_yaml(
            &pki,
            "orders, nocert",
            "  orders:\n    listen: 127.0.0.1:0\n    clients: [alice]\n    tls_termination: agent\n    \
             max_handshakes: 1\n  nocert:\n    listen: 127.0.0.1:0\n    clients: [alice]\n    tls_termination: agent\n  \
             offline:\n    listen: 127.0.0.1:0\n    clients: [alice]\n    tls_termination: agent\n",
        ),
    )
    .await;
    // The agent as a real process, so its log can be read.
    let backend = db.backend();
    let yaml = agent_yaml(
        &pki,
        relay.quic,
        &format!(
            "  orders:\n    backend: {backend}\n{tls}  nocert:\n    backend: {backend}\n",
            tls = agent_tls(&pki, &cert)
        ),
    );
    let path = pki.dir().join("agent.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut agent = Proc::spawn(
        "postern-agent",
        &["run", "--config", path.to_str().unwrap()],
        pki.dir().join("agent.log"),
    );
    relay.wait_agent("db1").await;
    let port = relay.service("orders").port();
    let alice = ssl_args(&pki, Some("client-alice"));
    assert_eq!(ok(&cli(port, "root", &alice, "SELECT 1")), "1\n");

    // Plaintext: the agent answers in MySQL terms, through the relay.
    let err = failed(&cli(port, "root", &["--skip-ssl".to_owned()], "SELECT 1"));
    assert!(
        err.contains("1045") && err.contains("TLS with a client certificate is required"),
        "{err}"
    );
    // TLS without a client certificate.
    let err = failed(&cli(port, "root", &ssl_args(&pki, None), "SELECT 1"));
    assert!(
        err.contains("1045") && err.contains("a client certificate is required"),
        "{err}"
    );
    // A certificate from another CA: TLS fails, and the agent's log says why.
    let other = TestPki::new();
    let foreign = other.issue(Kind::Client, "alice");
    let (fcert, fkey) = other.files(&foreign);
    let mut args = ssl_args(&pki, None);
    args.push(format!("--ssl-cert={}", fcert.display()));
    args.push(format!("--ssl-key={}", fkey.display()));
    failed(&cli(port, "root", &args, "SELECT 1"));
    let line = agent
        .wait_log("unknown issuer", Duration::from_secs(5))
        .await;
    assert!(line.contains("tls handshake failed"), "{line}");
    // A valid identity the service does not allow.
    let err = failed(&cli(
        port,
        "root",
        &ssl_args(&pki, Some("client-mallory")),
        "SELECT 1",
    ));
    assert!(
        err.contains("1045")
            && err.contains("postern://client/mallory is not allowed to use service \"orders\""),
        "{err}"
    );
    // An agent without a certificate for the service.
    let nocert = relay.service("nocert").port();
    let err = failed(&cli(nocert, "root", &alice, "SELECT 1"));
    assert!(
        err.contains("has no certificate for it (services.nocert.tls in agent.yaml)"),
        "{err}"
    );
    // A service whose agent is not connected.
    let offline = relay.service("offline").port();
    let err = failed(&cli(offline, "root", &alice, "SELECT 1"));
    assert!(
        err.contains("1053") && err.contains("no agent is connected"),
        "{err}"
    );
    assert_eq!(ok(&cli(port, "root", &alice, "SELECT 2")), "2\n");

    // `connect` would end TLS at the relay: refused, with the way that works.
    let via_connect = ConnectRun::start(&pki, relay.quic, "alice", "orders").await;
    let err = failed(&cli(via_connect.addr.port(), "root", &[], "SELECT 1"));
    assert!(
        err.contains("ends TLS at the agent (tls_termination: agent)"),
        "{err}"
    );
    drop(via_connect);

    // A client that stalls after the greeting holds the agent's only handshake place
    // (max_handshakes: 1): the next client evicts it and is served at once.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut greeting = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut stalled, &mut greeting)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(ok(&cli(port, "root", &alice, "SELECT 3")), "3\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut rest),
    )
    .await
    .expect("the stalled client was dropped")
    .ok();
    agent
        .wait_log("this one had waited longest", Duration::from_secs(5))
        .await;

    // The agent goes away: new clients are told so, by the relay.
    agent.kill();
    let err = eventually(Duration::from_secs(20), "no-agent refusal", || async {
        let out = cli(port, "root", &alice, "SELECT 1");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.contains("no agent is connected").then_some(err)
    })
    .await;
    assert!(err.contains("1053"), "{err}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_certificates_the_relay_revokes_without_restarts() {
    init_logging();
    let db = MariaDb::start().await;
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    pki.issue(Kind::Client, "bob");
    let cert = service_certificate(&pki);
    let ca = postern_common::pki::Ca::from_pem(
        &std::fs::read_to_string(pki.ca()).unwrap(),
        &std::fs::read_to_string(pki.dir().join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let serial = |base: &str| {
        let der = rustls_pki_types::pem::PemObject::from_pem_file(pki.files(base).0).unwrap();
        postern_common::pki::serial_of(&der).unwrap()
    };
    // Only the relay has the list; the agent gets it in the policy.
    let crl_path = pki.dir().join("crl.pem");
    let first = ca.revoke(None, &[serial("client-bob")]).unwrap();
    std::fs::write(&crl_path, &first).unwrap();
    let yaml = relay_yaml(
        &pki,
        "orders",
        "  orders:\n    listen: 127.0.0.1:0\n    clients: [alice, bob]\n    tls_termination: agent\n",
    )
    .replace(
        "heartbeat_interval:",
        &format!("  crl: {}\nheartbeat_interval:", crl_path.display()),
    );
    let relay = RelayRun::start(pki.dir(), &yaml).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(
            &pki,
            relay.quic,
            &format!(
                "  orders:\n    backend: {}\n{}",
                db.backend(),
                agent_tls(&pki, &cert)
            ),
        ),
    );
    agent.wait_connected().await;
    relay.wait_agent("db1").await;
    let port = relay.service("orders").port();
    let as_client = |name: &str| cli(port, "root", &ssl_args(&pki, Some(name)), "SELECT 1");

    // bob is revoked from the start; alice is served.
    failed(&as_client("client-bob"));
    assert_eq!(ok(&as_client("client-alice")), "1\n");

    // Revoke alice at the relay: the relay sends the agent the new list.
    let second = ca.revoke(Some(&first), &[serial("client-alice")]).unwrap();
    std::fs::write(pki.dir().join("crl.tmp"), second).unwrap();
    std::fs::rename(pki.dir().join("crl.tmp"), &crl_path).unwrap();
    eventually(Duration::from_secs(10), "alice to be refused", || async {
        (!as_client("client-alice").status.success()).then_some(())
    })
    .await;
    assert!(matches!(
        *agent.status.borrow(),
        postern_agent::Status::Connected { .. }
    ));
    agent.stop().await;
    relay.stop().await;
}
