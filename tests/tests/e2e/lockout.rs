//! A client that has not shown a certificate costs the relay little and the database nothing,
//! and never locks an authorised client out: the MySQL front end (at the relay, or at the agent
//! end to end) greets clients itself and opens no backend connection until the client is
//! authorised; deadlines count from accept; a full handshake gate evicts its oldest connection.
//! And what greeting first costs, connection ids of the front end's own, keeps `KILL QUERY`
//! working.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use postern_common::mysql::CLIENT_SESSION_TRACK;
use postern_relay::config::TlsTermination;
use postern_tests::stack::StackBuilder;
use postern_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Where clients' TLS ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Relay,
    EndToEnd,
}

/// A relay and an agent serving service `orders` (clients alice and bob) from `backend` (a
/// database the test runs, or something in front of one), with TLS ending per `mode`.
fn stack(mode: Mode, backend: String) -> StackBuilder {
    // Heartbeats far apart: these tests load both cores, and a starved agent must not be taken
    // for a dead one.
    let b = Stack::builder()
        .clients(["alice", "bob"])
        .heartbeat(Duration::from_secs(5))
        .agent(move |a| a.service_mut("orders").backend = Some(backend));
    match mode {
        Mode::Relay => b,
        Mode::EndToEnd => b.tls_termination("orders", TlsTermination::Agent),
    }
}

/// The soft limit of open files, which the silent-socket test needs well above 1,000.
fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        })
        .unwrap_or(u64::MAX)
}

/// `SHOW GLOBAL STATUS LIKE 'Connections'`: every connection the server has accepted.
async fn connections(admin: &mut Conn) -> u64 {
    let row: Option<(String, u64)> = admin
        .query_first("SHOW GLOBAL STATUS LIKE 'Connections'")
        .await
        .unwrap();
    row.expect("status row").1
}

/// Connects to `addr` and reads the greeting, then stays silent.
async fn silent(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut header = [0u8; 4];
    tcp.read_exact(&mut header).await.expect("greeting header");
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.expect("greeting");
    assert_eq!(payload[0], 10, "a greeting, not an error");
    tcp
}

