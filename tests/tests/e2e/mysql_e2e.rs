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

use std::collections::BTreeMap;
use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::*;
use postern_common::pki::{Kind, LeafSpec};
use postern_relay::config::TlsTermination;
use postern_tests::client::driver_opts;
use postern_tests::*;

/// A dead agent is dropped after two 1 s heartbeat intervals and 250 ms; 750 ms for scheduling.
const DETECTED_WITHIN: Duration = Duration::from_secs(3);

/// A CA whose `server-orders`, the certificate the agent presents for service `orders`, carries
/// only the address clients dial (`127.0.0.1`), and whose relay certificate carries only
/// `localhost` (agents dial the relay by that name): so no certificate the relay holds is valid
/// for the address clients dial.
fn pki_with_only_the_service_valid_for_the_client_address() -> TestPki {
    let pki = TestPki::new();
    let mut spec = LeafSpec::new(Kind::Server, "orders", 1);
    spec.ips = vec!["127.0.0.1".parse().expect("ip")];
    pki.write("server-orders", &spec);
    let mut spec = LeafSpec::new(Kind::Server, "relay", 1);
    spec.dns = vec!["localhost".into()];
    pki.write("server-relay", &spec);
    pki
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_tls_runs_queries_and_keeps_the_relay_blind() {
    let s = Stack::builder()
        .pki(pki_with_only_the_service_valid_for_the_client_address())
        .mariadb()
        .service("orders")
        .service("plain")
        .tls_termination("orders", TlsTermination::Agent)
        .heartbeat(Duration::from_secs(5))
        .relay(|r| {
            let orders = r.service_mut("orders");
            orders.allowed_users = Some(BTreeMap::from([(
                "alice".into(),
                vec!["root".into(), "app".into()],
            )]));
            orders.client_attribute = Some(true);
        })
        .start()
        .await;
    let (db, pki) = (s.db(), &s.pki);
    let password = "e2e-Pa55word-never-at-the-relay";
    db.sql(&format!(
        "CREATE USER 'app'@'%' IDENTIFIED BY '{password}'; GRANT ALL ON *.* TO 'app'@'%'; \
         CREATE USER 'other'@'%' IDENTIFIED BY 'other-pass'; GRANT ALL ON *.* TO 'other'@'%';"
    ));
    let (orders, plain) = (
        s.relay().mysql("orders").port(),
        s.relay().mysql("plain").port(),
    );
    let as_app = |port| {
        Cli::at(port)
            .user("app")
            .tls(pki, Some("client-alice"))
            .password(password)
    };

    // The control: where TLS ends at the relay, the client that verifies the name it dials
    // refuses the relay's certificate. So does the driver.
    let err = as_app(plain).fails("SELECT 1");
    assert!(
        err.contains("2026") || err.contains("TLS/SSL error"),
        "{err}"
    );
    Conn::new(driver_opts(pki, plain, "client-alice", "root", ""))
        .await
        .expect_err("the relay's certificate is not valid for 127.0.0.1");

    // End to end: the mariadb CLI verifies the agent's certificate by the address it dials.
    let out = as_app(orders).ok("SELECT 'e2e-marker-0815', CURRENT_USER(); \
         SELECT ATTR_VALUE FROM performance_schema.session_connect_attrs \
         WHERE PROCESSLIST_ID = CONNECTION_ID() AND ATTR_NAME = 'postern_client'");
    assert!(out.starts_with("e2e-marker-0815\tapp@%\n"), "{out}");
    let status = client::ok(
        &as_app(orders)
            .command()
            .args(["-e", "status"])
            .output()
            .unwrap(),
    );
    assert!(status.contains("Cipher in use is"), "{status}");

    // The Rust driver with a client identity; then COM_CHANGE_USER, checked at the agent.
    let mut conn = Conn::new(driver_opts(pki, orders, "client-alice", "root", ""))
        .await
        .expect("driver through end-to-end TLS");
    let got: Option<String> = conn
        .query_first("SELECT CONCAT('driver-', 'result'), 'driver-marker-2718'")
        .await
        .unwrap()
        .map(|(a, _): (String, String)| a);
    assert_eq!(got.as_deref(), Some("driver-result"));
    client::change_user(&mut conn, "app", password)
        .await
        .expect("change to an allowed user");
    let who: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(who.as_deref(), Some("app@%"));
    client::change_user_refused(&mut conn, "orders", "other", "other-pass").await;
    assert_eq!(
        db.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'other'"),
        "0\n"
    );

    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_refusals_say_why() {
    // The agent as a real process, so its log can be read.
    let mut s = Stack::builder()
        .mariadb()
        .service("orders")
        .service("nocert")
        .offline_service("offline")
        .tls_termination("orders", TlsTermination::Agent)
        .relay(|r| {
            r.service_mut("orders").max_handshakes = Some(1);
            for name in ["nocert", "offline"] {
                let svc = r.service_mut(name);
                svc.tls_termination = Some(TlsTermination::Agent);
                svc.tls_listen = None;
            }
        })
        .agent_process()
        .start()
        .await;
    let pki = &s.pki;
    pki.issue(Kind::Client, "mallory");
    let port = s.relay().mysql("orders").port();
    let cli = |cert: Option<&str>| Cli::at(port).tls(pki, cert);
    let alice = cli(Some("client-alice"));
    assert_eq!(alice.ok("SELECT 1"), "1\n");

    // Plaintext: the agent answers in MySQL terms, through the relay.
    let err = Cli::at(port).arg("--skip-ssl").fails("SELECT 1");
    assert!(
        err.contains("1045") && err.contains("TLS with a client certificate is required"),
        "{err}"
    );
    // TLS without a client certificate.
    let err = cli(None).fails("SELECT 1");
    assert!(
        err.contains("1045") && err.contains("a client certificate is required"),
        "{err}"
    );
    // A certificate from another CA: TLS fails, and the agent's log says why.
    let other = TestPki::new();
    let (fcert, fkey) = other.files(&other.issue(Kind::Client, "alice"));
    cli(None)
        .arg(&format!("--ssl-cert={}", fcert.display()))
        .arg(&format!("--ssl-key={}", fkey.display()))
        .fails("SELECT 1");
    let line = s.agent_proc().wait_log("unknown issuer").await;
    assert!(
        line.contains("refused origin=agent_stream")
            && line.contains("reason=tls handshake failed"),
        "{line}"
    );
    // A valid identity the service does not allow.
    let err = cli(Some("client-mallory")).fails("SELECT 1");
    assert!(
        err.contains("1045")
            && err.contains("postern://client/mallory is not allowed to use service \"orders\""),
        "{err}"
    );
    // An agent without a certificate for the service.
    let nocert = s.relay().mysql("nocert").port();
    let err = Cli::at(nocert)
        .tls(pki, Some("client-alice"))
        .fails("SELECT 1");
    assert!(
        err.contains("has no certificate for it (services.nocert.tls in agent.yaml)"),
        "{err}"
    );
    // A service whose agent is not connected.
    let offline = s.relay().mysql("offline").port();
    let err = Cli::at(offline)
        .tls(pki, Some("client-alice"))
        .fails("SELECT 1");
    assert!(
        err.contains("1053") && err.contains("no agent is connected"),
        "{err}"
    );
    assert_eq!(alice.ok("SELECT 2"), "2\n");

    // `connect` would end TLS at the relay: refused, with the way that works.
    let via_connect = s.connect("alice").await;
    let err = via_connect.cli().fails("SELECT 1");
    assert!(
        err.contains("ends TLS at the agent (tls_termination: agent)"),
        "{err}"
    );
    drop(via_connect);

    // A client that stalls after the greeting holds the agent's only handshake place
    // (max_handshakes: 1): the next client evicts it and is served at once.
    let mark = s.agent_proc().proc.mark();
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut greeting = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut stalled, &mut greeting)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(alice.ok("SELECT 3"), "3\n");
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
    s.agent_proc()
        .proc
        .wait_log_after(mark, "this one had waited longest", procs::LOG_WAIT)
        .await;

    // The agent goes away: new clients are told so, by the relay, once two heartbeat intervals
    // (1 s) and 250 ms have passed without a word from the agent.
    s.agent_proc_mut().kill();
    let killed = tokio::time::Instant::now();
    let err = eventually(DETECTED_WITHIN, "no-agent refusal", || async {
        let err = alice.query_async("SELECT 1").await.err()?;
        err.contains("no agent is connected").then_some(err)
    })
    .await;
    let detected = killed.elapsed();
    eprintln!("agent killed: the relay refuses clients after {detected:?}");
    assert!(err.contains("1053"), "{err}");
    assert!(
        detected <= DETECTED_WITHIN,
        "the relay took {detected:?} to drop the dead agent (heartbeat 1 s)"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_certificates_the_relay_revokes_without_restarts() {
    // Only the relay has the list; the agent gets it in the policy.
    let s = Stack::builder()
        .clients(["alice", "bob"])
        .revoked(["bob"])
        .mariadb()
        .tls_termination("orders", TlsTermination::Agent)
        .heartbeat(Duration::from_secs(5))
        .start()
        .await;
    let port = s.port();
    let as_client = |name: &str| Cli::at(port).tls(&s.pki, Some(name)).sql("SELECT 1");

    // bob is revoked from the start; alice is served.
    client::failed(&as_client("client-bob"));
    assert_eq!(client::ok(&as_client("client-alice")), "1\n");

    // Revoke alice at the relay: the relay sends the agent the new list.
    s.pki.revoke(&["client-alice"]);
    eventually(Duration::from_secs(10), "alice to be refused", || async {
        (!as_client("client-alice").status.success()).then_some(())
    })
    .await;
    assert!(s.agent().is_connected());
    s.stop().await;
}
