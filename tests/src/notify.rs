//! A `NOTIFY_SOCKET` as systemd's manager binds it: a test gives its path to a relay or agent
//! process and reads what it says (READY=1, STATUS=, WATCHDOG=1, STOPPING=1).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::time::Instant;

/// A `NOTIFY_SOCKET` the test binds and reads, as systemd's manager does.
pub struct Notifications {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notifications {
    pub fn bind(path: &Path) -> Self {
        Self {
            sock: UnixDatagram::bind(path).expect("bind the notify socket"),
            path: path.to_path_buf(),
        }
    }

    pub fn path_str(&self) -> String {
        self.path.to_str().expect("utf-8 path").to_owned()
    }

    /// The next datagram, if one comes within `within`.
    pub async fn next(&self, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(within, self.sock.recv(&mut buf))
            .await
            .ok()?
            .expect("recv on the notify socket");
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits up to `within` for a datagram with the line `line`, and returns that datagram.
    pub async fn wait_for(&self, line: &str, within: Duration) -> String {
        self.wait_with(line, within).await.0
    }

    /// [`wait_for`](Self::wait_for), and the datagrams that came before it.
    pub async fn wait_with(&self, line: &str, within: Duration) -> (String, Vec<String>) {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.next(left).await else {
                panic!(
                    "no {line} on {} within {within:?}; got {seen:?}",
                    self.path.display()
                );
            };
            if msg.lines().any(|l| l == line) {
                return (msg, seen);
            }
            seen.push(msg);
        }
    }

    /// Every datagram that comes within `window`.
    pub async fn collect(&self, window: Duration) -> Vec<String> {
        let timed = self.collect_timed(window).await;
        timed.into_iter().map(|(_, m)| m).collect()
    }

    /// Every datagram that comes within `window`, with when it came.
    pub async fn collect_timed(&self, window: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(msg) = self
            .next(end.saturating_duration_since(Instant::now()))
            .await
        {
            seen.push((Instant::now(), msg));
        }
        seen
    }

    /// The last `STATUS=` line among the datagrams waiting now, waiting up to `within` for one
    /// if none is waiting.
    pub async fn latest_status(&self, within: Duration) -> Option<String> {
        let mut latest = None;
        let mut wait = within;
        while let Some(msg) = self.next(wait).await {
            if let Some(l) = msg.lines().rev().find(|l| l.starts_with("STATUS=")) {
                latest = Some(l["STATUS=".len()..].to_owned());
                // Once one is in hand, only what is already waiting is read.
                wait = Duration::ZERO;
            }
        }
        latest
    }
}
