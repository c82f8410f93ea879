//! The agent's reload (SIGHUP, `systemctl reload`): services added and removed while a long
//! query on an unchanged service runs through it, and a broken config refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mysql_async::prelude::*;
use postern_common::pki::Kind;
use postern_tests::client::driver_opts;
use postern_tests::procs::AgentProc;
use postern_tests::*;
use tokio::time::Instant;

/// Sends SIGHUP to process `pid`.
fn hangup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP {pid}");
}

/// A connection to `service` through the relay's MySQL listener, as alice.
async fn conn(s: &Stack, service: &str) -> Result<mysql_async::Conn, mysql_async::Error> {
    let cert = s.pki.issue(Kind::Client, "alice");
    let port = s.relay().mysql(service).port();
    mysql_async::Conn::new(driver_opts(&s.pki, port, &cert, "root", "")).await
}

/// The services the relay has agent `db1` serving.
fn served(s: &Stack) -> Vec<String> {
    let mut v: Vec<String> = s
        .relay()
        .handle()
        .agents()
        .into_iter()
        .filter(|a| a.name == "db1")
        .flat_map(|a| a.services)
        .collect();
    v.sort();
    v
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write agent.yaml");
}

/// The agent offers `orders` and `legacy`; the relay also defines `billing`. While
/// `SELECT SLEEP(4)` runs on `orders`, agent.yaml drops `legacy` and adds `billing`, and the
/// agent gets SIGHUP: the relay serves `billing` from the agent within seconds, `legacy`'s open
/// connection ends and new ones are refused, and the long query completes with its result. A
/// broken agent.yaml then is refused (the log names the file and line) and the agent goes on
/// serving with the config it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_services_without_touching_the_others() {
    let s = Stack::builder()
        .mariadb()
        .service("orders")
        .service("legacy")
        .offline_service("billing")
        .no_agent()
        .relay(|r| {
            r.agent("db1", &["orders", "legacy", "billing"]);
        })
        .start()
        .await;
    let mut cfg = s.agent_config();
    let path = s.file("agent", "yaml");
    let agent = AgentProc::start(&path, &cfg, &[]);
    eventually(
        Duration::from_secs(10),
        "db1 serving orders and legacy",
        || {
            let v = served(&s);
            async move { (v == ["legacy", "orders"]).then_some(()) }
        },
    )
    .await;

    let mut legacy = conn(&s, "legacy").await.expect("legacy before the reload");
    let one: Option<i64> = legacy.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    let mut long = conn(&s, "orders").await.expect("orders before the reload");
    let started = Instant::now();
    let query = tokio::spawn(async move {
        let r: Result<Option<(i64, String)>, _> =
            long.query_first("SELECT SLEEP(4), 'finished'").await;
        (r, started.elapsed())
    });
    let db = s.db();
    eventually(Duration::from_secs(5), "the long query to run", || {
        let n = db.sql(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(4)%'",
        );
        async move { (n.trim() == "1").then_some(()) }
    })
    .await;

    cfg.services.remove("legacy");
    let backend = s.db().backend();
    cfg.service("billing", &backend);
    cfg.write(&path);
    let mark = agent.proc.mark();
    let sent = Instant::now();
    hangup(agent.proc.id());
    let line = agent
        .proc
        .wait_log_after(mark, "configuration reloaded", Duration::from_secs(10))
        .await;
    assert!(
        line.contains("services added: billing") && line.contains("services removed: legacy"),
        "{line}"
    );
    eventually(
        Duration::from_secs(10),
        "db1 serving orders and billing",
        || {
            let v = served(&s);
            async move { (v == ["billing", "orders"]).then_some(()) }
        },
    )
    .await;
    let applied = sent.elapsed();
    let mut billing = conn(&s, "billing").await.expect("billing after the reload");
    let one: Option<i64> = billing.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    // legacy's open connection was ended, and new ones are refused.
    let ended = legacy.query_first::<i64, _>("SELECT 1").await;
    assert!(ended.is_err(), "legacy's connection survived: {ended:?}");
    let refused = conn(&s, "legacy").await.map(drop);
    let err = refused.expect_err("legacy is no longer offered");
    assert!(err.to_string().contains("legacy"), "{err}");

    let (result, took) = query.await.unwrap();
    let row = result.expect("the long query on orders ran through the reload");
    assert_eq!(row, Some((0, "finished".to_owned())));
    assert!(took >= Duration::from_secs(4), "{took:?}");
    eprintln!(
        "reload applied at the relay in {} ms; the long query took {} ms",
        applied.as_millis(),
        took.as_millis()
    );

    // A config that does not parse: refused, logged with file and line, the old one stays.
    write(&path, "relay: quic://127.0.0.1:1\nservices:\n  orders: [\n");
    let mark = agent.proc.mark();
    hangup(agent.proc.id());
    agent
        .proc
        .wait_log_after(mark, "reload refused", Duration::from_secs(10))
        .await;
    let log = agent.proc.log_text();
    let file = path.display().to_string();
    assert!(
        log[mark.offset()..].contains(&file),
        "the refusal names {file}:\n{}",
        &log[mark.offset()..]
    );
    let mut orders = conn(&s, "orders")
        .await
        .expect("orders after a refused reload");
    let one: Option<i64> = orders.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    let mut billing = conn(&s, "billing")
        .await
        .expect("billing after a refused reload");
    let one: Option<i64> = billing.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    assert_eq!(served(&s), ["billing", "orders"]);
    drop(agent);
    s.stop().await;
}

