//! `postern-agent diagnose`, the real binary against a real relay, nginx, tinyproxy and
//! MariaDB: the verdict of each step (read from `--json`) and the exit status for a working
//! setup and for each way a setup breaks, and a running agent left alone by it.

use std::net::UdpSocket;

use postern_common::pki::Kind;
use postern_tests::mariadb::free_port;
use postern_tests::procs::bin;
use postern_tests::router::Tinyproxy;
use postern_tests::*;
use serde_json::Value;

/// Runs `postern-agent diagnose --json --timeout TIMEOUT` on `config` (written beside the
/// stack's files), in an environment without proxy variables; the exit status and the report.
async fn diagnose(s: &Stack, config: &AgentConfig, timeout: &str) -> (i32, Value) {
    let path = config.write(&s.file("diagnose", "yaml"));
    let out = tokio::process::Command::new(bin("postern-agent"))
        .args(["diagnose", "--json", "--timeout", timeout, "--config"])
        .arg(&path)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("POSTERN_AGENT_CONFIG")
        .output()
        .await
        .expect("run postern-agent diagnose");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The steps named `step` (several relays or nodes may have one each).
fn steps<'a>(report: &'a Value, step: &str) -> Vec<&'a Value> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["step"] == step)
        .collect()
}

/// The one step named `step`.
fn step<'a>(report: &'a Value, step: &str) -> &'a Value {
    let found = steps(report, step);
    assert_eq!(found.len(), 1, "one {step} step in {report:#}");
    found[0]
}

/// Asserts the verdict of step `name`, showing the report when it is not.
fn assert_verdict(report: &Value, name: &str, verdict: &str) {
    let s = step(report, name);
    assert_eq!(s["verdict"], verdict, "{name}: {report:#}");
}

