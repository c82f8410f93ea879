//! The relay's reload (SIGHUP, `systemctl reload`) of the real `postern-relay` process:
//! services and listeners added and removed while a long query on an unchanged service runs
//! through it, a renewed certificate, and reloads that are refused and change nothing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use postern_common::pki::{Kind, LeafSpec};
use postern_tests::client::driver_opts;
use postern_tests::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::time::Instant;

/// Sends SIGHUP to process `pid`.
fn hangup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP {pid}");
}

/// The relay's config file (the stack writes relay `i` to `relay-i.yaml`).
fn config_path(s: &Stack) -> PathBuf {
    s.pki.dir().join("relay-0.yaml")
}

/// A connection to `service` through the relay's MySQL listener, as alice.
async fn conn(s: &Stack, service: &str) -> Result<mysql_async::Conn, mysql_async::Error> {
    let cert = s.pki.issue(Kind::Client, "alice");
    let port = s.relay().mysql(service).port();
    mysql_async::Conn::new(driver_opts(&s.pki, port, &cert, "root", "")).await
}

async fn select_one(c: &mut mysql_async::Conn) -> Option<i64> {
    c.query_first("SELECT 1").await.expect("SELECT 1")
}

/// A stack whose agent offers `orders`, `legacy` and `billing`, and whose relay (a process)
/// defines only the first two: `billing` is rejected at the hello.
async fn stack() -> Stack {
    Stack::builder()
        .mariadb()
        .service("orders")
        .service("legacy")
        .service("billing")
        .relay_process()
        .relay(|r| {
            r.services.remove("billing");
            for a in r.agents.values_mut() {
                a.services.retain(|s| s != "billing");
            }
        })
        .start()
        .await
}

/// While `SELECT SLEEP(5)` runs on `orders`, relay.yaml drops `legacy` and adds `billing`
/// (which the agent offered all along) and the relay gets SIGHUP: `billing` gets a listener and
/// is served by the agent within seconds (the agent is asked for a new session, which the
/// relay welcomes with `billing`), `legacy`'s open connection is cut and its listener closed,
/// and the long query completes with its result. A broken relay.yaml then is refused, the log
/// naming the file, and the relay goes on serving with the config it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_services_while_a_long_query_runs() {
    let mut s = stack().await;
    let path = config_path(&s);
    let mut legacy = conn(&s, "legacy").await.expect("legacy before the reload");
    assert_eq!(select_one(&mut legacy).await, Some(1));
    let legacy_addr = s.relay().mysql("legacy");
    let mut long = conn(&s, "orders").await.expect("orders before the reload");
    let started = Instant::now();
    let query = tokio::spawn(async move {
        let r: Result<Option<(i64, String)>, _> =
            long.query_first("SELECT SLEEP(5), 'finished'").await;
        (r, started.elapsed())
    });
    let db = s.db();
    eventually(Duration::from_secs(5), "the long query to run", || {
        let n = db.sql(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(5)%'",
        );
        async move { (n.trim() == "1").then_some(()) }
    })
    .await;

    let mut cfg = s.relay_config.clone();
    cfg.services.remove("legacy");
    cfg.service("billing", &["alice"]).tls_listen = None;
    for a in cfg.agents.values_mut() {
        a.services.retain(|s| s != "legacy");
        a.services.push("billing".into());
    }
    cfg.write(&path);
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    let sent = Instant::now();
    hangup(relay.proc.id());
    let line = relay.reloaded(mark).await;
    assert!(
        line.contains("configuration reloaded")
            && line.contains("services added: billing")
            && line.contains("services removed: legacy")
            && line.contains("connections cut: 1")
            && line.contains("agents asked for a new session: db1"),
        "{line}"
    );
    let mut billing = eventually(Duration::from_secs(10), "billing served", || async {
        let mut c = conn(&s, "billing").await.ok()?;
        select_one(&mut c).await.map(|_| c)
    })
    .await;
    let applied = sent.elapsed();
    assert_eq!(select_one(&mut billing).await, Some(1));

    // legacy's open connection was cut, and its listener is closed.
    let ended = legacy.query_first::<i64, _>("SELECT 1").await;
    assert!(ended.is_err(), "legacy's connection survived: {ended:?}");
    eventually(
        Duration::from_secs(5),
        "legacy's listener closed",
        || async { tokio::net::TcpStream::connect(legacy_addr).await.err() },
    )
    .await;

    let (result, took) = query.await.unwrap();
    let row = result.expect("the long query on orders ran through the reload");
    assert_eq!(row, Some((0, "finished".to_owned())));
    assert!(took >= Duration::from_secs(5), "{took:?}");
    eprintln!(
        "reload: billing served {} ms after SIGHUP; the long query took {} ms",
        applied.as_millis(),
        took.as_millis()
    );

    // A file that does not parse: refused, logged with the file, the old config stays.
    std::fs::write(&path, "listen:\n  quic: [\nservices: {}\n").unwrap();
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    hangup(relay.proc.id());
    let line = relay.reloaded(mark).await;
    assert!(line.contains("reload refused"), "{line}");
    let log = relay.proc.log_text();
    let file = path.display().to_string();
    assert!(
        log[mark.offset()..].contains(&file),
        "the refusal names {file}:\n{}",
        &log[mark.offset()..]
    );
    let mut orders = conn(&s, "orders")
        .await
        .expect("orders after a refused reload");
    assert_eq!(select_one(&mut orders).await, Some(1));
    let mut billing = conn(&s, "billing")
        .await
        .expect("billing after a refused reload");
    assert_eq!(select_one(&mut billing).await, Some(1));
    s.stop().await;
}

