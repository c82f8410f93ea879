//! The main paths: the `mariadb` CLI and a Rust driver through `connect`, big values, many
//! concurrent connections, `mysqldump` through `connect --exec`, and the relay's TLS listener.

use std::process::Command;
use std::sync::Arc;

use mysql_async::prelude::*;
use postern_common::pki::Kind;
use postern_tests::mariadb::find;
use postern_tests::procs::bin;
use postern_tests::*;
use sha2::{Digest, Sha256};

struct Setup {
    pki: TestPki,
    db: MariaDb,
    relay: RelayRun,
    agent: AgentRun,
}

async fn setup() -> Setup {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    let db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    relay.wait_agent("db1").await;
    Setup {
        pki,
        db,
        relay,
        agent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cli_through_connect_creates_inserts_and_selects() {
    let s = setup().await;
    let c = ConnectRun::start(&s.pki, s.relay.quic, "alice", "orders").await;
    let out = client::cli(
        c.addr.port(),
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
    assert_eq!(s.db.sql("SELECT COUNT(*) FROM shop.items"), "2\n");
    s.agent.stop().await;
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_round_trips_a_64_mib_value_and_200_concurrent_connections() {
    let s = setup().await;
    let c = ConnectRun::start(&s.pki, s.relay.quic, "alice", "orders").await;
    let url = format!("mysql://root@127.0.0.1:{}/mysql", c.addr.port());
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
    let mut data = vec![0u8; 64 * 1024 * 1024];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = hex(&Sha256::digest(&data));
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
        hex(&Sha256::digest(back.expect("row"))),
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
    s.agent.stop().await;
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysqldump_through_connect_exec_restores_identically() {
    let s = setup().await;
    s.db.sql(
        "CREATE DATABASE src; USE src; CREATE TABLE src.t (id INT PRIMARY KEY, v VARCHAR(64), b BLOB); \
         INSERT INTO src.t SELECT seq, CONCAT('row ', seq), UNHEX(SHA2(seq, 256)) FROM seq_1_to_5000; \
         CREATE DATABASE dst;",
    );
    let (cert, key) = s.pki.files("client-alice");
    let out = Command::new(bin("postern-agent"))
        .args(["connect", "orders", "--server-name", "localhost"])
        .arg(format!("--relay=quic://{}", s.relay.quic))
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
    assert!(
        out.status.success(),
        "mysqldump through connect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = out.stdout;
    assert!(
        dump.len() > 100_000,
        "dump has the rows ({} bytes)",
        dump.len()
    );

    // Restore into another database directly and compare contents.
    let mut restore = Command::new(find("mariadb"))
        .args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "--protocol=TCP",
            "-uroot",
            "dst",
        ])
        .arg(format!("-P{}", s.db.addr.port()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    restore.stdin.take().unwrap().write_all(&dump).unwrap();
    assert!(restore.wait().unwrap().success());
    let sum = |db: &str| {
        s.db.sql(&format!(
            "SELECT COUNT(*), SUM(CRC32(CONCAT(id, v, HEX(b)))) FROM {db}.t"
        ))
    };
    assert_eq!(sum("src"), sum("dst"));
    assert!(sum("dst").starts_with("5000\t"));
    s.agent.stop().await;
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_a_driver_with_a_client_certificate() {
    let s = setup().await;
    // A TLS-first client (as a sidecar would be) with alice's certificate, speaking MySQL inside.
    let addr = s.relay.tls_service("orders");
    let tls = postern_common::tls::listener_client(&s.pki.client_material("alice")).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    // The backend's greeting arrives through the tunnel.
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    conn.read_exact(&mut head).await.unwrap();
    assert_eq!(head[4], 10, "a MySQL protocol-10 greeting");
    s.agent.stop().await;
    s.relay.stop().await;
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_independent_of_agents_and_readiness_is_not() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    let db = MariaDb::start().await;
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let http = relay.http.expect("http listener");
    assert_eq!(http_get(http, "/healthz").await.unwrap().0, 200);
    let (status, body) = http_get(http, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"services_without_agent\":[\"orders\"]"),
        "{body}"
    );
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(&pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    let (status, body) = http_get(http, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"name\":\"db1\"") && body.contains("\"transport\":\"quic\""),
        "{body}"
    );
    agent.stop().await;
    assert_eq!(http_get(http, "/healthz").await.unwrap().0, 200);
    relay.stop().await;
}
