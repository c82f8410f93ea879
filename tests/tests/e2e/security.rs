//! Certificates that must be refused, each with a log line that says why, while everyone else
//! keeps working.

use std::time::Duration;

use postern_common::pki::Kind;
use postern_tests::client::tls_first_packet;
use postern_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_with_reasons_and_disturb_no_one() {
    let s = Stack::builder().mariadb().relay_process().start().await;
    let relay = s.relay().proc();
    let tls = s.relay().tls("orders");
    let pki = &s.pki;
    let good = || async {
        matches!(tls_first_packet(pki, tls, Some(pki.client_material("alice"))).await, Ok(b) if b[0] == 10)
    };
    assert!(good().await);
    // Each case looks only at what the relay logged after the case began, so that no case
    // passes on a line an earlier one wrote.
    let refused = |mark, what: &'static str, why: &'static str| async move {
        relay
            .proc
            .wait_line(mark, procs::LOG_WAIT, why, |l| {
                l.contains(what) && l.contains(why)
            })
            .await
    };

    // An agent certificate from another CA (it trusts the relay's CA, so the relay is the side
    // that refuses), and an expired one.
    let other = TestPki::new();
    for ((cert, key), why) in [
        (
            other.files(&other.issue(Kind::Agent, "db1")),
            "unknown issuer",
        ),
        (pki.files(&pki.issue_expired(Kind::Agent, "db1")), "expired"),
    ] {
        let mark = relay.mark();
        let mut config = s.agent_config();
        (config.tls.cert, config.tls.key) = (cert, key);
        let agent = s.start_agent(&config);
        refused(mark, "refused connection", why).await;
        agent.stop().await;
    }

    // A client certificate not allowed for the service: the client sees a MySQL error.
    let mark = relay.mark();
    let got = tls_first_packet(pki, tls, Some(pki.client_material("mallory")))
        .await
        .unwrap();
    assert_eq!(got[0], 0xff, "an ERR packet");
    assert_eq!(u16::from_le_bytes([got[1], got[2]]), 1045);
    let text = String::from_utf8_lossy(&got[9..]).into_owned();
    assert!(
        text.contains("postern://client/mallory is not allowed to use service \"orders\""),
        "{text}"
    );
    refused(mark, "refused client", "mallory is not allowed").await;

    // A client with no certificate at all.
    let mark = relay.mark();
    assert!(tls_first_packet(pki, tls, None).await.is_err());
    refused(mark, "refused client", "client presented no certificate").await;

    // An expired client certificate.
    let mark = relay.mark();
    let base = pki.issue_expired(Kind::Client, "alice");
    assert!(
        tls_first_packet(pki, tls, Some(pki.material(&base)))
            .await
            .is_err()
    );
    let line = refused(mark, "refused client: tls handshake failed", "expired").await;
    assert!(!line.contains("no certificate"), "{line}");

    // Through all of this the good agent stayed connected and good clients are served.
    assert!(s.agent().is_connected());
    assert!(good().await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_client_not_allowed_sees_a_mysql_error() {
    let s = Stack::builder().mariadb().start().await;
    let c = s.connect("mallory").await;
    let err = c.cli().fails("SELECT 1");
    // The client names the error number and shows the relay's reason.
    assert!(
        err.contains("1045") && err.contains("mallory is not allowed to use service"),
        "{err}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_without_restarting_the_relay() {
    // Start with a list that revokes someone else.
    let s = Stack::builder()
        .clients(["alice", "bob"])
        .revoked(["bob"])
        .mariadb()
        .start()
        .await;
    let (pki, tls) = (&s.pki, s.relay().tls("orders"));

    // bob is already revoked; alice is served.
    assert!(
        tls_first_packet(pki, tls, Some(pki.client_material("bob")))
            .await
            .is_err()
    );
    let alice = tls_first_packet(pki, tls, Some(pki.client_material("alice")))
        .await
        .unwrap();
    assert_eq!(alice[0], 10);

    // Revoke alice: written next to the relay's config, picked up within a few seconds.
    pki.revoke(&["client-alice"]);
    eventually(Duration::from_secs(6), "alice to be refused", || async {
        tls_first_packet(pki, tls, Some(pki.client_material("alice")))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // New QUIC sessions with alice's certificate are refused too.
    let err = ConnectRun::start_with(pki, s.connect_to(), "alice", "orders", true)
        .await
        .err()
        .map(|e| format!("{e:#}"));
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("CertificateRevoked") || e.contains("revoked")),
        "{err:?}"
    );
    // The agent was never disturbed.
    assert!(s.agent().is_connected());
    s.stop().await;
}