/// Whether the peer has closed `tcp` (within a short wait).
async fn closed(tcp: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_millis(50), tcp.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn thousand_silent_sockets_then_a_good_client(mode: Mode) {
    assert!(
        open_files_limit() >= 4096,
        "this test holds over 2,000 sockets: raise the open-files limit (ulimit -n 4096)"
    );
    let db = MariaDb::start().await;
    // Long deadlines, so the silent sockets stay for the whole test; a small handshake cap,
    // so most of them are evicted by newer ones.
    let s = stack(mode, db.backend())
        .handshake_timeout(Duration::from_secs(30))
        .relay(|r| {
            r.first_packet_timeout = Some(Duration::from_secs(30));
            r.service_mut("orders").max_handshakes = Some(100);
        })
        .start()
        .await;
    let opts: Opts = s.mysql_opts("alice").into();
    // Once through, so the greeting template is in place wherever it is kept.
    let warm = Conn::new(opts.clone()).await.expect("first client");
    warm.disconnect().await.unwrap();
    let mut admin = Conn::new(Opts::from_url(&db.url()).unwrap()).await.unwrap();
    let before = connections(&mut admin).await;

    let addr = s.relay().mysql("orders");
    let mut sockets = Vec::with_capacity(1000);
    for _ in 0..1000 {
        sockets.push(silent(addr).await);
    }

    let started = Instant::now();
    let mut good = Conn::new(opts).await.expect("a good client gets through");
    let one: Option<u32> = good.query_first("SELECT 1").await.unwrap();
    let took = started.elapsed();
    assert_eq!(one, Some(1));
    eprintln!(
        "{mode:?}: a good client after 1,000 silent sockets logged in and queried in {took:?}"
    );
    assert!(took < Duration::from_secs(1), "{mode:?}: took {took:?}");
    good.disconnect().await.unwrap();

    // The database saw the good client and nobody else (this admin connection was counted
    // before).
    let after = connections(&mut admin).await;
    assert_eq!(
        after - before,
        1,
        "{mode:?}: connections the database accepted"
    );
    // The oldest silent sockets were evicted as newer ones came: 100 may wait at once.
    let mut evicted = 0;
    for tcp in &mut sockets {
        if closed(tcp).await {
            evicted += 1;
        }
    }
    assert!(evicted >= 900, "{mode:?}: {evicted} evicted");
    if mode == Mode::Relay {
        let dropped = s
            .relay()
            .handle()
            .events()
            .counters()
            .into_iter()
            .filter(|(k, _)| k.code == Some(postern_common::protocol::Code::TooManyConnections))
            .map(|(_, n)| n)
            .sum::<u64>();
        assert!(dropped >= 900, "{dropped} evictions recorded");
    }
    drop(sockets);
    admin.disconnect().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cost_the_database_nothing_and_lock_nobody_out() {
    thousand_silent_sockets_then_a_good_client(Mode::Relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cost_the_database_nothing_and_lock_nobody_out_end_to_end() {
    thousand_silent_sockets_then_a_good_client(Mode::EndToEnd).await;
}

/// How long after connecting a silent client is closed.
async fn closed_after(addr: SocketAddr, greeting: bool) -> Duration {
    let started = Instant::now();
    let mut tcp = if greeting {
        silent(addr).await
    } else {
        TcpStream::connect(addr).await.unwrap()
    };
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .expect("closed")
        .ok();
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_at_the_first_packet_deadline() {
    let db = MariaDb::start().await;
    for mode in [Mode::Relay, Mode::EndToEnd] {
        let s = stack(mode, db.backend())
            .handshake_timeout(Duration::from_secs(8))
            .relay(|r| r.first_packet_timeout = Some(Duration::from_secs(1)))
            .start()
            .await;
        // The MySQL listener: the SSLRequest is due right after the greeting.
        let took = closed_after(s.relay().mysql("orders"), true).await;
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1500),
            "{mode:?}: closed after {took:?}"
        );
        // The TLS-first listener: the ClientHello is due right after accept.
        if mode == Mode::Relay {
            let took = closed_after(s.relay().tls("orders"), false).await;
            assert!(
                took >= Duration::from_secs(1) && took < Duration::from_millis(1500),
                "tls listener: closed after {took:?}"
            );
        }
        // Still serving.
        assert_eq!(s.cli(Some("alice")).ok("SELECT 1"), "1\n");
        s.stop().await;
    }
}

/// Runs `SELECT SLEEP(30)` on `conn` in a task, which returns the connection once the query
/// ends, and whether it was interrupted (MariaDB's error 1317).
fn sleeper(mut conn: Conn) -> tokio::task::JoinHandle<(Conn, bool)> {
    tokio::spawn(async move {
        let interrupted = match conn.query_drop("SELECT SLEEP(30)").await {
            Ok(()) => false,
            Err(e) => {
                assert!(e.to_string().contains("1317"), "{e}");
                true
            }
        };
        (conn, interrupted)
    })
}

async fn kill_query(mode: Mode) {
    let db = MariaDb::start().await;
    let s = stack(mode, db.backend()).start().await;
    let opts = |who: &str| -> Opts { s.mysql_opts(who).into() };

    // The id in the front end's greeting is its own; KILL QUERY with it cancels the query.
    let victim = Conn::new(opts("alice")).await.unwrap();
    let id = victim.id();
    assert!(id >= 0x8000_0000, "{mode:?}: id {id} is the front end's");
    let sleeping = sleeper(victim);
    let mut admin = Conn::new(Opts::from_url(&db.url()).unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: Option<u32> = admin
            .query_first(
                "SELECT COUNT(*) FROM information_schema.processlist \
                 WHERE info = 'SELECT SLEEP(30)'",
            )
            .await
            .unwrap();
        if n == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the query did not start");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Another client's KILL of that id cannot reach it: the database's own "unknown thread".
    let mut bob = Conn::new(opts("bob")).await.unwrap();
    let err = bob
        .query_drop(format!("KILL QUERY {id}"))
        .await
        .expect_err("bob may not kill alice's query");
    assert!(
        err.to_string().contains("1094") && err.to_string().contains("Unknown thread id"),
        "{err}"
    );
    assert!(!sleeping.is_finished());

    let started = Instant::now();
    let mut canceller = Conn::new(opts("alice")).await.unwrap();
    canceller
        .query_drop(format!("KILL QUERY {id}"))
        .await
        .expect("alice cancels her own query");
    let (mut victim, interrupted) = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the query was cancelled")
        .unwrap();
    assert!(interrupted, "{mode:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The connection lives on; only its query was killed.
    let two: Option<u32> = victim.query_first("SELECT 2").await.unwrap();
    assert_eq!(two, Some(2));
    for c in [victim, canceller, bob, admin] {
        c.disconnect().await.unwrap();
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_query_with_the_greetings_id_cancels_a_running_query() {
    kill_query(Mode::Relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_query_with_the_greetings_id_cancels_a_running_query_end_to_end() {
    kill_query(Mode::EndToEnd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_of_another_relays_connection_id_reaches_nothing() {
    let db = MariaDb::start().await;
    let one = stack(Mode::Relay, db.backend()).start().await;
    let two = stack(Mode::Relay, db.backend()).start().await;
    let victim = Conn::new(one.mysql_opts("alice")).await.unwrap();
    let id = victim.id();
    let sleeping = sleeper(victim);
    // The same client, through another relay (another process's ids): nothing to kill there.
    let mut other = Conn::new(two.mysql_opts("alice")).await.unwrap();
    assert_ne!(other.id(), id);
    let err = other
        .query_drop(format!("KILL QUERY {id}"))
        .await
        .expect_err("unknown at the other relay");
    assert!(err.to_string().contains("Unknown thread id"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sleeping.is_finished(), "the query still runs");
    // Its own relay can.
    let mut canceller = Conn::new(one.mysql_opts("alice")).await.unwrap();
    canceller
        .query_drop(format!("KILL QUERY {id}"))
        .await
        .unwrap();
    let (victim, interrupted) = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("cancelled")
        .unwrap();
    assert!(interrupted);
    for c in [victim, canceller, other] {
        c.disconnect().await.unwrap();
    }
    one.stop().await;
    two.stop().await;
}

/// A pass-through to `backend` that, once `downgrade` is set, takes `CLIENT_SESSION_TRACK`
/// out of the server's greeting. The server then serves the client without session tracking,
/// as a server without it would: no second MariaDB version is at hand, and this is the one
/// change the test needs (a backend upgraded or replaced under a running relay).
async fn downgrading_proxy(backend: SocketAddr, downgrade: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let downgrade = downgrade.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(backend).await else {
                    return;
                };
                let mut header = [0u8; 4];
                if server.read_exact(&mut header).await.is_err() {
                    return;
                }
                let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
                let mut payload = vec![0u8; len];
                if server.read_exact(&mut payload).await.is_err() {
                    return;
                }
                if downgrade.load(Ordering::SeqCst) && matches!(payload.as_slice(), [10, ..]) {
                    // The upper capability half follows version, id, scramble part, filler,
                    // lower half, charset and status.
                    let version_end = payload.iter().position(|b| *b == 0).unwrap_or(0);
                    let high = version_end + 1 + 4 + 8 + 1 + 2 + 1 + 2;
                    let caps = u16::from_le_bytes([payload[high], payload[high + 1]])
                        & !((CLIENT_SESSION_TRACK >> 16) as u16);
                    payload[high..high + 2].copy_from_slice(&caps.to_le_bytes());
                }
                if client.write_all(&header).await.is_err()
                    || client.write_all(&payload).await.is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_greeting_changed_is_refused_once_then_works() {
    let db = MariaDb::start().await;
    let downgrade = Arc::new(AtomicBool::new(false));
    let proxy = downgrading_proxy(db.addr, downgrade.clone()).await;
    let s = stack(Mode::Relay, proxy.to_string()).start().await;
    let alice = s.cli(Some("alice"));
    assert_eq!(alice.ok("SELECT 1"), "1\n");

    // The backend now lacks session tracking, which the mariadb CLI takes when offered: the
    // first client after the change is told so, and the template follows the backend.
    downgrade.store(true, Ordering::SeqCst);
    let err = alice.fails("SELECT 1");
    assert!(
        err.contains("1053")
            && err.contains("the database has changed since this client was greeted"),
        "{err}"
    );
    assert_eq!(alice.ok("SELECT 2"), "2\n");
    // The driver too, with the template that matches.
    let mut conn = Conn::new(s.mysql_opts("alice")).await.unwrap();
    let three: Option<u32> = conn.query_first("SELECT 3").await.unwrap();
    assert_eq!(three, Some(3));
    conn.disconnect().await.unwrap();
    s.stop().await;
}
