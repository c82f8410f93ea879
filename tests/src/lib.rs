//! The end-to-end test harness: real `mariadbd` instances, certificates made by Postern's own
//! PKI code, relays and agents in-process or as real processes, all on ephemeral ports, put
//! together by [`Stack::builder`] from typed configs ([`config`]). For failover: a real Galera
//! cluster ([`galera`]), health endpoints the test switches ([`health`]), the relay's HTTP API and
//! metrics ([`api`]) and headless Chromium for the dashboard ([`browser`]).
//!
//! Nothing here sleeps for readiness: every wait polls a real condition with a deadline
//! ([`eventually`]). A panic in any in-process task fails the test ([`panics`]).

pub mod api;
pub mod broker;
pub mod browser;
pub mod client;
pub mod config;
pub mod failover;
pub mod galera;
pub mod health;
pub mod inproc;
pub mod mariadb;
pub mod notify;
pub mod panics;
pub mod pki;
pub mod procs;
pub mod router;
pub mod stack;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub use api::Api;
pub use client::Cli;
pub use config::{AgentConfig, RelayConfig, RelaySpec};
pub use galera::Galera;
pub use health::{HealthMode, HealthServer};
pub use inproc::{AgentRun, ConnectRun, ConnectTo, RelayRun};
pub use mariadb::MariaDb;
pub use pki::TestPki;
pub use stack::{Stack, Transport};

/// Installs a test log subscriber once (RUST_LOG controls it; quiet by default).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it returns `Some`, or panics after `within` with `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A minimal HTTP/1.1 GET: returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `GET /readyz` at `addr` until it answers 200 (within `within`), and returns its body.
pub async fn wait_ready(addr: SocketAddr, within: Duration) -> String {
    eventually(within, "/readyz 200", || async {
        http_get(addr, "/readyz")
            .await
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    })
    .await
}

/// SHA-256 of `data`, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// `len` bytes that do not repeat (xorshift), so a lost, doubled or reordered chunk changes
/// the digest.
pub fn pseudo_random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}
