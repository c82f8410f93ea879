//! How streams end, through relay and agent, on QUIC and on WebSocket.
//!
//! - A transfer cut by a dying relay, agent or (WebSocket) router ends in an error at the
//!   client, never in a clean end of stream that would pass a truncated result off as whole:
//!   bytes through `connect` and through the relay's TLS-first listener, and a large SELECT
//!   through `connect` and through the relay's MySQL listener. What did arrive is checked
//!   against what was sent, byte for byte or row by row.
//! - Half-close travels: a client that shuts its write side is seen by the backend as end of
//!   stream, and the backend's answer still comes back.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::client::tls_first;
use postern_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the bulk backend sends in all.
const TOTAL: usize = 64 * 1024 * 1024;
/// What it sends before it waits for the cut.
const BEFORE_CUT: usize = 8 * 1024 * 1024;
/// Rows of the paced SELECT (each about 4 KiB, 20 ms apart: six seconds in all, so every cut
/// lands in the middle).
const ROWS: usize = 300;

/// Which part dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Relay,
    Agent,
    Router,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_a_dying_agent_fails_transfers_loudly() {
    cut(Transport::Quic, Victim::Agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_a_dying_relay_fails_transfers_loudly() {
    cut(Transport::Quic, Victim::Relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_a_dying_agent_fails_transfers_loudly() {
    cut(Transport::Websocket, Victim::Agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_a_dying_relay_fails_transfers_loudly() {
    cut(Transport::Websocket, Victim::Relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_a_dying_router_fails_transfers_loudly() {
    cut(Transport::Websocket, Victim::Router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_half_close_reaches_the_backend_and_its_answer_comes_back() {
    half_close(Transport::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_half_close_reaches_the_backend_and_its_answer_comes_back() {
    half_close(Transport::Websocket).await;
}

/// Starts four transfers through the stack, kills `victim` while all are under way, and checks
/// that each ends in an error with only correct data before it.
async fn cut(transport: Transport, victim: Victim) {
    let bulk = Bulk::start().await;
    let mut b = Stack::builder()
        .mariadb()
        .service("orders")
        .tcp_service("bulk", bulk.addr)
        .transport(transport);
    b = match victim {
        Victim::Relay => b.relay_process(),
        Victim::Agent => b.agent_process(),
        Victim::Router => b,
    };
    let mut s = b.start().await;

    // Bytes through `connect`, and through the relay's TLS-first listener.
    let via_connect = s.connect_service("alice", "bulk").await;
    let tcp = TcpStream::connect(via_connect.addr).await.unwrap();
    let bytes_connect = Reader::spawn(tcp);
    let tls = tls_first(
        &s.pki,
        s.relay().tls("bulk"),
        Some(s.pki.client_material("alice")),
    )
    .await
    .unwrap();
    let bytes_listener = Reader::spawn(tls);
    // A paced SELECT through `connect`, and through the relay's MySQL listener.
    let sql_connect_run = s.connect("alice").await;
    let sql_connect = Select::spawn(mysql_async::Opts::from_url(&sql_connect_run.url()).unwrap());
    let sql_listener = Select::spawn(s.mysql_opts("alice").into());

    for (what, progress, enough) in [
        ("bytes through connect", &bytes_connect.progress, BEFORE_CUT),
        (
            "bytes through the listener",
            &bytes_listener.progress,
            BEFORE_CUT,
        ),
        ("rows through connect", &sql_connect.progress, 1),
        ("rows through the listener", &sql_listener.progress, 1),
    ] {
        eventually(
            Duration::from_secs(15),
            &format!("{what} to be under way"),
            || async { (progress.load(Ordering::Relaxed) >= enough).then_some(()) },
        )
        .await;
    }

    // Every transfer is still under way: whatever ends them now is the cut.
    for (what, done) in [
        ("bytes through connect", bytes_connect.task.is_finished()),
        (
            "bytes through the listener",
            bytes_listener.task.is_finished(),
        ),
        ("rows through connect", sql_connect.task.is_finished()),
        ("rows through the listener", sql_listener.task.is_finished()),
    ] {
        assert!(!done, "{what} ended before the cut");
    }
    let killed = tokio::time::Instant::now();
    match victim {
        Victim::Relay => s.relay_mut().proc_mut().proc.kill(),
        Victim::Agent => s.agent_proc_mut().kill(),
        Victim::Router => s.nginx_mut().kill(),
    }
    // The backend would send the rest now: a path that survived would deliver it whole.
    bulk.release();

    // Every side learns of the death within about three seconds (README: a `connect` session
    // notices a dead relay within ~3 s; a relay, a dead agent within two heartbeats of 1 s).
    let within = Duration::from_secs(5);
    for (what, reader) in [
        ("bytes through connect", bytes_connect),
        ("bytes through the listener", bytes_listener),
    ] {
        let end = tokio::time::timeout(within, reader.task)
            .await
            .unwrap_or_else(|_| panic!("{what}: no end within {within:?} of the cut"))
            .unwrap();
        match end {
            (Err(e), at) => eprintln!("{victim:?} died; {what}: {e} after {:?}", at - killed),
            (Ok(n), _) => panic!(
                "{what}: a clean end of stream after {n} of {TOTAL} bytes, though {victim:?} died"
            ),
        }
    }
    for (what, select) in [
        ("rows through connect", sql_connect),
        ("rows through the listener", sql_listener),
    ] {
        let end = tokio::time::timeout(within, select.task)
            .await
            .unwrap_or_else(|_| panic!("{what}: no end within {within:?} of the cut"))
            .unwrap();
        match end {
            (Err(e), at) => eprintln!("{victim:?} died; {what}: {e} after {:?}", at - killed),
            (Ok(n), _) => panic!("{what}: the SELECT completed with {n} of {ROWS} rows"),
        }
    }
    drop((via_connect, sql_connect_run));
    s.stop().await;
}

/// A client shuts its write side after 4 MiB; the backend answers with their SHA-256 only
/// after it has seen the end of stream. Through `connect` and the TLS-first listener.
async fn half_close(transport: Transport) {
    let backend = digest_after_eof().await;
    let s = Stack::builder()
        .tcp_service("digest", backend)
        .transport(transport)
        .start()
        .await;
    let data = pseudo_random_bytes(4 * 1024 * 1024);
    let want = format!("{}\n", sha256_hex(&data));

    let c = s.connect_service("alice", "digest").await;
    let tcp = TcpStream::connect(c.addr).await.unwrap();
    assert_eq!(exchange(tcp, &data).await, want, "through connect");

    let tls = tls_first(
        &s.pki,
        s.relay().tls("digest"),
        Some(s.pki.client_material("alice")),
    )
    .await
    .unwrap();
    assert_eq!(
        exchange(tls, &data).await,
        want,
        "through the TLS-first listener"
    );
    s.stop().await;
}

/// Writes `data`, shuts the write side, and reads the answer to its end.
async fn exchange<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S, data: &[u8]) -> String {
    io.write_all(data).await.unwrap();
    io.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(15), io.read_to_string(&mut answer))
        .await
        .expect("an answer after the half-close")
        .expect("a clean end after the answer");
    answer
}

/// A backend that reads to the end of stream, then answers with the SHA-256 of what it read
/// and closes.
async fn digest_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if tcp.read_to_end(&mut got).await.is_ok() {
                    let answer = format!("{}\n", sha256_hex(&got));
                    let _ = tcp.write_all(answer.as_bytes()).await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A backend that sends [`BEFORE_CUT`] bytes of a known stream on each connection, waits to be
/// released, then sends the rest of [`TOTAL`] and closes cleanly.
struct Bulk {
    addr: SocketAddr,
    release: watch::Sender<bool>,
}

impl Bulk {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = watch::channel(false);
        let data: Arc<Vec<u8>> = Arc::new(pseudo_random_bytes(TOTAL));
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (data, mut released) = (data.clone(), released.clone());
                tokio::spawn(async move {
                    if tcp.write_all(&data[..BEFORE_CUT]).await.is_err() {
                        return;
                    }
                    if released.wait_for(|r| *r).await.is_err() {
                        return;
                    }
                    if tcp.write_all(&data[BEFORE_CUT..]).await.is_ok() {
                        let _ = tcp.shutdown().await;
                    }
                });
            }
        });
        Self { addr, release }
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Reads a [`Bulk`] stream, checking every byte; ends with the byte count at a clean end of
/// stream (having checked the SHA-256 of the whole), or the error.
struct Reader {
    progress: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Result<usize, String>, tokio::time::Instant)>,
}

impl Reader {
    fn spawn<S: AsyncRead + Unpin + Send + 'static>(mut io: S) -> Self {
        let progress = Arc::new(AtomicUsize::new(0));
        let seen = progress.clone();
        let task = tokio::spawn(ended(async move {
            let want = pseudo_random_bytes(TOTAL);
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = io.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                let at = got.len();
                assert!(
                    at + n <= TOTAL && buf[..n] == want[at..at + n],
                    "bytes {at}..{} differ from what the backend sent",
                    at + n
                );
                got.extend_from_slice(&buf[..n]);
                seen.store(got.len(), Ordering::Relaxed);
            }
            if got.len() == TOTAL {
                assert_eq!(sha256_hex(&got), sha256_hex(&want), "a complete stream");
            }
            Ok(got.len())
        }));
        Self { progress, task }
    }
}

/// Streams a paced SELECT whose rows carry their own SHA-256, checking each row; ends with the
/// row count when the result completes (all of them checked), or the error.
struct Select {
    progress: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Result<usize, String>, tokio::time::Instant)>,
}

impl Select {
    fn spawn(opts: mysql_async::Opts) -> Self {
        let progress = Arc::new(AtomicUsize::new(0));
        let seen = progress.clone();
        let task = tokio::spawn(ended(async move {
            let mut conn = mysql_async::Conn::new(opts)
                .await
                .map_err(|e| e.to_string())?;
            let sql = format!(
                "SELECT seq, SHA2(seq, 256), REPEAT(SHA2(seq, 256), 64), SLEEP(0.02) \
                 FROM seq_1_to_{ROWS}"
            );
            let mut result = conn.query_iter(sql).await.map_err(|e| e.to_string())?;
            let mut rows = 0;
            while let Some(row) = result.next().await.map_err(|e| e.to_string())? {
                let (seq, sum, pad, _): (usize, String, String, u32) = mysql_async::from_row(row);
                assert_eq!(seq, rows + 1, "rows in order");
                assert_eq!(sum, sha256_hex(seq.to_string().as_bytes()), "row {seq}");
                assert_eq!(pad, sum.repeat(64), "row {seq}");
                rows += 1;
                seen.store(rows, Ordering::Relaxed);
            }
            assert_eq!(rows, ROWS, "a complete result has every row");
            Ok(rows)
        }));
        Self { progress, task }
    }
}

/// `run`'s outcome and when it came.
async fn ended<T>(run: impl Future<Output = T>) -> (T, tokio::time::Instant) {
    let out = run.await;
    (out, tokio::time::Instant::now())
}
