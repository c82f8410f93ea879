//! Stock MySQL clients straight to the relay's MySQL-native listener: TLS negotiated in-band, a
//! client certificate, the relay's certificate verified with its name (VERIFY_IDENTITY), and
//! every refusal a MySQL error the client shows, or a relay log line when TLS itself failed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use postern_common::mysql::{
    self as my, CLIENT_MYSQL, CLIENT_PLUGIN_AUTH, CLIENT_PROTOCOL_41, CLIENT_SECURE_CONNECTION,
    CLIENT_SSL, Greeting, HandshakeResponse, Packet, PacketReader, SslRequest,
};
use postern_common::pki::Kind;
use postern_tests::client::ok;
use postern_tests::stack::StackBuilder;
use postern_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The handshake deadline of the refusal test: short, so stalled clients are dropped soon.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How late after its deadline a stalled client may be dropped (scheduling on a loaded
/// machine); a deadline counted from a later moment than accept shows up beyond it.
const DEADLINE_SLACK: Duration = Duration::from_millis(750);

/// A relay whose service `orders` (clients alice and bob) is served by an agent in front of a
/// fresh MariaDB; `b` adds to that.
fn stack(b: fn(StackBuilder) -> StackBuilder) -> impl Future<Output = Stack> {
    // Heartbeats far apart: these tests load both cores, and a starved agent must not be taken
    // for a dead one.
    let builder = Stack::builder()
        .clients(["alice", "bob"])
        .mariadb()
        .heartbeat(Duration::from_secs(5));
    b(builder).start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cli_and_mysqldump_reach_the_relay_over_tls_with_a_client_certificate() {
    let s = stack(|b| b).await;
    let alice = s.cli(Some("alice"));
    let out = alice.ok(
        "CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name TEXT); \
         INSERT INTO shop.items VALUES (1, 'anvil'), (2, 'rope'); \
         SELECT id, name FROM shop.items ORDER BY id;",
    );
    assert_eq!(out, "1\tanvil\n2\trope\n");
    assert_eq!(s.db().sql("SELECT COUNT(*) FROM shop.items"), "2\n");

    // The client's link is TLS, verified by name (--ssl-verify-server-cert).
    let status = ok(&alice.command().args(["-e", "status"]).output().unwrap());
    assert!(status.contains("Cipher in use is"), "{status}");
    // The database's view: TLS ended at the relay, and the agent's leg is plaintext.
    assert_eq!(alice.ok("SHOW STATUS LIKE 'Ssl_cipher'"), "Ssl_cipher\t\n");

    // A full dump over the same kind of connection, restored directly, compares equal.
    s.db().create_dump_source();
    let dump = alice
        .clone()
        .program("mysqldump")
        .command()
        .args(["--single-transaction", "src"])
        .output()
        .unwrap();
    s.db().assert_restores_identically(&dump);
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
    let s = stack(|b| b).await;
    let mut direct = Conn::new(Opts::from_url(&s.db().url()).unwrap())
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
    let mut relayed = Conn::new(s.mysql_opts("alice"))
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
    let s = stack(|b| b).await;
    s.db().sql(
        "INSTALL SONAME 'auth_ed25519'; \
         CREATE USER 'native'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('n-secret'); \
         CREATE USER 'edwards'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('e-secret'); \
         GRANT SELECT ON *.* TO 'native'@'%'; GRANT SELECT ON *.* TO 'edwards'@'%';",
    );
    for (user, pass) in [("native", "n-secret"), ("edwards", "e-secret")] {
        let as_user = s.cli(Some("alice")).user(user);
        let out = as_user.clone().password(pass).ok("SELECT CURRENT_USER()");
        assert_eq!(out, format!("{user}@%\n"));
        // A wrong password is the database's own refusal, passed on.
        let err = as_user.password("wrong").fails("SELECT 1");
        assert!(
            err.contains("1045") && err.contains("Access denied"),
            "{err}"
        );
    }
    // The driver logs in with a native password too.
    let mut conn = Conn::new(
        s.mysql_opts("alice")
            .user(Some("native"))
            .pass(Some("n-secret")),
    )
    .await
    .unwrap();
    let who: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(who.as_deref(), Some("native@%"));
    conn.disconnect().await.unwrap();
    s.stop().await;
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
    // The relay as a real process, so its log can be read.
    let mut s = stack(|b| {
        b.offline_service("offline")
            .handshake_timeout(HANDSHAKE_TIMEOUT)
            .relay(|r| r.service_mut("orders").max_handshakes = Some(1))
            .relay_process()
    })
    .await;
    let (pki, relay, port) = (&s.pki, s.relay().proc(), s.port());
    let alice = s.cli(Some("alice"));
    let good = || async { alice.query_async("SELECT 1").await.as_deref() == Ok("1\n") };
    assert!(good().await);
    // Each case looks only at what the relay logged after the case began.
    let tls_refused = |mark, why: &'static str| async move {
        relay
            .proc
            .wait_line(mark, procs::LOG_WAIT, why, |l| {
                l.contains("refused origin=mysql_listener")
                    && l.contains("reason=tls handshake failed")
                    && l.contains(why)
            })
            .await
    };

    // Plaintext: the client sees why.
    let mark = relay.mark();
    let err = Cli::at(port).arg("--skip-ssl").fails("SELECT 1");
    assert!(
        err.contains("1045") && err.contains("TLS with a client certificate is required"),
        "{err}"
    );
    relay
        .wait_log_after(mark, "TLS with a client certificate is required")
        .await;

    // TLS without a client certificate: the handshake completes, and an ERR says what is missing.
    let err = s.cli(None).fails("SELECT 1");
    assert!(
        err.contains("1045") && err.contains("a client certificate is required"),
        "{err}"
    );

    // A certificate from another CA, and an expired one: TLS fails, the relay's log says why.
    let mark = relay.mark();
    let other = TestPki::new();
    let (cert, key) = other.files(&other.issue(Kind::Client, "alice"));
    s.cli(None)
        .arg(&format!("--ssl-cert={}", cert.display()))
        .arg(&format!("--ssl-key={}", key.display()))
        .fails("SELECT 1");
    tls_refused(mark, "unknown issuer").await;
    let mark = relay.mark();
    let expired = pki.issue_expired(Kind::Client, "alice");
    Cli::at(port).tls(pki, Some(&expired)).fails("SELECT 1");
    tls_refused(mark, "expired").await;
    assert!(good().await);

    // A valid identity that the service does not allow.
    let err = s.cli(Some("mallory")).fails("SELECT 1");
    assert!(
        err.contains("1045")
            && err.contains("postern://client/mallory is not allowed to use service \"orders\""),
        "{err}"
    );

    // A service whose agent is not connected.
    let offline = relay.listener("offline", "mysql").port();
    let err = Cli::at(offline)
        .tls(pki, Some("client-alice"))
        .fails("SELECT 1");
    assert!(
        err.contains("1053") && err.contains("no agent is connected"),
        "{err}"
    );

    // Stalled after the greeting, and in the middle of TLS: dropped when the deadlines run out
    // (the first packet's and the handshake's, both 2 s here), counted from accept (as the
    // README says), and not much later.
    for (partial, step) in [
        (&b""[..], "the SSL request"),
        (&[0x16, 0x03, 0x01][..], "the TLS handshake"),
    ] {
        let mark = relay.mark();
        let accepted = tokio::time::Instant::now();
        let (mut tcp, _) = stalled_client(port, partial).await;
        let mut rest = Vec::new();
        tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, tcp.read_to_end(&mut rest))
            .await
            .expect("the relay dropped the stalled client")
            .ok();
        let dropped = accepted.elapsed();
        assert!(
            dropped <= HANDSHAKE_TIMEOUT + DEADLINE_SLACK,
            "stalled in {step}: dropped after {dropped:?}, deadline {HANDSHAKE_TIMEOUT:?}"
        );
        if !partial.is_empty() {
            // Mid-TLS the whole deadline applies: not cut short either.
            assert!(
                dropped >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
                "stalled in {step}: dropped after {dropped:?}, deadline {HANDSHAKE_TIMEOUT:?}"
            );
        }
        relay
            .wait_log_after(mark, &format!("timed out waiting for {step}"))
            .await;
    }
    assert!(good().await);

    // A stalled client holds the service's only place in the handshake (max_handshakes: 1): a
    // good client evicts it and is served at once.
    for partial in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let mark = relay.mark();
        let (mut tcp, _) = stalled_client(port, partial).await;
        let started = tokio::time::Instant::now();
        assert!(good().await);
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(1), tcp.read_to_end(&mut rest)).await;
        assert!(end.is_ok(), "the stalled client was evicted");
        relay
            .wait_log_after(mark, "this one had waited longest")
            .await;
    }
    assert!(good().await);

    // The agent goes away: new clients are told so.
    s.agent.take().unwrap().stop().await;
    let err = eventually(Duration::from_secs(10), "no-agent refusal", || async {
        let err = alice.query_async("SELECT 1").await.err()?;
        err.contains("no agent is connected").then_some(err)
    })
    .await;
    assert!(err.contains("1053"), "{err}");
    s.stop().await;
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
    let s = stack(|b| b.relay(|r| r.service_mut("orders").max_connections = Some(1))).await;
    let mut tcp = tokio::net::TcpStream::connect(s.relay().mysql("orders"))
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
    let alice = s.cli(Some("alice"));
    let err = alice.fails("SELECT 1");
    assert!(
        err.contains("1040")
            && err.contains("too many connections to service \"orders\" (limit 1)"),
        "{err}"
    );
    drop(conn);
    eventually(
        Duration::from_secs(5),
        "the slot to be free again",
        || async { alice.query_async("SELECT 1").await.is_ok().then_some(()) },
    )
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_policy_attribute_change_user_and_large_packets() {
    let s = stack(|b| {
        b.mariadb_with(&["--performance-schema=ON"]).relay(|r| {
            let orders = r.service_mut("orders");
            orders.allowed_users = Some(BTreeMap::from([
                ("alice".into(), vec!["root".into(), "app".into()]),
                ("bob".into(), vec!["app".into()]),
            ]));
            orders.client_attribute = Some(true);
        })
    })
    .await;
    s.db().sql(
        "CREATE USER 'app'@'%' IDENTIFIED BY 'app-pass'; GRANT ALL ON *.* TO 'app'@'%'; \
         CREATE USER 'other'@'%' IDENTIFIED BY 'other-pass'; GRANT ALL ON *.* TO 'other'@'%';",
    );
    // alice as root: allowed, and the database sees who she is.
    let mut conn = Conn::new(s.mysql_opts("alice")).await.unwrap();
    let attr = client::postern_client_attribute(&mut conn).await;
    assert_eq!(attr.as_deref(), Some("postern://client/alice"));

    // Packets of 16 MiB and more, both ways and through the command watch: a 20 MiB value in a
    // prepared statement, and again inside a 40 MiB text query.
    let data = pseudo_random_bytes(20 * 1024 * 1024);
    let want = sha256_hex(&data);
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
        assert_eq!(sha256_hex(&back.expect("row")), want, "read back {id}");
    }

    // COM_CHANGE_USER: to a user alice may use, then to one she may not.
    client::change_user(&mut conn, "app", "app-pass")
        .await
        .expect("change to an allowed user");
    let who: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(who.as_deref(), Some("app@%"));
    let attr = client::postern_client_attribute(&mut conn).await;
    assert_eq!(
        attr.as_deref(),
        Some("postern://client/alice"),
        "the new session keeps the identity"
    );
    client::change_user_refused(&mut conn, "orders", "other", "other-pass").await;
    assert!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the connection was closed"
    );
    assert_eq!(
        s.db()
            .sql("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'other'"),
        "0\n"
    );

    // bob may not log in as root, whichever way he comes.
    let err = Conn::new(s.mysql_opts("bob"))
        .await
        .expect_err("bob as root");
    assert!(
        err.to_string().contains(
            "postern://client/bob may not log in to service \"orders\" as MySQL user \"root\""
        ),
        "{err}"
    );
    let via_connect = s.connect("bob").await;
    let err = via_connect.cli().fails("SELECT 1");
    assert!(
        err.contains("1045") && err.contains("as MySQL user \"root\""),
        "{err}"
    );
    let out = via_connect
        .cli()
        .user("app")
        .password("app-pass")
        .ok("SELECT CURRENT_USER()");
    assert_eq!(out, "app@%\n");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_tls_clients_all_succeed() {
    // A generous deadline: 200 TLS handshakes at once on a small machine.
    let s = stack(|b| b.handshake_timeout(Duration::from_secs(30))).await;
    let opts: Opts = s.mysql_opts("alice").into();
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
