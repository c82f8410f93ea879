//! The main paths: the `mariadb` CLI and a Rust driver through `connect`, big values, many
//! concurrent connections, `mysqldump` through `connect --exec`, and the relay's TLS listener.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::procs::bin;
use postern_tests::*;

async fn setup() -> Stack {
    Stack::builder().mariadb().start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cli_through_connect_creates_inserts_and_selects() {
    let s = setup().await;
    let c = s.connect("alice").await;
    let out = c.cli().sql(
        "CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name TEXT); \
         INSERT INTO shop.items VALUES (1, 'anvil'), (2, 'rope'); SELECT id, name FROM shop.items ORDER BY id;",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\tanvil\n2\trope\n");
    // The rows really are in the private server.
    assert_eq!(s.db().sql("SELECT COUNT(*) FROM shop.items"), "2\n");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_round_trips_a_64_mib_value_and_200_concurrent_connections() {
    let s = setup().await;
    let c = s.connect("alice").await;
    let url = c.url();
    let pool = mysql_async::Pool::new(url.as_str());
    let mut conn = pool.get_conn().await.expect("connect through the tunnel");
    conn.query_drop(
        "CREATE DATABASE big; CREATE TABLE big.blobs (id INT PRIMARY KEY, data LONGBLOB)",
    )
    .await
    .unwrap();
    conn.query_drop("INSERT INTO big.blobs VALUES (0, 'x')")
        .await
        .unwrap();
    let rows: Vec<(i32, String)> = conn.query("SELECT id, data FROM big.blobs").await.unwrap();
    assert_eq!(rows, vec![(0, "x".to_owned())]);

    // 64 MiB of non-repeating bytes, in and out, compared by SHA-256 on both ends.
    let data = pseudo_random_bytes(64 * 1024 * 1024);
    let want = sha256_hex(&data);
    conn.exec_drop("INSERT INTO big.blobs VALUES (1, ?)", (data,))
        .await
        .unwrap();
    let server_sum: Option<String> = conn
        .query_first("SELECT SHA2(data, 256) FROM big.blobs WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        server_sum.as_deref(),
        Some(want.as_str()),
        "the server stored exactly what was sent"
    );
    let back: Option<Vec<u8>> = conn
        .query_first("SELECT data FROM big.blobs WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        sha256_hex(&back.expect("row")),
        want,
        "the client read back exactly what is stored"
    );
    drop(conn);

    // 200 connections at once, each doing real work.
    let pool = Arc::new(mysql_async::Pool::new(
        mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&url).unwrap()).pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(mysql_async::PoolConstraints::new(0, 250).unwrap()),
        ),
    ));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.get_conn().await?;
            let v: Option<u32> = conn.query_first(format!("SELECT {i} + SLEEP(0.2)")).await?;
            Ok::<_, mysql_async::Error>(v)
        }));
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(v, Some(i as u32));
        ok += 1;
    }
    assert_eq!(ok, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysqldump_through_connect_exec_restores_identically() {
    let s = setup().await;
    s.db().create_dump_source();
    let (cert, key) = s.pki.files("client-alice");
    let out = Command::new(bin("postern-agent"))
        .args(["connect", "orders", "--server-name", "localhost"])
        .arg(format!("--relay=quic://{}", s.relay().quic()))
        .arg("--ca")
        .arg(s.pki.ca())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args([
            "--exec",
            "mysqldump",
            "--no-defaults",
            "-uroot",
            "--single-transaction",
            "src",
        ])
        .output()
        .expect("run connect --exec");
    s.db().assert_restores_identically(&out);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_a_driver_with_a_client_certificate() {
    let s = setup().await;
    // A TLS-first client (as a sidecar would be) with alice's certificate, speaking MySQL inside.
    let addr = s.relay().tls("orders");
    let greeting =
        client::tls_first_packet(&s.pki, addr, Some(s.pki.client_material("alice"))).await;
    // The backend's greeting arrives through the tunnel.
    assert!(client::is_greeting(&greeting), "{greeting:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_independent_of_agents_and_readiness_is_not() {
    let s = Stack::builder().mariadb().no_agent().start().await;
    let http = s.relay().http().expect("http listener");
    assert_eq!(http_get(http, "/healthz").await.unwrap().0, 200);
    let (status, body) = http_get(http, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"services_without_agent\":[\"orders\"]"),
        "{body}"
    );
    let mut agent = s.start_agent(&s.agent_config());
    agent.wait_connected().await;
    // Ready once the agent's first report names a healthy active node.
    let body = wait_ready(http, Duration::from_secs(10)).await;
    assert!(
        body.contains("\"name\":\"db1\"") && body.contains("\"transport\":\"quic\""),
        "{body}"
    );
    agent.stop().await;
    assert_eq!(http_get(http, "/healthz").await.unwrap().0, 200);
    s.stop().await;
}
