//! Bad configs exit with status 64 and name the file, line and key; every example config parses.

use std::process::Command;
use std::time::Duration;

use postern_common::pki::Kind;
use postern_tests::procs::bin;
use postern_tests::*;

fn check(binary: &str, sub: &str, path: &std::path::Path) -> (i32, String) {
    let out = Command::new(bin(binary))
        .args([sub, "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_64_naming_file_line_and_key() {
    let pki = TestPki::new();
    let mut relay = RelayConfig::new(&pki);
    relay
        .agent("db1", &["orders"])
        .service("orders", &["alice"]);
    let mut agent = AgentConfig::new(
        &pki,
        "db1",
        RelaySpec::quic("127.0.0.1:7443".parse().unwrap()),
    );
    agent.service("orders", "127.0.0.1:3306");
    let edited_relay = |edit: &dyn Fn(&mut RelayConfig)| {
        let mut r = relay.clone();
        edit(&mut r);
        r.to_yaml()
    };
    let edited_agent = |edit: &dyn Fn(&mut AgentConfig)| {
        let mut a = agent.clone();
        edit(&mut a);
        a.to_yaml()
    };
    let cases: Vec<(&str, &str, String, &str)> = vec![
        // (binary, name, yaml, expected fragment)
        (
            "postern-relay",
            "malformed.yaml",
            relay.to_yaml() + "agents: [\n",
            "malformed.yaml:",
        ),
        (
            "postern-relay",
            "unknown.yaml",
            edited_relay(&|r| {
                r.extra.insert("heartbeet".into(), "2s".into());
            }),
            "unknown.yaml:{line:heartbeet}: key `heartbeet`: unknown field",
        ),
        (
            "postern-relay",
            "nocert.yaml",
            edited_relay(&|r| r.tls.cert = pki.dir().join("missing.pem")),
            "nocert.yaml:{line:missing.pem}: key `tls.cert`: cannot read",
        ),
        (
            "postern-relay",
            "termination.yaml",
            edited_relay(&|r| {
                r.service_mut("orders").tls_termination =
                    Some(postern_relay::config::TlsTermination::Agent)
            }),
            "termination.yaml:{line:tls_listen}: key `services.orders.tls_listen`: a TLS-first listener ends TLS \
             at the relay, and this service ends TLS at the agent",
        ),
        (
            "postern-relay",
            "huge.yaml",
            // As the user wrote it, which the error quotes.
            edited_relay(&|r| {
                r.heartbeat_interval = None;
                r.extra
                    .insert("heartbeat_interval".into(), "100000000000h".into());
            }),
            "huge.yaml:{line:heartbeat_interval}: key `heartbeat_interval`: duration \"100000000000h\" is too long",
        ),
        (
            "postern-relay",
            "range.yaml",
            edited_relay(&|r| r.heartbeat_interval = Some(Duration::from_secs(2 * 3600))),
            "range.yaml:{line:heartbeat_interval}: key `heartbeat_interval`: 2h is out of range: use a value from 100ms to 1h",
        ),
        (
            "postern-relay",
            "nolisten.yaml",
            edited_relay(&|r| (r.listen.quic, r.listen.http) = (None, None)),
            "nolisten.yaml: key `listen`: no listener",
        ),
        (
            "postern-agent",
            "agent-norelays.yaml",
            edited_agent(&|a| (a.relay, a.relays) = (None, Some(Vec::new()))),
            "agent-norelays.yaml:1: key `relays`: the list is empty",
        ),
        (
            "postern-agent",
            "agent-huge.yaml",
            // Written as a bare number, as a user might: only text can say that.
            agent.to_yaml().replace(
                "connect_timeout: 2s",
                "connect_timeout: 18446744073709551615",
            ),
            "agent-huge.yaml:{line:connect_timeout}: key `connect_timeout`: duration \"18446744073709551615\" is too long",
        ),
        (
            "postern-agent",
            "agent-unknown.yaml",
            edited_agent(&|a| {
                a.extra.insert("backnd".into(), "x".into());
            }),
            "agent-unknown.yaml:{line:backnd}: key `backnd`: unknown field",
        ),
        (
            "postern-agent",
            "agent-nokey.yaml",
            edited_agent(&|a| a.tls.key = pki.dir().join("nope-key.pem")),
            "agent-nokey.yaml:{line:nope-key}: key `tls.key`: cannot read",
        ),
        (
            "postern-agent",
            "agent-type.yaml",
            // A list where a duration belongs: only text can say that.
            agent
                .to_yaml()
                .replace("connect_timeout: 2s", "connect_timeout: [2]"),
            "agent-type.yaml:{line:connect_timeout}",
        ),
    ];
    for (binary, name, yaml, want) in cases {
        // "{line:NEEDLE}" in the expectation is the line of the yaml that contains NEEDLE.
        let want = match want.split_once("{line:") {
            Some((head, rest)) => {
                let (needle, tail) = rest.split_once('}').unwrap();
                let line = yaml.lines().position(|l| l.contains(needle)).unwrap() + 1;
                format!("{head}{line}{tail}")
            }
            None => want.to_owned(),
        };
        let want = want.as_str();
        let path = pki.dir().join(name);
        std::fs::write(&path, &yaml).unwrap();
        for sub in ["check-config", "run"] {
            let (code, err) = check(binary, sub, &path);
            assert_eq!(
                code, 64,
                "{binary} {sub} {name}: status {code}, stderr:\n{err}"
            );
            assert!(
                err.contains(want),
                "{binary} {sub} {name}: expected {want:?} in:\n{err}\nyaml:\n{yaml}"
            );
        }
    }
    // Every error is listed, not just the first.
    let path = pki.dir().join("many.yaml");
    std::fs::write(
        &path,
        edited_relay(&|r| {
            r.tls.cert = pki.dir().join("a.pem");
            r.tls.key = pki.dir().join("b.pem");
            r.listen.quic = Some("nowhere".into());
        }),
    )
    .unwrap();
    let (code, err) = check("postern-relay", "check-config", &path);
    assert_eq!(code, 64);
    assert!(
        err.contains("3 errors")
            && err.contains("listen.quic")
            && err.contains("tls.cert")
            && err.contains("tls.key"),
        "{err}"
    );
}

#[test]
fn every_example_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let mut seen = 0;
    let paths = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("cf")).unwrap())
        .map(|e| e.unwrap().path());
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Examples name certificate files that do not exist here; point them at real ones.
        let pki = TestPki::new();
        pki.issue(Kind::Agent, "db-host-1");
        let mut text = text.replace("/etc/postern/ca.pem", pki.ca().to_str().unwrap());
        for (example, real) in [
            ("server-relay", "server-relay"),
            ("server-reports", "server-relay"),
            ("agent-db-host-1", "agent-db-host-1"),
        ] {
            let (cert, key) = pki.files(real);
            text = text
                .replace(
                    &format!("/etc/postern/{example}.pem"),
                    cert.to_str().unwrap(),
                )
                .replace(
                    &format!("/etc/postern/{example}-key.pem"),
                    key.to_str().unwrap(),
                );
        }
        // And the password files they name.
        let admin_password = pki.dir().join("admin-password");
        std::fs::write(&admin_password, "x\n").unwrap();
        let text = text.replace(
            "/etc/postern/admin-password",
            admin_password.to_str().unwrap(),
        );
        let target = pki.dir().join(&name);
        // The broker's intermediate CA (cf/relay.yaml), its key in the environment.
        let root = postern_common::pki::Ca::load(pki.dir()).unwrap();
        let (broker_ca, broker_key) = root.intermediate("broker", 1).unwrap();
        std::fs::write(
            pki.dir().join("intermediate-broker.pem"),
            &broker_ca.cert_pem,
        )
        .unwrap();
        // The examples may use `${PORT}` and the environment Cloud Foundry gives the relay.
        let vcap = r#"{"postgres":[{"name":"postern-store","credentials":{"uri":"postgres://u:p@db.example.com:5432/postern"}}]}"#;
        let env = std::collections::BTreeMap::from([
            ("PORT", "8080"),
            ("POSTERN_API_PASSWORD", "api"),
            ("POSTERN_BROKER_PASSWORD", "broker"),
            ("POSTERN_BROKER_CA_KEY", broker_key.as_str()),
            ("VCAP_SERVICES", vcap),
        ]);
        if name.starts_with("relay") {
            postern_relay::Config::parse(&target, &text, &env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("agent") {
            postern_agent::Config::parse(&target, &text, &env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            continue;
        }
        seen += 1;
    }
    assert!(
        seen >= 3,
        "config-examples holds the relay and agent examples (found {seen})"
    );
}

#[test]
fn the_relay_reads_its_whole_config_from_the_environment_when_given() {
    let pki = TestPki::new();
    let (cert, key) = pki.files("server-relay");
    let yaml = format!(
        "listen:\n  http: 127.0.0.1:${{PORT}}\ntls:\n  ca: {}\n  cert: {}\n  key: {}\nservices:\n  orders:\n    clients: [alice]\n",
        pki.ca().display(),
        cert.display(),
        key.display()
    );
    let check = |text: &str| {
        Command::new(bin("postern-relay"))
            .args(["check-config", "--config", "/nonexistent/relay.yaml"])
            .env("POSTERN_RELAY_CONFIG_YAML", text)
            .env("PORT", "8080")
            .output()
            .unwrap()
    };
    let out = check(&yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "$POSTERN_RELAY_CONFIG_YAML: ok\n"
    );
    let out = check(&yaml.replace("clients: [alice]", "clients: [alice]\n    colour: red"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("$POSTERN_RELAY_CONFIG_YAML:10") && err.contains("colour"),
        "{err}"
    );
}