/// Every step's verdict is ok, and so is the whole.
fn assert_all_ok(report: &Value) {
    for s in report["steps"].as_array().expect("steps") {
        assert_eq!(s["verdict"], "ok", "{s:#} in {report:#}");
        assert!(s["hint"].is_null(), "no hint when ok: {s:#}");
        assert!(s["elapsed_ms"].is_u64(), "{s:#}");
    }
    assert_eq!(report["verdict"], "ok", "{report:#}");
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_a_working_setup_over_quic_is_all_ok_and_leaves_the_running_agent_alone() {
    let mut s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .start()
        .await;
    let before = s.relay().handle().agents();
    assert_eq!(before.len(), 1);
    s.agent_mut().status.mark_unchanged();

    let (code, report) = diagnose(&s, &s.agent_config(), "5s").await;
    assert_eq!(code, 0, "{report:#}");
    assert_all_ok(&report);
    assert_eq!(report["agent"], "db1");
    let names: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| text(&s["step"]))
        .collect();
    assert_eq!(
        names,
        [
            "config",
            "ca",
            "certificate",
            "key",
            "chain",
            "validity",
            "dns",
            "quic",
            "tls",
            "session",
            "backend"
        ],
        "{report:#}"
    );
    assert!(
        text(&step(&report, "session")["detail"]).contains("services: orders"),
        "{report:#}"
    );
    assert!(
        text(&step(&report, "backend")["detail"]).contains("MySQL server")
            && text(&step(&report, "backend")["detail"]).contains("MariaDB"),
        "the backend's greeting shows the server version: {report:#}"
    );

    // The relay took the check for a probe: the running agent kept its session.
    let after = s.relay().handle().agents();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        (after[0].since, &after[0].remote),
        (before[0].since, &before[0].remote),
        "the agent's session was not replaced"
    );
    assert!(
        !s.agent_mut().status.has_changed().unwrap(),
        "the running agent never lost its session: {:?}",
        *s.agent().status.borrow()
    );
    s.cli(Some("alice")).ok("SELECT 1");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_a_working_setup_over_websocket_through_the_router_is_all_ok() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .transport(Transport::Websocket)
        .start()
        .await;
    let (code, report) = diagnose(&s, &s.agent_config(), "5s").await;
    assert_eq!(code, 0, "{report:#}");
    assert_all_ok(&report);
    for name in ["tcp", "outer-tls", "websocket", "tls", "session"] {
        assert_verdict(&report, name, "ok");
    }
    assert!(steps(&report, "quic").is_empty(), "transport: websocket");
    assert!(
        text(&step(&report, "websocket")["detail"]).contains("101"),
        "{report:#}"
    );
    assert!(s.agent().is_connected());
    s.cli(Some("alice")).ok("SELECT 1");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_a_udp_black_hole_fails_the_quic_step_with_the_timeout_hint() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .no_agent()
        .start()
        .await;
    // Bound and never read: every datagram to it disappears.
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = s.agent_config();
    config.relay = Some(RelaySpec::quic(hole.local_addr().unwrap()));
    let (code, report) = diagnose(&s, &config, "1s").await;
    assert_eq!(code, 1, "{report:#}");
    let quic = step(&report, "quic");
    assert_eq!(quic["verdict"], "fail", "{report:#}");
    assert!(
        text(&quic["detail"]).contains("no answer over udp"),
        "{quic:#}"
    );
    assert!(
        text(&quic["hint"]).contains("UDP port blocked?"),
        "{quic:#}"
    );
    assert!(
        quic["elapsed_ms"].as_u64().unwrap() >= 1000,
        "bounded by --timeout: {quic:#}"
    );
    assert_verdict(&report, "tls", "skipped");
    assert_verdict(&report, "session", "skipped");
    assert_verdict(&report, "validity", "ok");
    assert_verdict(&report, "backend", "ok");
    assert_eq!(report["verdict"], "fail");
    drop(hole);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_another_ca_fails_the_tls_step_naming_the_unknown_ca() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .no_agent()
        .start()
        .await;
    // The agent's certificate and CA from another CA than the relay's.
    let other = TestPki::lasting(90);
    let mut config = s.agent_config();
    config.tls = config::Tls::of(&other, &other.issue(Kind::Agent, "db1"));
    let (code, report) = diagnose(&s, &config, "5s").await;
    assert_eq!(code, 1, "{report:#}");
    // Locally the certificate is fine (it chains to the CA it is configured with).
    assert_verdict(&report, "chain", "ok");
    assert_verdict(&report, "quic", "ok");
    let tls = step(&report, "tls");
    assert_eq!(tls["verdict"], "fail", "{report:#}");
    let detail = text(&tls["detail"]);
    assert!(
        detail.contains("unknown CA") && detail.contains(&s.pki.ca_name()),
        "names the relay's CA, which the agent does not trust: {tls:#}"
    );
    assert!(text(&tls["hint"]).contains("tls.ca"), "{tls:#}");
    assert_verdict(&report, "session", "skipped");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_an_expired_certificate_fails_its_dates_and_the_relay_confirms() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .no_agent()
        .start()
        .await;
    let mut config = s.agent_config();
    config.tls = config::Tls::of(&s.pki, &s.pki.issue_expired(Kind::Agent, "db1"));
    let (code, report) = diagnose(&s, &config, "5s").await;
    assert_eq!(code, 1, "{report:#}");
    let validity = step(&report, "validity");
    assert_eq!(validity["verdict"], "fail", "{report:#}");
    assert!(
        text(&validity["detail"]).contains("expired on"),
        "{validity:#}"
    );
    assert!(
        text(&validity["hint"]).contains("certs issue agent"),
        "{validity:#}"
    );
    // The certificate steps come before any network step.
    let names: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| text(&s["step"]))
        .collect();
    let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(at("validity") < at("dns"), "{names:?}");
    // The rest is still tried: the path to the relay works, and the relay refuses the
    // certificate for the same reason.
    assert_verdict(&report, "chain", "ok");
    assert_verdict(&report, "quic", "ok");
    let tls = step(&report, "tls");
    assert_eq!(tls["verdict"], "fail", "{report:#}");
    assert!(text(&tls["detail"]).contains("expired"), "{tls:#}");
    assert_verdict(&report, "session", "skipped");
    assert_verdict(&report, "backend", "ok");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_a_proxy_that_refuses_connect_fails_the_proxy_step_with_its_status() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .transport(Transport::Websocket)
        .no_agent()
        .start()
        .await;
    // CONNECT only to port 443: the router's ephemeral port is refused.
    let proxy = Tinyproxy::start_with(None, "ConnectPort 443\n").await;
    let mut config = s.agent_config();
    config.websocket_mut().proxy = Some(format!("http://{}", proxy.addr));
    let (code, report) = diagnose(&s, &config, "5s").await;
    assert_eq!(code, 1, "{report:#}");
    assert_verdict(&report, "tcp", "ok");
    let p = step(&report, "proxy");
    assert_eq!(p["verdict"], "fail", "{report:#}");
    assert!(text(&p["detail"]).contains("403"), "{p:#}");
    assert!(text(&p["hint"]).contains("does not allow CONNECT"), "{p:#}");
    for later in ["outer-tls", "websocket", "tls", "session"] {
        assert_verdict(&report, later, "skipped");
    }
    assert!(
        proxy.log().contains("CONNECT"),
        "the proxy saw the request: {}",
        proxy.log()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_a_dead_backend_fails_that_step_only() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .start()
        .await;
    let mut config = s.agent_config();
    let closed = format!("127.0.0.1:{}", free_port());
    config.service_mut("orders").backend = Some(closed.clone());
    let (code, report) = diagnose(&s, &config, "5s").await;
    assert_eq!(code, 1, "{report:#}");
    let backend = step(&report, "backend");
    assert_eq!(backend["verdict"], "fail", "{report:#}");
    assert!(text(&backend["target"]).contains(&closed), "{backend:#}");
    assert_eq!(backend["detail"], "connection refused", "{backend:#}");
    assert!(
        text(&backend["hint"]).contains("nothing listens"),
        "{backend:#}"
    );
    for s in report["steps"].as_array().unwrap() {
        if s["step"] != "backend" {
            assert_eq!(s["verdict"], "ok", "{s:#}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_an_agent_the_relay_does_not_know_fails_the_session_step() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .mariadb()
        .no_agent()
        .start()
        .await;
    let config = s.agent_config_as("stranger");
    let (code, report) = diagnose(&s, &config, "5s").await;
    assert_eq!(code, 1, "{report:#}");
    assert_verdict(&report, "tls", "ok");
    let session = step(&report, "session");
    assert_eq!(session["verdict"], "fail", "{report:#}");
    assert!(
        text(&session["detail"]).contains("not known to this relay"),
        "{session:#}"
    );
    assert!(
        text(&session["hint"]).contains("agents.stranger"),
        "{session:#}"
    );
    s.stop().await;
}

#[test]
fn diagnose_a_config_that_does_not_parse_exits_64_naming_the_line() {
    let pki = TestPki::new();
    let mut config = AgentConfig::new(
        &pki,
        "db1",
        RelaySpec::quic("127.0.0.1:7443".parse().unwrap()),
    );
    config.service("orders", "127.0.0.1:3306");
    config
        .extra
        .insert("heartbeet".into(), Value::String("2s".into()));
    let path = config.write(&pki.dir().join("bad.yaml"));
    let out = std::process::Command::new(bin("postern-agent"))
        .args(["diagnose", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("fail") && stdout.contains("bad.yaml:") && stdout.contains("heartbeet"),
        "{stdout}"
    );
    assert!(stdout.contains("hint: "), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_runs_each_nodes_health_check_once_and_shows_its_verdict() {
    let s = Stack::builder()
        .pki(TestPki::lasting(90))
        .http_nodes(2)
        .no_agent()
        .start()
        .await;
    s.http_node("n2").health.set(HealthMode::Status(503));
    let (before1, before2) = (
        s.http_node("n1").health.requests(),
        s.http_node("n2").health.requests(),
    );
    let (code, report) = diagnose(&s, &s.agent_config(), "5s").await;
    // The service works with n1: n2's failing check is a warning.
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["verdict"], "warn", "{report:#}");
    let health = steps(&report, "health");
    assert_eq!(health.len(), 2, "{report:#}");
    let (n1, n2) = (health[0], health[1]);
    assert!(text(&n1["target"]).starts_with("orders/n1 "), "{n1:#}");
    assert_eq!(n1["verdict"], "ok", "{n1:#}");
    assert!(text(&n1["detail"]).starts_with("http check"), "{n1:#}");
    assert_eq!(n2["verdict"], "warn", "{n2:#}");
    assert!(text(&n2["detail"]).contains("503"), "{n2:#}");
    assert!(n2["hint"].is_string(), "{n2:#}");
    for b in steps(&report, "backend") {
        assert_eq!(b["verdict"], "ok", "{b:#}");
        assert!(text(&b["detail"]).contains("MySQL server"), "{b:#}");
    }
    // Once each.
    assert_eq!(s.http_node("n1").health.requests(), before1 + 1);
    assert_eq!(s.http_node("n2").health.requests(), before2 + 1);

    // With no node that works, the service fails.
    s.http_node("n1").health.set(HealthMode::Hang);
    let (code, report) = diagnose(&s, &s.agent_config(), "5s").await;
    assert_eq!(code, 1, "{report:#}");
    let health = steps(&report, "health");
    assert_eq!(health[0]["verdict"], "fail", "{report:#}");
    assert!(
        text(&health[0]["detail"]).contains("timed out"),
        "{report:#}"
    );
    assert_eq!(health[1]["verdict"], "fail", "{report:#}");
    s.stop().await;
}
