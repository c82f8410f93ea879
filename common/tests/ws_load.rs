//! Load tests of the WebSocket transport, in their own process so that the memory measurement
//! sees no other test's allocations: a stalled reader must neither stall the session nor make
//! it buffer without bound. Also an `#[ignore]`d throughput comparison with QUIC; run it with
//! `cargo test --release -p postern-common --test ws_load -- --ignored --nocapture`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use postern_common::transport::{Liveness, Session};
use support::{MIB, pki, quic_pair, rss_bytes, stream_pair, ws_pair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

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
    let q = quic_pair(&p, Liveness::AGENT).await;
    let (qc, qsv) = (q.client.clone(), q.server.clone());
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