/// Certificate rotation: the agent's certificate and key are replaced on disk and the agent
/// gets SIGHUP. An expired one is refused; a good one: it dials each relay again with the new certificate (make before break) and the
/// connection opened before the reload goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_picks_up_a_renewed_certificate_without_dropping_connections() {
    let s = Stack::builder().mariadb().no_agent().start().await;
    let cfg = s.agent_config();
    let path = s.file("agent", "yaml");
    let agent = AgentProc::start(&path, &cfg, &[]);
    s.relay().wait_agent("db1").await;
    let mut open = conn(&s, "orders").await.expect("orders before the reload");
    let one: Option<i64> = open.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    let before = std::fs::read(&cfg.tls.cert).expect("agent certificate");

    // An expired certificate is refused: relays would refuse every new session with it.
    let expired = s.pki.issue_expired(Kind::Agent, "db1");
    let (cert, key) = s.pki.files(&expired);
    std::fs::copy(cert, &cfg.tls.cert).unwrap();
    std::fs::copy(key, &cfg.tls.key).unwrap();
    let mark = agent.proc.mark();
    hangup(agent.proc.id());
    let line = agent
        .proc
        .wait_log_after(mark, "reload refused", Duration::from_secs(10))
        .await;
    assert!(line.contains("expired at"), "{line}");
    let one: Option<i64> = open.query_first("SELECT 1").await.unwrap();
    assert_eq!(
        one,
        Some(1),
        "the connection opened before the refused reload"
    );

    let base = s.pki.issue(Kind::Agent, "db1");
    s.pki.write(
        &base,
        &postern_common::pki::LeafSpec::new(Kind::Agent, "db1", 2),
    );
    assert_ne!(
        before,
        std::fs::read(&cfg.tls.cert).unwrap(),
        "a new certificate"
    );
    let mark = agent.proc.mark();
    hangup(agent.proc.id());
    let line = agent
        .proc
        .wait_log_after(mark, "configuration reloaded", Duration::from_secs(10))
        .await;
    assert!(
        line.contains("certificates renewed") && line.contains("relay sessions renewed"),
        "{line}"
    );
    agent
        .proc
        .wait_log_after(mark, "connected to relay", Duration::from_secs(10))
        .await;
    let one: Option<i64> = open.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1), "the connection opened before the reload");
    let mut fresh = conn(&s, "orders").await.expect("orders after the reload");
    let one: Option<i64> = fresh.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    drop(agent);
    s.stop().await;
}

/// Relays added to and removed from agent.yaml: after SIGHUP the agent holds a session with a
/// relay added to the list; a relay removed from it is told the agent is going (new clients
/// there are refused) while the connection it carries goes on until the client ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_relays() {
    let s = Stack::builder().mariadb().no_agent().start().await;
    let mut second = RelayConfig::new(&s.pki);
    second
        .agent("db1", &["orders"])
        .service("orders", &["alice"]);
    let b = RelayRun::start(&s.file("relay-b", "yaml"), &second, &[]).await;
    let mut cfg = s.agent_config();
    let path = s.file("agent", "yaml");
    let agent = AgentProc::start(&path, &cfg, &[]);
    s.relay().wait_agent("db1").await;
    let first = cfg.relay.take().expect("the stack's relay");
    let b_spec = RelaySpec::quic(b.quic.expect("quic"));

    cfg.relays = Some(vec![first, b_spec.clone()]);
    cfg.write(&path);
    let mark = agent.proc.mark();
    hangup(agent.proc.id());
    let line = agent
        .proc
        .wait_log_after(mark, "configuration reloaded", Duration::from_secs(10))
        .await;
    assert!(line.contains("relays added:"), "{line}");
    b.wait_agent("db1").await;

    // A connection through the first relay, then that relay is removed from the list.
    let mut open = conn(&s, "orders")
        .await
        .expect("orders through the first relay");
    let one: Option<i64> = open.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    cfg.relays = Some(vec![b_spec]);
    cfg.write(&path);
    let mark = agent.proc.mark();
    hangup(agent.proc.id());
    let line = agent
        .proc
        .wait_log_after(mark, "configuration reloaded", Duration::from_secs(10))
        .await;
    assert!(line.contains("relays removed:"), "{line}");
    let h = s.relay().handle().clone();
    eventually(
        Duration::from_secs(10),
        "new clients refused at the first relay",
        || {
            let s = &s;
            async move { conn(s, "orders").await.is_err().then_some(()) }
        },
    )
    .await;
    let one: Option<i64> = open.query_first("SELECT 1").await.unwrap();
    assert_eq!(
        one,
        Some(1),
        "the open connection through the removed relay"
    );
    open.disconnect().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the first relay's session to end",
        || {
            let gone = h.agents().is_empty();
            async move { gone.then_some(()) }
        },
    )
    .await;
    // The relay still in the list serves new clients.
    let cert = s.pki.issue(Kind::Client, "alice");
    let port = b.service("orders").port();
    let mut via_b = mysql_async::Conn::new(driver_opts(&s.pki, port, &cert, "root", ""))
        .await
        .expect("orders through the second relay");
    let one: Option<i64> = via_b.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    drop(agent);
    b.stop().await;
    s.stop().await;
}
