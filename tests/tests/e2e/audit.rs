//! The audit trail and the key exchange: every tunneled connection leaves one record in the
//! relay's `audit_log` when it ends (who, which service and node, over what, bytes each way,
//! how long, how it ended), and every TLS link Postern terminates prefers the hybrid
//! post-quantum group X25519MLKEM768 while classic-only clients (the `mariadb` CLI on OpenSSL
//! 3.0) still connect, on X25519. Over QUIC and over WebSocket through nginx. And the expiry of
//! the relay's certificates, and of the client certificates it verified, in its metrics.

use std::path::Path;
use std::time::Duration;

use postern_tests::stack::Transport;
use postern_tests::*;

/// The records in the audit file so far, one JSON object per line.
fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits for the record of the connection that matches `origin` and `identity`.
async fn record_of(path: &Path, origin: &str, identity: &str) -> serde_json::Value {
    eventually(
        Duration::from_secs(10),
        &format!("the audit record of {identity} at {origin}"),
        || async {
            records(path)
                .into_iter()
                .find(|r| r["origin"] == origin && r["identity"] == identity)
        },
    )
    .await
}

/// The `mariadb` CLI sends COM_QUIT and closes its socket without a TLS close_notify, often
/// with unread bytes (a reset): the record says the connection failed, and why, and still counts
/// every byte moved before it. A clean end has no reason.
fn ended_as_the_client_left(r: &serde_json::Value) {
    match r["ended"].as_str() {
        Some("closed") => assert!(r["reason"].is_null(), "{r}"),
        Some("failed") => {
            let why = r["reason"].as_str().unwrap();
            assert!(
                why.contains("close_notify") || why.contains("reset") || why.contains("closed"),
                "{r}"
            );
        }
        _ => panic!("{r}"),
    }
}

async fn audit_and_key_exchange(transport: Transport, wire: &str) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let path = audit.to_string_lossy().into_owned();
    let s = Stack::builder()
        .clients(["alice", "bob"])
        .mariadb()
        .transport(transport)
        .relay(move |c| {
            c.instance = Some("relay-a".into());
            c.extra.insert("audit_log".into(), path.into());
        })
        .start()
        .await;

    // The agent's session with the relay is post-quantum.
    let agents = s.relay().handle().agents();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0].key_exchange, "X25519MLKEM768", "{agents:?}");
    assert_eq!(agents[0].transport.to_string(), wire);

    // A stock client on OpenSSL 3.0, which has no ML-KEM, still connects: on X25519.
    let out = s.cli(Some("alice")).ok("SELECT REPEAT('a', 5000)");
    assert_eq!(out.len(), 5001);
    let r = record_of(&audit, "mysql_listener", "postern://client/alice").await;
    assert_eq!(r["client_tls"], "X25519", "{r}");
    assert_eq!(r["service"], "orders", "{r}");
    assert_eq!(r["instance"], "relay-a", "{r}");
    assert_eq!(r["transport"], wire, "{r}");
    ended_as_the_client_left(&r);
    assert!(r["node"].is_string(), "{r}");
    assert!(
        r["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    assert!(r["bytes_down"].as_u64().unwrap() > 5000, "{r}");
    assert!(r["bytes_up"].as_u64().unwrap() > 20, "{r}");
    assert!(r["duration_ms"].is_u64(), "{r}");
    assert!(
        r["opened_at"].as_str().unwrap() <= r["closed_at"].as_str().unwrap(),
        "{r}"
    );

    // `connect`: its session with the relay is post-quantum, and the relay's record says so.
    let c = s.connect("bob").await;
    let out = c.cli().sql("SELECT 42");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = record_of(&audit, "client_stream", "postern://client/bob").await;
    assert_eq!(r["client_tls"], "X25519MLKEM768", "{r}");
    assert_eq!(r["transport"], wire, "{r}");
    ended_as_the_client_left(&r);
    assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");

    // Exactly one record per connection: the CLI's and connect's, nothing for the relay's own
    // greeting fetch.
    let all = records(&audit);
    assert_eq!(all.len(), 2, "{all:?}");
    let ids: std::collections::BTreeSet<_> = all.iter().map(|r| r["conn_id"].as_u64()).collect();
    assert_eq!(ids.len(), 2, "{all:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_audit_record_per_connection_and_post_quantum_links_over_quic() {
    audit_and_key_exchange(Transport::Quic, "quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_audit_record_per_connection_and_post_quantum_links_over_websocket() {
    audit_and_key_exchange(Transport::Websocket, "websocket").await;
}

/// The relay's certificates (a day long in these tests) show their expiry in `/metrics`, and a
/// client whose certificate expires within 30 days is counted once it has connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_and_clients_close_to_it_are_in_the_metrics() {
    let s = Stack::builder()
        .clients(["alice"])
        .mariadb()
        .api()
        .start()
        .await;
    let api = s.api(0);
    let m = api.metrics().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = |role: &str| {
        let found: Vec<f64> = m
            .samples
            .iter()
            .filter(|x| {
                x.name == "postern_certificate_expiry_timestamp_seconds"
                    && x.labels.get("role").map(String::as_str) == Some(role)
            })
            .map(|x| x.value)
            .collect();
        assert_eq!(found.len(), 1, "{role}: {:?}", m.samples);
        found[0]
    };
    for role in ["relay", "ca"] {
        let left = expiry(role) - now;
        assert!(
            left > 0.0 && left <= 86_400.0 + 60.0,
            "{role}: {left} s left"
        );
    }
    assert_eq!(s.cli(Some("alice")).ok("SELECT 1"), "1\n");
    // Other tests of this process verify their own day-long client certificates too.
    let counted = api
        .metrics()
        .await
        .sum("postern_client_certificates_expiring", &[]);
    assert!(counted >= 1.0, "{counted}");
    s.stop().await;
}
