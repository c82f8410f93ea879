//! Load tests of the WebSocket transport, in their own process so that the memory measurement
//! sees no other test's allocations: a stalled reader must neither stall the session nor make
//! it buffer without bound. Also an `#[ignore]`d throughput comparison with QUIC; run it with
//! `cargo test --release -p postern-common --test ws_load -- --ignored --nocapture`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use postern_common::pki::{Ca, Kind, LeafSpec};
use postern_common::tls::Material;
use postern_common::transport::{Session, Stream, quic, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

struct Pki {
    relay: Material,
    agent: Material,
}

fn pki() -> Pki {
    let (ca, _) = Ca::generate("test ca", 1).unwrap();
    let issue = |spec: &LeafSpec| {
        let issued = ca.issue(spec).unwrap();
        Material::from_pem(&ca.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap()
    };
    let mut relay = LeafSpec::new(Kind::Server, "relay", 1);
    relay.dns.push("localhost".into());
    relay.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    Pki {
        relay: issue(&relay),
        agent: issue(&LeafSpec::new(Kind::Agent, "db1", 1)),
    }
}

/// A WebSocket session pair over 127.0.0.1: (agent side, relay side). With `outer_tls`, the
/// WebSocket runs over TLS as well (wss).
async fn ws_pair(p: &Pki, outer_tls: bool) -> (Session, Session) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let relay = p.relay.clone();
    let server = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        if outer_tls {
            let mut cfg =
                rustls::ServerConfig::builder_with_provider(postern_common::tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(relay.chain.clone(), relay.key.clone_key())
                    .unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
                .accept(tcp)
                .await
                .unwrap();
            let ws = ws::upgrade(tls, ws::DEFAULT_PATH).await.unwrap();
            ws::accept(ws, remote, &relay).await.unwrap()
        } else {
            let ws = ws::upgrade(tcp, ws::DEFAULT_PATH).await.unwrap();
            ws::accept(ws, remote, &relay).await.unwrap()
        }
    });
    let scheme = if outer_tls { "wss" } else { "ws" };
    let url = format!("{scheme}://localhost:{port}").parse().unwrap();
    let opts = ws::ConnectOptions::new(url, "localhost");
    let client = ws::connect(&opts, &p.agent).await.unwrap();
    (client, server.await.unwrap())
}

async fn quic_pair(p: &Pki) -> (Session, Session, quinn::Endpoint, quinn::Endpoint) {
    let idle = Duration::from_secs(30);
    let server_ep = quic::server("127.0.0.1:0".parse().unwrap(), &p.relay, idle).unwrap();
    let addr: SocketAddr = server_ep.local_addr().unwrap();
    let ep = server_ep.clone();
    let server = tokio::spawn(async move {
        let incoming = ep.accept().await.unwrap();
        quic::accept(incoming).await.unwrap()
    });
    let client_ep = quic::client(addr, &p.agent, idle).unwrap();
    let client = quic::connect(&client_ep, addr, "localhost").await.unwrap();
    (client, server.await.unwrap(), server_ep, client_ep)
}

/// Opens a stream from `from` and accepts it on `to`.
async fn stream_pair(from: &Session, to: &Session) -> (Stream, Stream) {
    let mut a = from.open().await.unwrap();
    a.write_all(b"x").await.unwrap();
    a.flush().await.unwrap();
    let mut b = to.accept().await.unwrap();
    let mut x = [0u8; 1];
    b.read_exact(&mut x).await.unwrap();
    (a, b)
}

/// Resident memory of this process, from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_neither_blocks_other_streams_nor_grows_memory() {
    const BULK: u64 = 256 * MIB;
    let p = pki();
    let (client, server) = ws_pair(&p, false).await;

    // A stream whose reader never reads, with a writer that keeps trying.
    let (mut stalled_w, _stalled_r) = stream_pair(&client, &server).await;
    let pushed = Arc::new(AtomicUsize::new(0));
    let progress = pushed.clone();
    let stalled_writer = tokio::spawn(async move {
        let chunk = vec![1u8; 16 * 1024];
        loop {
            if stalled_w.write_all(&chunk).await.is_err() {
                break;
            }
            progress.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });

    let base = rss_bytes();
    let peak = Arc::new(AtomicU64::new(base));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let (mut w, mut r) = stream_pair(&client, &server).await;
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..BULK / chunk.len() as u64 {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
        }
    })
    .await
    .expect("bulk transfer stalled behind the stalled stream");
    writer.await.unwrap();
    let elapsed = started.elapsed();
    sampler.abort();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(base);
    let stuck = pushed.load(Ordering::Relaxed);
    println!(
        "bulk {} MiB in {elapsed:?}, peak rss growth {} MiB, stalled writer pushed {} KiB",
        got / MIB,
        growth / MIB,
        stuck / 1024
    );
    assert_eq!(got, BULK);
    // The stalled stream takes yamux's initial window (256 KiB) and no more.
    assert!(stuck <= 512 * 1024, "stalled writer pushed {stuck} bytes");
    assert!(
        !stalled_writer.is_finished(),
        "the stalled writer must be blocked, not failed"
    );
    // Windows (at most 256 KiB per stream plus ws::EXTRA_WINDOW) and a few 64 KiB buffers;
    // unbounded buffering would show the 256 MiB.
    assert!(
        growth < 64 * MIB,
        "rss grew by {} MiB while moving {} MiB",
        growth / MIB,
        BULK / MIB
    );
    stalled_writer.abort();
}

async fn one_stream_throughput(client: &Session, server: &Session, bytes: u64) -> f64 {
    let (mut w, mut r) = stream_pair(client, server).await;
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![9u8; 64 * 1024];
        for _ in 0..bytes / chunk.len() as u64 {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    writer.await.unwrap();
    assert_eq!(got, bytes);
    bytes as f64 / MIB as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput measurement; run in release with --ignored --nocapture"]
async fn throughput_yamux_over_websocket_versus_quic() {
    const BYTES: u64 = 512 * MIB;
    const RUNS: usize = 3;
    let p = pki();
    let (wc, wsv) = ws_pair(&p, false).await;
    let (sc, ssv) = ws_pair(&p, true).await;
    let (qc, qsv, _e1, _e2) = quic_pair(&p).await;
    let mut best = [0f64; 3];
    for run in 0..RUNS {
        // Interleaved, so that drift on a shared machine hits all three alike.
        let ws = one_stream_throughput(&wc, &wsv, BYTES).await;
        let wss = one_stream_throughput(&sc, &ssv, BYTES).await;
        let q = one_stream_throughput(&qc, &qsv, BYTES).await;
        println!("run {run}: ws {ws:.0} MiB/s, wss {wss:.0} MiB/s, quic {q:.0} MiB/s");
        for (b, v) in best.iter_mut().zip([ws, wss, q]) {
            *b = b.max(v);
        }
    }
    let [ws, wss, q] = best;
    println!(
        "best of {RUNS}: yamux/ws {ws:.0} MiB/s ({:.2}x quic), yamux/wss {wss:.0} MiB/s ({:.2}x quic), quic {q:.0} MiB/s",
        ws / q,
        wss / q
    );
}
