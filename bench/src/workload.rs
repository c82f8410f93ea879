//! The workloads, each run against one path (see [`Path`]) with mysql_async as the client.
//!
//! - bulk read: a 64 MiB LONGBLOB selected repeatedly; bulk write: the same size sent as a
//!   prepared-statement parameter into an `UPDATE` (both in MiB/s);
//! - point select: sysbench's `oltp_point_select` (`SELECT c FROM sbtest1 WHERE id=?`, prepared,
//!   random ids) on one connection and on several concurrent ones, for a fixed duration;
//! - connection setup: a new connection (TCP, handshake, authentication, the client's settings
//!   query) then `disconnect`, repeated;
//! - idle connections: many connections held open after one `SELECT 1`, for the memory figure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mysql_async::prelude::{Query, Queryable, WithParams};
use mysql_async::{ClientIdentity, Conn, Opts, OptsBuilder, SslOpts};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The benchmark database.
const DB: &str = "bench";
/// How many connections are opened at once when filling the idle set.
const OPEN_PARALLEL: usize = 16;

/// The ways to reach the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Straight to mariadbd, plaintext.
    Direct,
    /// Through `connect`, the relay and the agent over QUIC.
    Quic,
    /// Through `connect`, the relay and the agent over WebSocket.
    WebSocket,
    /// Straight to mariadbd with TLS (and the client certificate).
    DirectTls,
    /// TLS to the relay's MySQL-native listener, then QUIC to the agent and on to mariadbd.
    RelayTls,
}

impl Path {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Quic => "QUIC",
            Self::WebSocket => "WebSocket",
            Self::DirectTls => "direct TLS",
            Self::RelayTls => "relay MySQL-TLS",
        }
    }
}

/// Connection options for `addr`, as root on the bench database.
///
/// `prefer_socket` is off: otherwise mysql_async notices the server is local and switches to
/// its Unix socket, which would bypass the tunnel.
pub(crate) fn opts(addr: SocketAddr, db: Option<&str>) -> Opts {
    builder(addr, db).into()
}

/// Like [`opts`], with TLS in-band (as MySQL does it): the server's certificate is verified
/// against `ca` and its name (here its address), and the client presents `cert` and `key`.
pub(crate) fn tls_opts(
    addr: SocketAddr,
    db: Option<&str>,
    ca: &std::path::Path,
    (cert, key): &(PathBuf, PathBuf),
) -> Opts {
    let ssl = SslOpts::default()
        .with_root_certs(vec![ca.to_path_buf().into()])
        .with_disable_built_in_roots(true)
        .with_client_identity(Some(ClientIdentity::new(
            cert.clone().into(),
            key.clone().into(),
        )));
    builder(addr, db).ssl_opts(ssl).into()
}

fn builder(addr: SocketAddr, db: Option<&str>) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some("root"))
        .db_name(db)
        .prefer_socket(false)
}

/// Creates the bench database: `sbtest1` with `rows` rows, and `blobs` holding one blob of
/// `blob_bytes` random bytes (id 1, read by the bulk test) and a row for the write test (id 2).
pub(crate) async fn prepare(server: SocketAddr, rows: u32, blob_bytes: usize) -> Result<()> {
    let mut conn = Conn::new(opts(server, None))
        .await
        .context("connect to mariadbd")?;
    conn.query_drop(format!("CREATE DATABASE {DB}"))
        .await
        .context("create database")?;
    conn.query_drop(format!("USE {DB}")).await?;
    conn.query_drop(
        "CREATE TABLE sbtest1 (id INT NOT NULL PRIMARY KEY, k INT NOT NULL DEFAULT 0, \
         c CHAR(120) NOT NULL DEFAULT '', pad CHAR(60) NOT NULL DEFAULT '', KEY k_1 (k)) \
         ENGINE=InnoDB",
    )
    .await
    .context("create sbtest1")?;
    let mut rng = StdRng::seed_from_u64(1);
    let mut id = 1;
    while id <= rows {
        let end = (id + 999).min(rows);
        let values: Vec<String> = (id..=end)
            .map(|i| {
                format!(
                    "({i},{},'{}','{}')",
                    rng.random_range(1..=rows),
                    digits(&mut rng, 11, 10),
                    digits(&mut rng, 11, 5)
                )
            })
            .collect();
        conn.query_drop(format!(
            "INSERT INTO sbtest1 (id, k, c, pad) VALUES {}",
            values.join(",")
        ))
        .await
        .context("fill sbtest1")?;
        id = end + 1;
    }
    // Aria keeps the blob in its 128 MiB page cache: reading it costs the server little, so the
    // bulk figures measure the path rather than InnoDB's 32 MiB buffer pool going to disk.
    conn.query_drop("CREATE TABLE blobs (id INT NOT NULL PRIMARY KEY, b LONGBLOB) ENGINE=Aria")
        .await
        .context("create blobs")?;
    let mut blob = vec![0u8; blob_bytes];
    rng.fill_bytes(&mut blob);
    "INSERT INTO blobs (id, b) VALUES (1, ?), (2, '')"
        .with((blob,))
        .ignore(&mut conn)
        .await
        .context("insert the blob")?;
    conn.disconnect().await.context("disconnect")?;
    Ok(())
}

