//! What a peer can make the relay spend is bounded, and what it can make the relay write to its
//! log is too: connection limits (process-wide and per listener) refused in the client's terms,
//! refusals counted and logged within a budget, and no file read that can block the runtime.

use std::time::Duration;

use mysql_async::prelude::*;
use postern_common::events::{self, Kind, Origin};
use postern_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Reads until the peer closes or `within` passes; `Some(bytes)` if it closed.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().map(|()| got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_a_limit_are_refused_at_once_in_the_clients_terms() {
    init_logging();
    let s = Stack::builder()
        .mariadb()
        .relay(|r| {
            // The whole relay: 7 (the agent's session holds one). Service `orders`: 2
            // authorised and 2 in their handshake, so each of its listeners takes at most 4.
            // Silent sockets stay for 5 s.
            r.max_connections = Some(7);
            r.first_packet_timeout = Some(Duration::from_secs(5));
            let orders = r.service_mut("orders");
            orders.max_connections = Some(2);
            orders.max_handshakes = Some(2);
        })
        .start()
        .await;
    let (mysql, tls) = (s.relay().mysql("orders"), s.relay().tls("orders"));
    let events = s.relay().handle().events();

    // The TLS-first listener takes 4 silent sockets; the 5th is closed at once.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(tls).await.unwrap());
    }
    eventually(Duration::from_secs(5), "4 accepted connections", || {
        let n = s.relay().handle().open_connections();
        async move { (n >= 5).then_some(()) }
    })
    .await;
    let mut fifth = TcpStream::connect(tls).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2))
            .await
            .is_some(),
        "the listener's 5th connection is closed at once"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // Two more on the MySQL listener fill the relay (7); the next MySQL client reads why.
    for _ in 0..2 {
        let mut c = TcpStream::connect(mysql).await.unwrap();
        let greeting = client::read_packet(&mut c).await.unwrap();
        assert_eq!(greeting[0], 10, "a greeting");
        silent.push(c);
    }
    let refused = client::first_packet(mysql).await;
    let text = client::err_text(&refused).unwrap_or_else(|| panic!("an ERR packet: {refused:?}"));
    let packet = refused.unwrap();
    assert_eq!(u16::from_le_bytes([packet[1], packet[2]]), 1040);
    assert!(text.contains("too many connections to relay"), "{text}");
    assert!(text.contains("limit 7"), "{text}");
    // A WebSocket tunnel at a full relay is answered 503.
    let http = s.relay().http().unwrap();
    let mut ws = TcpStream::connect(http).await.unwrap();
    ws.write_all(
        format!(
            "GET /v1/tunnel HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 512];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match ws.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        head.is_ok() && answer.starts_with("HTTP/1.1 503"),
        "{answer}"
    );
    let refusals = |origin| {
        events
            .counters()
            .into_iter()
            .filter(|(k, _)| {
                k.kind == Kind::Refused
                    && k.origin == origin
                    && k.code == Some(postern_common::protocol::Code::TooManyConnections)
            })
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    assert_eq!(refusals(Origin::TlsListener), 1);
    assert_eq!(refusals(Origin::MysqlListener), 1);
    assert_eq!(refusals(Origin::Tunnel), 1);

    // Once the silent sockets go, a real client is served again.
    drop(silent);
    eventually(Duration::from_secs(5), "the slots to be free", || {
        // Only the agent's session is left.
        let n = s.relay().handle().open_connections();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let mut conn = mysql_async::Conn::new(s.mysql_opts("alice")).await.unwrap();
    let one: Option<u32> = conn.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    conn.disconnect().await.unwrap();
    s.stop().await;
}

/// Random bytes at the relay's listeners, hundreds of times a second: none is a warning, and
/// the log holds a bounded number of lines about them (the events sink's unit tests show that
/// every one is counted and that what is left out is summarised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_the_listeners_makes_no_warning_and_a_bounded_log() {
    init_logging();
    let s = Stack::builder().mariadb().relay_process().start().await;
    let relay = s.relay().proc();
    let mark = relay.mark();
    let (mysql, tls) = (s.relay().mysql("orders"), s.relay().tls("orders"));
    let garbage: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
    for addr in [mysql, tls] {
        for _ in 0..300 {
            let Ok(mut c) = TcpStream::connect(addr).await else {
                continue;
            };
            let _ = c.write_all(&garbage).await;
            let _ = closed_within(&mut c, Duration::from_secs(2)).await;
        }
    }
    // The last refusal is in the log (the budget lets the first ones through at once).
    let text = relay.proc.log_text();
    let fresh = &text[mark.offset()..];
    let refused: Vec<&str> = fresh.lines().filter(|l| l.contains("refused")).collect();
    assert!(!refused.is_empty(), "refusals are logged:\n{fresh}");
    let warnings: Vec<&str> = fresh.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(
        warnings.is_empty(),
        "no warning for what a peer can cause:\n{}",
        warnings.join("\n")
    );
    // Two kinds of refusal (one per listener), each logged at most BURST times per window
    // (the test runs well within one or two windows), plus summaries.
    let limit = 2 * 2 * events::BURST as usize + 4;
    assert!(
        refused.len() <= limit,
        "{} refusal lines for 600 refusals (limit {limit}):\n{}",
        refused.len(),
        refused.join("\n")
    );
    s.stop().await;
}

/// The relay re-reads its revocation list file on a blocking thread: a file whose read never
/// finishes (here a FIFO nobody writes) stalls no connection, even on a single-threaded
/// runtime.
#[tokio::test(flavor = "current_thread")]
async fn a_revocation_list_read_that_hangs_stalls_nothing() {
    init_logging();
    let s = Stack::builder()
        .mariadb()
        .revoked(["mallory"])
        .start()
        .await;
    let crl = s.relay_config.tls.crl.clone().expect("a revocation list");
    let pem = std::fs::read_to_string(&crl).unwrap();
    std::fs::remove_file(&crl).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&crl)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo");
    // The relay looks at the file every 2 s: give it two looks, then use the relay.
    tokio::time::sleep(postern_relay::access::REVOCATION_POLL * 2).await;
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        let mut conn = mysql_async::Conn::new(s.mysql_opts("alice")).await.unwrap();
        let one: Option<u32> = conn.query_first("SELECT 1").await.unwrap();
        conn.disconnect().await.unwrap();
        one
    })
    .await;
    // Let the blocked reader finish, with the list it expects.
    let writer = std::thread::spawn(move || std::fs::write(&crl, pem));
    assert_eq!(served.expect("served while the read hangs"), Some(1));
    writer.join().unwrap().unwrap();
    s.stop().await;
}
