//! Stock MySQL clients straight to the relay's MySQL-native listener: TLS negotiated in-band, a
//! client certificate, the relay's certificate verified with its name (VERIFY_IDENTITY), and
//! every refusal a MySQL error the client shows, or a relay log line when TLS itself failed.

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mysql_async::prelude::*;
use mysql_async::{ClientIdentity, Conn, Opts, OptsBuilder, SslOpts};
use postern_common::mysql::{
    self as my, CLIENT_MYSQL, CLIENT_PLUGIN_AUTH, CLIENT_PROTOCOL_41, CLIENT_SECURE_CONNECTION,
    CLIENT_SSL, Greeting, HandshakeResponse, Packet, PacketReader, SslRequest,
};
use postern_common::pki::Kind;
use postern_tests::mariadb::find;
use postern_tests::procs::RelayProc;
use postern_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

struct Setup {
    pki: TestPki,
    db: MariaDb,
    relay: RelayRun,
    agent: AgentRun,
}

/// A relay whose service `orders` (clients alice and bob; `extra`: more service keys, indented
/// by four spaces) is served by an agent in front of `db`.
async fn setup(db: MariaDb, extra: &str, timeout: &str) -> Setup {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    pki.issue(Kind::Client, "bob");
    // Heartbeats far apart: these tests load both cores, and a starved agent must not be taken
    // for a dead one.
    let yaml = relay_yaml(&pki, "db1", "orders", &["alice", "bob"])
        .replace(
            "handshake_timeout: 5s",
            &format!("handshake_timeout: {timeout}"),
        )
        .replace("heartbeat_interval: 1s", "heartbeat_interval: 5s")
        + extra;
    let relay = RelayRun::start(pki.dir(), &yaml).await;
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

impl Setup {
    fn port(&self) -> u16 {
        self.relay.service("orders").port()
    }

    async fn stop(self) {
        self.agent.stop().await;
        self.relay.stop().await;
    }
}

/// `--ssl-*` options that verify the relay by name and present certificate `base`, if any.
pub(crate) fn ssl_args(pki: &TestPki, base: Option<&str>) -> Vec<String> {
    let mut args = vec![
        format!("--ssl-ca={}", pki.ca().display()),
        "--ssl-verify-server-cert".to_owned(),
    ];
    if let Some(base) = base {
        let (cert, key) = pki.files(base);
        args.push(format!("--ssl-cert={}", cert.display()));
        args.push(format!("--ssl-key={}", key.display()));
    }
    args
}

/// A MariaDB client program aimed at `127.0.0.1:port` as `user`.
pub(crate) fn client(program: &str, port: u16, user: &str, extra: &[String]) -> Command {
    let mut c = Command::new(find(program));
    c.args(["--no-defaults", "-h", "127.0.0.1", "--protocol=TCP"])
        .arg(format!("-P{port}"))
        .arg(format!("-u{user}"))
        .args(extra);
    c
}

/// Runs `sql` with the `mariadb` CLI in batch mode.
pub(crate) fn cli(port: u16, user: &str, extra: &[String], sql: &str) -> Output {
    client("mariadb", port, user, extra)
        .args(["--batch", "--skip-column-names", "-e", sql])
        .output()
        .expect("run mariadb")
}

/// The standard output of a run that must have succeeded.
pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The standard error of a run that must have failed.
pub(crate) fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "client succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// mysql_async options for `user` at the relay's MySQL port, verifying the relay's certificate
/// against the Postern CA and presenting client certificate `base`.
pub(crate) fn driver_opts(
    pki: &TestPki,
    port: u16,
    base: &str,
    user: &str,
    pass: &str,
) -> OptsBuilder {
    let (cert, key) = pki.files(base);
    let ssl = SslOpts::default()
        .with_root_certs(vec![pki.ca().into()])
        .with_disable_built_in_roots(true)
        .with_client_identity(Some(ClientIdentity::new(cert.into(), key.into())));
    // Not `prefer_socket`: the driver would ask the server for its unix socket and try that
    // too, a second connection to the database that bypasses the relay.
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .prefer_socket(false)
        .user(Some(user))
        .pass(Some(pass))
        .db_name(Some("mysql"))
        .ssl_opts(ssl)
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(b.len() * 2);
    for x in b {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cli_and_mysqldump_reach_the_relay_over_tls_with_a_client_certificate() {
    let s = setup(MariaDb::start().await, "", "5s").await;
    let tls = ssl_args(&s.pki, Some("client-alice"));
    let out = ok(&cli(
        s.port(),
        "root",
        &tls,
        "CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name TEXT); \
         INSERT INTO shop.items VALUES (1, 'anvil'), (2, 'rope'); \
         SELECT id, name FROM shop.items ORDER BY id;",
    ));
    assert_eq!(out, "1\tanvil\n2\trope\n");
    assert_eq!(s.db.sql("SELECT COUNT(*) FROM shop.items"), "2\n");

    // The client's link is TLS, verified by name (--ssl-verify-server-cert).
    let status = ok(&client("mariadb", s.port(), "root", &tls)
        .args(["-e", "status"])
        .output()
        .unwrap());
    assert!(status.contains("Cipher in use is"), "{status}");
    // The database's view: TLS ended at the relay, and the agent's leg is plaintext.
    assert_eq!(
        ok(&cli(
            s.port(),
            "root",
            &tls,
            "SHOW STATUS LIKE 'Ssl_cipher'"
        )),
        "Ssl_cipher\t\n"
    );

    // A full dump over the same kind of connection, restored directly, compares equal.
    s.db.sql(
        "CREATE DATABASE src; USE src; CREATE TABLE src.t (id INT PRIMARY KEY, v VARCHAR(64), b BLOB); \
         INSERT INTO src.t SELECT seq, CONCAT('row ', seq), UNHEX(SHA2(seq, 256)) FROM seq_1_to_5000; \
         CREATE DATABASE dst;",
    );
    let dump = client("mysqldump", s.port(), "root", &tls)
        .args(["--single-transaction", "src"])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "mysqldump failed: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(dump.stdout.len() > 100_000, "{} bytes", dump.stdout.len());
    let mut restore = client("mariadb", s.db.addr.port(), "root", &[])
        .arg("dst")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(&dump.stdout)
        .unwrap();
    assert!(restore.wait().unwrap().success());
    let sum = |db: &str| {
        s.db.sql(&format!(
            "SELECT COUNT(*), SUM(CRC32(CONCAT(id, v, HEX(b)))) FROM {db}.t"
        ))
    };
    assert_eq!(sum("src"), sum("dst"));
    assert!(sum("dst").starts_with("5000\t"));
    s.stop().await;
}

/// What the driver test reads, the same way through the relay and directly.
#[derive(Debug, PartialEq)]
struct Readings {
    prepared: Vec<(u32, String)>,
    rows: Vec<(u32, String)>,
    call_first: Vec<u32>,
    call_second: Vec<(String, u32)>,
}

async fn read_all(conn: &mut Conn) -> Readings {
    let stmt = conn
        .prep("SELECT id, v FROM t.nums WHERE id IN (?, ?, ?) ORDER BY id")
        .await
        .unwrap();
    let prepared = conn.exec(&stmt, (5, 50_000, 99_999)).await.unwrap();
    let rows = conn
        .query("SELECT id, v FROM t.nums ORDER BY id")
        .await
        .unwrap();
    let mut result = conn.query_iter("CALL t.two()").await.unwrap();
    let call_first = result.collect::<u32>().await.unwrap();
    let call_second = result.collect::<(String, u32)>().await.unwrap();
    result.drop_result().await.unwrap();
    Readings {
        prepared,
        rows,
        call_first,
        call_second,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_with_a_client_identity_reads_what_a_direct_connection_reads() {
    let s = setup(MariaDb::start().await, "", "5s").await;
    let mut direct = Conn::new(Opts::from_url(&s.db.url()).unwrap())
        .await
        .unwrap();
    direct
        .query_drop(
            "CREATE DATABASE t; CREATE TABLE t.nums (id INT UNSIGNED PRIMARY KEY, v VARCHAR(32)); \
             INSERT INTO t.nums SELECT seq, CONCAT('value ', seq) FROM seq_1_to_100000",
        )
        .await
        .unwrap();
    direct
        .query_drop(
            "CREATE PROCEDURE t.two() BEGIN SELECT seq FROM seq_1_to_3; \
             SELECT 'x', 7; END",
        )
        .await
        .unwrap();
    let mut relayed = Conn::new(driver_opts(&s.pki, s.port(), "client-alice", "root", ""))
        .await
        .expect("connect through the relay with TLS and a client certificate");
    // Writes through a prepared statement land in the database.
    relayed
        .exec_drop(
            "UPDATE t.nums SET v = ? WHERE id = ?",
            ("changed through the relay", 50_000),
        )
        .await
        .unwrap();
    let want = read_all(&mut direct).await;
    assert_eq!(want.rows.len(), 100_000);
    assert_eq!(want.prepared[1].1, "changed through the relay");
    assert_eq!(want.call_first, vec![1, 2, 3]);
    assert_eq!(want.call_second, vec![("x".to_owned(), 7)]);
    let got = read_all(&mut relayed).await;
    assert!(got == want, "the relay changed what the driver reads");
    relayed.disconnect().await.unwrap();
    direct.disconnect().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_password_and_ed25519_users_log_in_through_the_relay() {
    let s = setup(MariaDb::start().await, "", "5s").await;
    s.db.sql(
        "INSTALL SONAME 'auth_ed25519'; \
         CREATE USER 'native'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('n-secret'); \
         CREATE USER 'edwards'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('e-secret'); \
         GRANT SELECT ON *.* TO 'native'@'%'; GRANT SELECT ON *.* TO 'edwards'@'%';",
    );
    let tls = ssl_args(&s.pki, Some("client-alice"));
    for (user, pass) in [("native", "n-secret"), ("edwards", "e-secret")] {
        let mut args = tls.clone();
        args.push(format!("--password={pass}"));
        let out = ok(&cli(s.port(), user, &args, "SELECT CURRENT_USER()"));
        assert_eq!(out, format!("{user}@%\n"));
        // A wrong password is the database's own refusal, passed on.
        let mut args = tls.clone();
        args.push("--password=wrong".to_owned());
        let err = failed(&cli(s.port(), user, &args, "SELECT 1"));
        assert!(
            err.contains("1045") && err.contains("Access denied"),
            "{err}"
        );
    }
    // The driver logs in with a native password too.
    let mut conn = Conn::new(driver_opts(
        &s.pki,
        s.port(),
        "client-alice",
        "native",
        "n-secret",
    ))
    .await
    .unwrap();
    let who: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(who.as_deref(), Some("native@%"));
    conn.disconnect().await.unwrap();
    s.stop().await;
}

/// A relay run as a real process (so its log can be read), an agent and a database.
async fn refusal_setup(pki: &TestPki) -> (RelayProc, AgentRun, MariaDb) {
    init_logging();
    pki.issue(Kind::Agent, "db1");
    pki.issue(Kind::Client, "alice");
    pki.issue(Kind::Client, "mallory");
    let db = MariaDb::start().await;
    let yaml = relay_yaml(pki, "db1", "orders", &["alice"])
        .replace("handshake_timeout: 5s", "handshake_timeout: 2s")
        .replace("heartbeat_interval: 1s", "heartbeat_interval: 5s")
        + "    max_handshakes: 1\n  offline:\n    listen: 127.0.0.1:0\n    clients: [alice]\n";
    let relay = RelayProc::start(pki.dir(), &yaml).await;
    let mut agent = AgentRun::start(
        pki.dir(),
        &agent_yaml(pki, "db1", relay.quic, "orders", &db.backend()),
    );
    agent.wait_connected().await;
    (relay, agent, db)
}

/// Reads one MySQL packet.
async fn read_packet<R: AsyncRead + Unpin>(
    io: &mut R,
    reader: &mut PacketReader,
    buf: &mut BytesMut,
) -> std::io::Result<Packet> {
    loop {
        if let Some(p) = reader.decode(buf).map_err(std::io::Error::other)? {
            return Ok(p);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_says_why_and_the_relay_keeps_serving() {
    let pki = TestPki::new();
    let (relay, agent, _db) = refusal_setup(&pki).await;
    let port = relay.listener("orders", "mysql").port();
    let alice = ssl_args(&pki, Some("client-alice"));
    let good = || ok(&cli(port, "root", &alice, "SELECT 1")) == "1\n";
    assert!(good());

    // Plaintext: the client sees why.
    let err = failed(&cli(port, "root", &["--skip-ssl".to_owned()], "SELECT 1"));
    assert!(
        err.contains("1045") && err.contains("TLS with a client certificate is required"),
        "{err}"
    );
    relay
        .wait_log("TLS with a client certificate is required")
        .await;

    // TLS without a client certificate: the handshake completes, and an ERR says what is missing.
    let err = failed(&cli(port, "root", &ssl_args(&pki, None), "SELECT 1"));
    assert!(
        err.contains("1045") && err.contains("a client certificate is required"),
        "{err}"
    );

    // A certificate from another CA, and an expired one: TLS fails, the relay's log says why.
    let other = TestPki::new();
    let foreign = other.issue(Kind::Client, "alice");
    let (cert, key) = other.files(&foreign);
    let mut args = ssl_args(&pki, None);
    args.push(format!("--ssl-cert={}", cert.display()));
    args.push(format!("--ssl-key={}", key.display()));
    failed(&cli(port, "root", &args, "SELECT 1"));
    let line = relay.wait_log("unknown issuer").await;
    assert!(line.contains("tls handshake failed"), "{line}");
    let expired = pki.issue_expired(Kind::Client, "alice");
    failed(&cli(
        port,
        "root",
        &ssl_args(&pki, Some(&expired)),
        "SELECT 1",
    ));
    let line = relay.wait_log("certificate has expired").await;
    assert!(line.contains("tls handshake failed"), "{line}");
    assert!(good());

    // A valid identity that the service does not allow.
    let err = failed(&cli(
        port,
        "root",
        &ssl_args(&pki, Some("client-mallory")),
        "SELECT 1",
    ));
    assert!(
        err.contains("1045")
            && err.contains("postern://client/mallory is not allowed to use service \"orders\""),
        "{err}"
    );

    // A service whose agent is not connected.
    let offline = relay.listener("offline", "mysql").port();
    let err = failed(&cli(offline, "root", &alice, "SELECT 1"));
    assert!(
        err.contains("1053") && err.contains("no agent is connected"),
        "{err}"
    );

    // Stalled after the greeting, and in the middle of TLS: dropped at the deadlines (the first
    // packet's and the handshake's, both 2 s here), counted from accept.
    for partial in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let (mut tcp, _) = stalled_client(port, partial).await;
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        assert!(end.is_ok(), "the relay dropped the stalled client");
    }
    relay
        .wait_log("timed out waiting for the SSL request")
        .await;
    relay
        .wait_log("timed out waiting for the TLS handshake")
        .await;

    // A stalled client holds the service's only place in the handshake (max_handshakes: 1): a
    // good client evicts it and is served at once.
    for partial in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let (mut tcp, _) = stalled_client(port, partial).await;
        let started = tokio::time::Instant::now();
        assert!(good());
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(1), tcp.read_to_end(&mut rest)).await;
        assert!(end.is_ok(), "the stalled client was evicted");
    }
    relay.wait_log("this one had waited longest").await;
    assert!(good());

    // The agent goes away: new clients are told so.
    agent.stop().await;
    let err = eventually(Duration::from_secs(10), "no-agent refusal", || async {
        let out = cli(port, "root", &alice, "SELECT 1");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.contains("no agent is connected").then_some(err)
    })
    .await;
    assert!(err.contains("1053"), "{err}");
}

/// A client that reads the greeting, sends `partial` after an SSLRequest (nothing at all when
/// `partial` is empty) and stalls; and the greeting.
async fn stalled_client(port: u16, partial: &[u8]) -> (tokio::net::TcpStream, Greeting) {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut reader, mut buf) = (PacketReader::default(), BytesMut::new());
    let greeting = read_packet(&mut tcp, &mut reader, &mut buf).await.unwrap();
    let greeting = Greeting::parse(greeting.payload).unwrap();
    if !partial.is_empty() {
        let mut wire = BytesMut::new();
        my::encode(1, &ssl_request().encode(), &mut wire);
        wire.extend_from_slice(partial);
        tcp.write_all(&wire).await.unwrap();
    }
    (tcp, greeting)
}

/// An SSLRequest as a MariaDB client sends it.
fn ssl_request() -> SslRequest {
    SslRequest {
        capabilities: CLIENT_MYSQL
            | CLIENT_PROTOCOL_41
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH
            | CLIENT_SSL,
        max_packet: 16 * 1024 * 1024,
        charset: 45,
        filler: [0; 23],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssl_request_sent_one_byte_at_a_time_is_served() {
    let s = setup(MariaDb::start().await, "    max_connections: 1\n", "5s").await;
    let mut tcp = tokio::net::TcpStream::connect(s.relay.service("orders"))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut reader, mut buf) = (PacketReader::default(), BytesMut::new());
    let greeting = read_packet(&mut tcp, &mut reader, &mut buf).await.unwrap();
    let greeting = Greeting::parse(greeting.payload).unwrap();
    assert_ne!(greeting.capabilities() & CLIENT_SSL, 0, "TLS is offered");
    assert_eq!(greeting.capabilities() & my::CLIENT_COMPRESS, 0);
    // The relay's own greeting: a connection id from its range, which real thread ids do not
    // reach, and the database's version.
    assert!(
        greeting.connection_id() >= 0x8000_0000,
        "{}",
        greeting.connection_id()
    );
    assert!(
        String::from_utf8_lossy(greeting.server_version()).contains("MariaDB"),
        "{:?}",
        String::from_utf8_lossy(greeting.server_version())
    );
    let request = ssl_request();
    let mut wire = BytesMut::new();
    my::encode(1, &request.encode(), &mut wire);
    for b in wire.iter() {
        tcp.write_all(&[*b]).await.unwrap();
        // Pacing, so each byte travels in its own segment.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let tls = postern_common::tls::listener_client(&s.pki.client_material("alice")).unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS after a byte-by-byte SSLRequest");
    let response = HandshakeResponse {
        capabilities: request.capabilities,
        max_packet: request.max_packet,
        charset: request.charset,
        filler: request.filler,
        username: "root".into(),
        auth_response: Default::default(),
        database: None,
        auth_plugin: Some("mysql_native_password".into()),
        attributes: None,
        zstd_level: None,
        rest: Default::default(),
    };
    let mut wire = BytesMut::new();
    my::encode(2, &response.encode(), &mut wire);
    conn.write_all(&wire).await.unwrap();
    let (mut reader, mut buf) = (PacketReader::new(usize::MAX), BytesMut::new());
    // Authorised: the database's scramble comes in an AuthSwitchRequest, and the (empty)
    // password's answer to it logs the client in.
    let switch = read_packet(&mut conn, &mut reader, &mut buf).await.unwrap();
    assert_eq!((switch.seq, switch.payload[0]), (3, 0xfe), "auth switch");
    assert!(switch.payload.starts_with(b"\xfemysql_native_password\0"));
    assert_eq!(
        switch.payload.len(),
        1 + 22 + 21,
        "20 bytes of scramble and a NUL"
    );
    let mut wire = BytesMut::new();
    my::encode(4, &[], &mut wire);
    conn.write_all(&wire).await.unwrap();
    let answer = read_packet(&mut conn, &mut reader, &mut buf).await.unwrap();
    assert_eq!((answer.seq, answer.payload[0]), (5, 0x00), "logged in");
    let mut wire = BytesMut::new();
    my::encode(0, b"\x03SELECT 6 * 7", &mut wire);
    conn.write_all(&wire).await.unwrap();
    let row = loop {
        let p = read_packet(&mut conn, &mut reader, &mut buf).await.unwrap();
        if p.payload[..] == b"\x0242"[..] {
            break p;
        }
        assert_ne!(p.payload[0], 0xff, "query failed");
    };
    // Column count, column definition, EOF (no CLIENT_DEPRECATE_EOF), then the row.
    assert_eq!(row.seq, 4);

    // That connection is the service's only slot: the next client is told so.
    let alice = ssl_args(&s.pki, Some("client-alice"));
    let err = failed(&cli(s.port(), "root", &alice, "SELECT 1"));
    assert!(
        err.contains("1040")
            && err.contains("too many connections to service \"orders\" (limit 1)"),
        "{err}"
    );
    drop(conn);
    eventually(
        Duration::from_secs(5),
        "the slot to be free again",
        || async {
            cli(s.port(), "root", &alice, "SELECT 1")
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_policy_attribute_change_user_and_large_packets() {
    let db = MariaDb::start_with(&["--performance-schema=ON"]).await;
    let policy = "    allowed_users:\n      alice: [root, app]\n      bob: [app]\n    client_attribute: true\n";
    let s = setup(db, policy, "5s").await;
    s.db.sql(
        "CREATE USER 'app'@'%' IDENTIFIED BY 'app-pass'; GRANT ALL ON *.* TO 'app'@'%'; \
         CREATE USER 'other'@'%' IDENTIFIED BY 'other-pass'; GRANT ALL ON *.* TO 'other'@'%';",
    );
    let port = s.port();

    // alice as root: allowed, and the database sees who she is.
    let mut conn = Conn::new(driver_opts(&s.pki, port, "client-alice", "root", ""))
        .await
        .unwrap();
    let attr: Option<String> = conn
        .query_first(
            "SELECT ATTR_VALUE FROM performance_schema.session_connect_attrs \
             WHERE PROCESSLIST_ID = CONNECTION_ID() AND ATTR_NAME = 'postern_client'",
        )
        .await
        .unwrap();
    assert_eq!(attr.as_deref(), Some("postern://client/alice"));

    // Packets of 16 MiB and more, both ways and through the command watch: a 20 MiB value in a
    // prepared statement, and again inside a 40 MiB text query.
    let mut data = vec![0u8; 20 * 1024 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = hex(&Sha256::digest(&data));
    conn.query_drop("CREATE DATABASE big; CREATE TABLE big.b (id INT PRIMARY KEY, data LONGBLOB)")
        .await
        .unwrap();
    conn.exec_drop("INSERT INTO big.b VALUES (1, ?)", (data.clone(),))
        .await
        .unwrap();
    conn.query_drop(format!("INSERT INTO big.b VALUES (2, X'{}')", hex(&data)))
        .await
        .unwrap();
    for id in [1, 2] {
        let sum: Option<String> = conn
            .query_first(format!("SELECT SHA2(data, 256) FROM big.b WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(sum.as_deref(), Some(want.as_str()), "stored value {id}");
        let back: Option<Vec<u8>> = conn
            .query_first(format!("SELECT data FROM big.b WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(
            hex(&Sha256::digest(back.expect("row"))),
            want,
            "read back {id}"
        );
    }

    // COM_CHANGE_USER: to a user alice may use, then to one she may not.
    conn.change_user(
        mysql_async::ChangeUserOpts::default()
            .with_user(Some("app".into()))
            .with_pass(Some("app-pass".into())),
    )
    .await
    .expect("change to an allowed user");
    let who: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(who.as_deref(), Some("app@%"));
    let attr: Option<String> = conn
        .query_first(
            "SELECT ATTR_VALUE FROM performance_schema.session_connect_attrs \
             WHERE PROCESSLIST_ID = CONNECTION_ID() AND ATTR_NAME = 'postern_client'",
        )
        .await
        .unwrap();
    assert_eq!(
        attr.as_deref(),
        Some("postern://client/alice"),
        "the new session keeps the identity"
    );
    let err = conn
        .change_user(
            mysql_async::ChangeUserOpts::default()
                .with_user(Some("other".into()))
                .with_pass(Some("other-pass".into())),
        )
        .await
        .expect_err("change to a user outside the policy");
    let text = err.to_string();
    assert!(
        text.contains("1045")
            && text.contains("may not log in to service \"orders\" as MySQL user \"other\""),
        "{text}"
    );
    assert!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the connection was closed"
    );
    assert_eq!(
        s.db.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'other'"),
        "0\n"
    );

    // bob may not log in as root, whichever way he comes.
    let err = Conn::new(driver_opts(&s.pki, port, "client-bob", "root", ""))
        .await
        .expect_err("bob as root");
    assert!(
        err.to_string().contains(
            "postern://client/bob may not log in to service \"orders\" as MySQL user \"root\""
        ),
        "{err}"
    );
    let via_connect = ConnectRun::start(&s.pki, s.relay.quic, "bob", "orders").await;
    let err = failed(&cli(via_connect.addr.port(), "root", &[], "SELECT 1"));
    assert!(
        err.contains("1045") && err.contains("as MySQL user \"root\""),
        "{err}"
    );
    let out = ok(&cli(
        via_connect.addr.port(),
        "app",
        &["--password=app-pass".to_owned()],
        "SELECT CURRENT_USER()",
    ));
    assert_eq!(out, "app@%\n");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_tls_clients_all_succeed() {
    // A generous deadline: 200 TLS handshakes at once on a small machine.
    let s = setup(MariaDb::start().await, "", "30s").await;
    let opts: Opts = driver_opts(&s.pki, s.port(), "client-alice", "root", "").into();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(opts).await?;
            let v: Option<u32> = conn.query_first(format!("SELECT {i} + SLEEP(0.2)")).await?;
            let n: Option<u32> = conn
                .exec_first(
                    "SELECT COUNT(*) FROM seq_1_to_1000 WHERE seq % ? = 0",
                    (i + 1,),
                )
                .await?;
            conn.disconnect().await?;
            Ok::<_, mysql_async::Error>((v, n))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (v, n) = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(v, Some(i as u32));
        assert_eq!(n, Some(1000 / (i as u32 + 1)));
    }
    s.stop().await;
}