/// Reads the blob repeatedly for at least `min` (and at least twice); returns MiB/s.
pub(crate) async fn bulk_read(opts: &Opts, min: Duration, blob_bytes: usize) -> Result<f64> {
    let mut conn = Conn::new(opts.clone()).await.context("connect")?;
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut reads = 0;
    while reads < 2 || start.elapsed() < min {
        let blob: Option<Vec<u8>> = conn
            .query_first("SELECT b FROM blobs WHERE id = 1")
            .await
            .context("select the blob")?;
        let blob = blob.context("the blob row is missing")?;
        ensure!(
            blob.len() == blob_bytes,
            "blob has {} bytes, expected {blob_bytes}",
            blob.len()
        );
        bytes += blob.len();
        reads += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    conn.disconnect().await.context("disconnect")?;
    Ok(bytes as f64 / MIB / secs)
}

/// Writes a blob of `blob_bytes` repeatedly for at least `min` (and at least twice); MiB/s.
pub(crate) async fn bulk_write(opts: &Opts, min: Duration, blob_bytes: usize) -> Result<f64> {
    let mut conn = Conn::new(opts.clone()).await.context("connect")?;
    let mut blob = vec![0u8; blob_bytes];
    rand::rng().fill_bytes(&mut blob);
    let stmt = conn
        .prep("UPDATE blobs SET b = ? WHERE id = 2")
        .await
        .context("prepare the update")?;
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut writes = 0;
    while writes < 2 || start.elapsed() < min {
        // Parameters are taken by value, so each write copies the blob once in memory; that is
        // the same on both paths and small next to the transfer.
        conn.exec_drop(&stmt, (blob.clone(),))
            .await
            .context("update the blob")?;
        bytes += blob.len();
        writes += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    conn.disconnect().await.context("disconnect")?;
    Ok(bytes as f64 / MIB / secs)
}

/// What a single-connection point-select run yields.
pub(crate) struct PointSelect {
    /// Queries per second.
    pub(crate) qps: f64,
    /// Every query's latency, sorted.
    pub(crate) latencies: Vec<Duration>,
}

/// Point selects on one connection for `duration`.
pub(crate) async fn point_select(
    opts: &Opts,
    rows: u32,
    duration: Duration,
    seed: u64,
) -> Result<PointSelect> {
    let mut conn = Conn::new(opts.clone()).await.context("connect")?;
    let stmt = conn
        .prep("SELECT c FROM sbtest1 WHERE id = ?")
        .await
        .context("prepare the point select")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut latencies = Vec::with_capacity(64 * 1024);
    let start = Instant::now();
    let deadline = start + duration;
    let mut now = start;
    while now < deadline {
        let id = rng.random_range(1..=rows);
        let c: Option<String> = conn
            .exec_first(&stmt, (id,))
            .await
            .context("point select")?;
        ensure!(c.is_some(), "row {id} is missing");
        let done = Instant::now();
        latencies.push(done - now);
        now = done;
    }
    let secs = (now - start).as_secs_f64();
    conn.disconnect().await.context("disconnect")?;
    latencies.sort_unstable();
    Ok(PointSelect {
        qps: latencies.len() as f64 / secs,
        latencies,
    })
}

/// Point selects on `threads` concurrent connections for `duration`; returns queries/s.
pub(crate) async fn point_select_concurrent(
    opts: &Opts,
    rows: u32,
    threads: usize,
    duration: Duration,
    seed: u64,
) -> Result<f64> {
    let mut conns = Vec::with_capacity(threads);
    for _ in 0..threads {
        let mut conn = Conn::new(opts.clone()).await.context("connect")?;
        let stmt = conn
            .prep("SELECT c FROM sbtest1 WHERE id = ?")
            .await
            .context("prepare the point select")?;
        conns.push((conn, stmt));
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for (i, (mut conn, stmt)) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            let mut count = 0u64;
            while Instant::now() < deadline {
                let id = rng.random_range(1..=rows);
                let c: Option<String> = conn
                    .exec_first(&stmt, (id,))
                    .await
                    .context("point select")?;
                ensure!(c.is_some(), "row {id} is missing");
                count += 1;
            }
            let end = Instant::now();
            conn.disconnect().await.context("disconnect")?;
            anyhow::Ok((count, end))
        });
    }
    let mut total = 0;
    let mut last = start;
    while let Some(joined) = tasks.join_next().await {
        let (count, end) = joined.context("point-select task")??;
        total += count;
        last = last.max(end);
    }
    Ok(total as f64 / (last - start).as_secs_f64())
}

/// Opens and closes `n` connections one after the other; returns each one's duration.
pub(crate) async fn connection_setup(opts: &Opts, n: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let conn = Conn::new(opts.clone()).await.context("connect")?;
        conn.disconnect().await.context("disconnect")?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}

/// Opens `n` connections, each after running `SELECT 1`, and returns them open.
pub(crate) async fn open_idle(opts: &Opts, n: usize) -> Result<Vec<Conn>> {
    let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_PARALLEL));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let opts = opts.clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.context("semaphore closed")?;
            let mut conn = Conn::new(opts).await.context("connect")?;
            conn.query_drop("SELECT 1").await.context("SELECT 1")?;
            anyhow::Ok(conn)
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        conns.push(joined.context("open task")??);
    }
    Ok(conns)
}

/// Closes `conns` (a few at a time).
pub(crate) async fn close_all(conns: Vec<Conn>) -> Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_PARALLEL));
    let mut tasks = JoinSet::new();
    for conn in conns {
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.context("semaphore closed")?;
            conn.disconnect().await.context("disconnect")
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("close task")??;
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// `groups` groups of `len` random digits joined by '-', as sysbench fills `c` and `pad`.
fn digits(rng: &mut StdRng, len: usize, groups: usize) -> String {
    (0..groups)
        .map(|_| {
            (0..len)
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("-")
}
