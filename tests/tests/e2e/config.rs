//! Bad configs exit with status 64 and name the file, line and key; every example config parses.

use std::process::Command;

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
    pki.issue(Kind::Agent, "db1");
    let good_relay = relay_yaml(&pki, "db1", "orders", &["alice"]);
    let good_agent = agent_yaml(
        &pki,
        "db1",
        "127.0.0.1:7443".parse().unwrap(),
        "orders",
        "127.0.0.1:3306",
    );
    let cases: Vec<(&str, &str, String, &str)> = vec![
        // (binary, name, yaml, expected fragment)
        (
            "postern-relay",
            "malformed.yaml",
            good_relay.replace("agents:\n", "agents: [\n"),
            "malformed.yaml:",
        ),
        (
            "postern-relay",
            "unknown.yaml",
            good_relay.replace(
                "heartbeat_interval: 1s\n",
                "heartbeat_interval: 1s\nheartbeet: 2s\n",
            ),
            "unknown.yaml:{line:heartbeet}: key `heartbeet`: unknown field",
        ),
        (
            "postern-relay",
            "nocert.yaml",
            good_relay.replace("server-relay.pem", "missing.pem"),
            "nocert.yaml:{line:missing.pem}: key `tls.cert`: cannot read",
        ),
        (
            "postern-relay",
            "termination.yaml",
            good_relay.clone() + "    tls_termination: agent\n",
            "termination.yaml:{line:tls_listen}: key `services.orders.tls_listen`: a TLS-first listener ends TLS \
             at the relay, and this service ends TLS at the agent",
        ),
        (
            "postern-relay",
            "huge.yaml",
            good_relay.replace(
                "heartbeat_interval: 1s",
                "heartbeat_interval: 100000000000h",
            ),
            "huge.yaml:{line:heartbeat_interval}: key `heartbeat_interval`: duration \"100000000000h\" is too long",
        ),
        (
            "postern-relay",
            "range.yaml",
            good_relay.replace("heartbeat_interval: 1s", "heartbeat_interval: 2h"),
            "range.yaml:{line:heartbeat_interval}: key `heartbeat_interval`: 2h is out of range: use a value from 100ms to 1h",
        ),
        (
            "postern-relay",
            "nolisten.yaml",
            good_relay.replace(
                "listen:\n  quic: 127.0.0.1:0\n  http: 127.0.0.1:0\n",
                "listen: {}\n",
            ),
            "nolisten.yaml: key `listen`: no listener",
        ),
        (
            "postern-agent",
            "agent-norelays.yaml",
            good_agent.replace(&good_agent.lines().next().unwrap().to_owned(), "relays: []"),
            "agent-norelays.yaml:1: key `relays`: the list is empty",
        ),
        (
            "postern-agent",
            "agent-huge.yaml",
            good_agent.replace(
                "connect_timeout: 2s",
                "connect_timeout: 18446744073709551615",
            ),
            "agent-huge.yaml:{line:connect_timeout}: key `connect_timeout`: duration \"18446744073709551615\" is too long",
        ),
        (
            "postern-agent",
            "agent-unknown.yaml",
            good_agent.replace("    backend:", "    backnd: x\n    backend:"),
            "agent-unknown.yaml:{line:backnd}: key `backnd`: unknown field",
        ),
        (
            "postern-agent",
            "agent-nokey.yaml",
            good_agent.replace("agent-db1-key.pem", "nope-key.pem"),
            "agent-nokey.yaml:{line:nope-key}: key `tls.key`: cannot read",
        ),
        (
            "postern-agent",
            "agent-type.yaml",
            good_agent.replace("connect_timeout: 2s", "connect_timeout: [2]"),
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
        good_relay
            .replace("server-relay.pem", "a.pem")
            .replace("server-relay-key.pem", "b.pem")
            .replace("quic: 127.0.0.1:0", "quic: nowhere"),
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
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Examples name certificate files that do not exist here; point them at real ones.
        let pki = TestPki::new();
        pki.issue(Kind::Agent, "db-host-1");
        let text = text
            .replace("/etc/postern/ca.pem", pki.ca().to_str().unwrap())
            .replace(
                "/etc/postern/server-relay.pem",
                pki.files("server-relay").0.to_str().unwrap(),
            )
            .replace(
                "/etc/postern/server-relay-key.pem",
                pki.files("server-relay").1.to_str().unwrap(),
            )
            .replace(
                "/etc/postern/server-reports.pem",
                pki.files("server-relay").0.to_str().unwrap(),
            )
            .replace(
                "/etc/postern/server-reports-key.pem",
                pki.files("server-relay").1.to_str().unwrap(),
            )
            .replace(
                "/etc/postern/agent-db-host-1.pem",
                pki.files("agent-db-host-1").0.to_str().unwrap(),
            )
            .replace(
                "/etc/postern/agent-db-host-1-key.pem",
                pki.files("agent-db-host-1").1.to_str().unwrap(),
            );
        let target = pki.dir().join(&name);
        // The examples may use `${PORT}` (Cloud Foundry).
        let env = std::collections::BTreeMap::from([("PORT", "8080")]);
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
        seen >= 2,
        "config-examples holds the relay and agent examples (found {seen})"
    );
}
