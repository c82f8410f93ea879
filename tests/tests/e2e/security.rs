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
        refused(mark, "refused origin=quic", why).await;
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
    refused(
        mark,
        "refused origin=tls_listener",
        "mallory is not allowed",
    )
    .await;

    // A client with no certificate at all.
    let mark = relay.mark();
    assert!(tls_first_packet(pki, tls, None).await.is_err());
    let line = refused(
        mark,
        "refused origin=tls_listener",
        "client presented no certificate",
    )
    .await;
    assert!(line.contains("reason=tls handshake failed"), "{line}");

    // An expired client certificate.
    let mark = relay.mark();
    let base = pki.issue_expired(Kind::Client, "alice");
    assert!(
        tls_first_packet(pki, tls, Some(pki.material(&base)))
            .await
            .is_err()
    );
    let line = refused(mark, "refused origin=tls_listener", "expired").await;
    assert!(line.contains("reason=tls handshake failed"), "{line}");
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

/// Two CAs made by `certs init`, as an operator makes them: a client certificate from the other
/// one is refused as coming from an unknown CA (not as a failed signature, which is what CAs of
/// the same name gave), the relay's log names both CAs, and the client is told its CA is not
/// trusted, over QUIC and over the MySQL listener's TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_postern_ca_is_refused_as_from_an_unknown_ca() {
    use postern_common::transport::{CloseReason, Liveness, quic};
    use tokio::io::AsyncWriteExt;

    let theirs = TestPki::from_certs_init();
    let s = Stack::builder()
        .pki(TestPki::from_certs_init())
        .mariadb()
        .relay_process()
        .start()
        .await;
    let (ours, relay) = (&s.pki, s.relay().proc());
    let (trusted, foreign) = (ours.ca_name(), theirs.ca_name());
    assert_ne!(trusted, foreign);
    let named_both = |line: &str| {
        line.contains("unknown CA")
            && line.contains(&format!("{foreign:?}"))
            && line.contains(&format!("{trusted:?}"))
            && !line.contains("decrypt")
    };
    // alice of the other CA, trusting our relay.
    let (cert, key) = theirs.files(&theirs.issue(Kind::Client, "alice"));

    // Over QUIC.
    let mark = relay.mark();
    let alice = postern_common::tls::Material::load(&ours.ca(), &cert, &key).unwrap();
    let quic_addr = s.relay().quic();
    let ep = quic::client(quic_addr, &alice, Liveness::CONNECT).unwrap();
    let seen = match ep.connect(quic_addr, "localhost").await {
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
    let line = relay.wait_log_after(mark, "refused origin=quic").await;
    assert!(named_both(&line), "{line}");

    // Over the MySQL listener's TLS, with the MariaDB client.
    let mark = relay.mark();
    let err = s
        .cli(None)
        .arg(&format!("--ssl-cert={}", cert.display()))
        .arg(&format!("--ssl-key={}", key.display()))
        .fails("SELECT 1");
    assert!(err.to_lowercase().contains("unknown ca"), "{err}");
    assert!(!err.to_lowercase().contains("decrypt"), "{err}");
    let line = relay
        .proc
        .wait_line(mark, procs::LOG_WAIT, "the refusal", |l| {
            l.contains("refused origin=mysql_listener") && l.contains("reason=tls handshake failed")
        })
        .await;
    assert!(named_both(&line), "{line}");
    s.stop().await;
}