/// The certificate a TLS-first listener presents to a new handshake, as alice.
async fn presented(s: &Stack, addr: std::net::SocketAddr) -> CertificateDer<'static> {
    let material = s.pki.client_material("alice");
    let config = postern_common::tls::listener_client(&material).expect("client tls");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.expect("tls handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

fn cert_of(s: &Stack, base: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(s.pki.files(base).0).expect("read certificate")
}

/// Certificate rotation: relay.yaml is pointed at an expired certificate, and the reload is
/// refused (the relay keeps the one in use); then at a renewed one: new handshakes get it, a
/// connection opened before goes on, and the agent's session is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_renews_the_certificate_for_new_handshakes_only() {
    let mut s = stack().await;
    let path = config_path(&s);
    let tls_addr = s.relay().tls("orders");
    assert_eq!(presented(&s, tls_addr).await, cert_of(&s, "server-relay"));
    let mut open = conn(&s, "orders").await.expect("orders before the reload");
    assert_eq!(select_one(&mut open).await, Some(1));

    let expired = s.pki.issue_expired(Kind::Server, "relay");
    let mut cfg = s.relay_config.clone();
    let (cert, key) = s.pki.files(&expired);
    (cfg.tls.cert, cfg.tls.key) = (cert, key);
    cfg.write(&path);
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    hangup(relay.proc.id());
    let line = relay.reloaded(mark).await;
    assert!(
        line.contains("reload refused") && line.contains("expired at"),
        "{line}"
    );
    assert_eq!(presented(&s, tls_addr).await, cert_of(&s, "server-relay"));

    let mut spec = LeafSpec::new(Kind::Server, "relay", 2);
    spec.dns = vec!["localhost".into()];
    spec.ips = vec!["127.0.0.1".parse().unwrap()];
    s.pki.write("server-relay-renewed", &spec);
    let (cert, key) = s.pki.files("server-relay-renewed");
    (cfg.tls.cert, cfg.tls.key) = (cert, key);
    cfg.write(&path);
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    hangup(relay.proc.id());
    let line = relay.reloaded(mark).await;
    assert!(
        line.contains("configuration reloaded") && line.contains("certificates renewed"),
        "{line}"
    );
    let renewed = cert_of(&s, "server-relay-renewed");
    assert_ne!(renewed, cert_of(&s, "server-relay"));
    assert_eq!(presented(&s, tls_addr).await, renewed);
    // MySQL-native handshakes and QUIC sessions get the new one too: a new client connects.
    let mut fresh = conn(&s, "orders").await.expect("orders after the renewal");
    assert_eq!(select_one(&mut fresh).await, Some(1));
    assert_eq!(select_one(&mut open).await, Some(1), "the open connection");
    let relay = s.relays[0].proc();
    let log = relay.proc.log_text();
    assert!(
        !log[mark.offset()..].contains("agent disconnected"),
        "the agent's session was touched:\n{}",
        &log[mark.offset()..]
    );
    s.stop().await;
}

/// A reload whose new listener cannot bind (its port is taken) is refused as a whole: the
/// service it adds does not appear, and the others are as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_listener_cannot_bind_changes_nothing() {
    let mut s = stack().await;
    let path = config_path(&s);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let mut cfg = s.relay_config.clone();
    cfg.services.remove("legacy");
    cfg.service("billing", &["alice"]).listen = Some(taken_addr.to_string());
    cfg.service_mut("billing").tls_listen = None;
    for a in cfg.agents.values_mut() {
        a.services.retain(|s| s != "legacy");
        a.services.push("billing".into());
    }
    cfg.write(&path);
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    hangup(relay.proc.id());
    let line = relay.reloaded(mark).await;
    assert!(
        line.contains("reload refused") && line.contains(&taken_addr.to_string()),
        "{line}"
    );
    // legacy, which the refused file removed, still serves; billing was not added.
    let mut legacy = conn(&s, "legacy").await.expect("legacy still served");
    assert_eq!(select_one(&mut legacy).await, Some(1));
    let mut orders = conn(&s, "orders").await.expect("orders still served");
    assert_eq!(select_one(&mut orders).await, Some(1));
    let relay = s.relays[0].proc();
    assert!(
        !relay.proc.log_text()[mark.offset()..].contains("service=billing"),
        "billing appeared"
    );
    drop(taken);
    s.stop().await;
}

/// A revocation list added by a reload (`tls.crl`, absent at start): the revoked client's next
/// handshake is refused, another client goes on; a reload that removes it lets the client in
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_the_revocation_list() {
    let mut s = stack().await;
    let path = config_path(&s);
    let mut before = conn(&s, "orders").await.expect("alice before the reload");
    assert_eq!(select_one(&mut before).await, Some(1));
    let crl = s.pki.revoke(&["client-alice"]);
    let mut cfg = s.relay_config.clone();
    cfg.tls.crl = Some(crl);
    cfg.write(&path);
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    hangup(relay.proc.id());
    let line = relay.reloaded(mark).await;
    assert!(line.contains("configuration reloaded"), "{line}");
    let refused = conn(&s, "orders").await.map(drop);
    let Err(err) = refused else {
        let log = s.relays[0].proc().proc.log_text();
        panic!(
            "a revoked certificate was let in after the reload:\n{}",
            &log[mark.offset()..]
        );
    };
    assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");

    cfg.tls.crl = None;
    cfg.write(&path);
    let relay = s.relays[0].proc_mut();
    let mark = relay.mark();
    hangup(relay.proc.id());
    relay.reloaded(mark).await;
    let mut again = conn(&s, "orders")
        .await
        .expect("alice once the list is gone");
    assert_eq!(select_one(&mut again).await, Some(1));
    s.stop().await;
}
