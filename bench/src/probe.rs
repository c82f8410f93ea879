//! What the soak reads about the processes it runs, from outside them:
//!
//! - from `/proc/PID`: resident memory (`VmRSS`), open file descriptors (entries of `fd/`), OS
//!   threads (`Threads`) and CPU time;
//! - the relay's tokio task count, from its `/metrics` (the gauge `postern_runtime_tasks`, behind
//!   the API's basic auth), with its open connections (`postern_connections_current`);
//! - the agent's, from its systemd status line (`STATUS=… ; 41 tasks, …`), which it sends to the
//!   datagram socket named by `NOTIFY_SOCKET`: the bench binds that socket as systemd would and
//!   keeps the last line.
//!
//! The parsing is pure and tested below; the readers are thin.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixDatagram;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a `/metrics` request may take.
const METRICS_WITHIN: Duration = Duration::from_secs(10);

/// One process's figures at one moment; `None` where a figure could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reading {
    /// Resident memory, KiB.
    pub(crate) rss_kib: Option<u64>,
    /// Open file descriptors.
    pub(crate) fds: Option<u64>,
    /// OS threads.
    pub(crate) threads: Option<u64>,
    /// Tokio tasks alive (relay and agent only).
    pub(crate) tasks: Option<u64>,
    /// User plus system CPU time so far, in clock ticks.
    pub(crate) cpu_ticks: Option<u64>,
}

impl Reading {
    /// Whether the process was there to be read.
    pub(crate) fn alive(&self) -> bool {
        self.rss_kib.is_some()
    }
}

/// Reads `/proc/PID` (everything but the task count). All `None` when the process is gone.
pub(crate) fn read_proc(pid: u32) -> Reading {
    let held = postern_tests::procs::holdings(pid);
    Reading {
        rss_kib: held.map(|h| h.rss_kib),
        fds: held.map(|h| h.fds as u64),
        threads: held.map(|h| h.threads),
        tasks: None,
        cpu_ticks: crate::stack::cpu_ticks(pid).ok(),
    }
}

/// Where a relay's API is, and its credentials.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub(crate) addr: SocketAddr,
    pub(crate) user: String,
    pub(crate) password: String,
}

/// What the soak reads from a relay's `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RelayMetrics {
    /// `postern_runtime_tasks`.
    pub(crate) tasks: Option<u64>,
    /// `postern_connections_current`, summed over services.
    pub(crate) connections: Option<u64>,
}

/// GETs the relay's `/metrics` and picks out the task and connection counts. A relay without
/// the task gauge (built before it) gives `tasks: None`.
pub(crate) async fn relay_metrics(api: &Api) -> Result<RelayMetrics> {
    let body = tokio::time::timeout(METRICS_WITHIN, get(api, "/metrics"))
        .await
        .context("GET /metrics timed out")??;
    Ok(RelayMetrics {
        tasks: metric_value(&body, "postern_runtime_tasks").map(|v| v as u64),
        connections: metric_value(&body, "postern_connections_current").map(|v| v as u64),
    })
}

/// A plain HTTP/1.1 GET with basic auth; the body of a 200 answer.
async fn get(api: &Api, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(api.addr)
        .await
        .with_context(|| format!("connect to the relay's API at {}", api.addr))?;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", api.user, api.password));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n",
        api.addr
    );
    s.write_all(req.as_bytes()).await.context("send request")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.context("read answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "GET {path}: HTTP {status}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    Ok(if chunked {
        dechunk(body).context("malformed chunked body")?
    } else {
        body.to_owned()
    })
}

/// The sum of the samples of metric `name` (with any labels) in an OpenMetrics or Prometheus
/// text; `None` if it has none.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or("").trim();
        if series_name != name {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// The body of an HTTP chunked transfer.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// A `NOTIFY_SOCKET` bound for one agent: keeps the last status line it sent, and when.
/// The reading task ends when this is dropped.
pub(crate) struct StatusReader {
    latest: Arc<Mutex<Option<(Instant, String)>>>,
    task: JoinHandle<()>,
}

impl StatusReader {
    /// Binds the datagram socket at `path` and starts reading it (call before the agent starts,
    /// and read at once: the agent's sends block while the socket's queue is full).
    pub(crate) fn bind(path: &Path) -> Result<Self> {
        let sock = UnixDatagram::bind(path)
            .with_context(|| format!("bind the notify socket {}", path.display()))?;
        let latest = Arc::new(Mutex::new(None));
        let keep = latest.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = sock.recv(&mut buf).await {
                let msg = String::from_utf8_lossy(&buf[..n]);
                if let Some(line) = status_line(&msg) {
                    *keep.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((Instant::now(), line.to_owned()));
                }
            }
        });
        Ok(Self { latest, task })
    }

    /// The last status line and when it came.
    pub(crate) fn latest(&self) -> Option<(Instant, String)> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for StatusReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `STATUS=` value of an sd_notify datagram (`READY=1\nSTATUS=…\n`).
pub(crate) fn status_line(datagram: &str) -> Option<&str> {
    datagram.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// The task count in an agent's status line: the part `N tasks` among those separated by `;`
/// or `,` (`connected to relay r1 over quic; 3 connections, 41 tasks, 17 fds`).
pub(crate) fn tasks_in_status(line: &str) -> Option<u64> {
    line.split([';', ',']).map(str::trim).find_map(|part| {
        part.strip_suffix(" tasks")
            .or_else(|| part.strip_suffix(" task"))
            .and_then(|n| n.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_with_and_without_labels() {
        let text = "# HELP postern_runtime_tasks Tasks alive\n\
                    # TYPE postern_runtime_tasks gauge\n\
                    postern_runtime_tasks 10041\n\
                    postern_runtime_tasks_extra 7\n\
                    postern_connections_current{service=\"a\"} 9998\n\
                    postern_connections_current{service=\"b\"} 2\n\
                    postern_connections_total{service=\"a\",node=\"\",transport=\"quic\"} 12000\n\
                    # EOF\n";
        assert_eq!(metric_value(text, "postern_runtime_tasks"), Some(10041.0));
        assert_eq!(
            metric_value(text, "postern_connections_current"),
            Some(10000.0)
        );
        assert_eq!(metric_value(text, "postern_connections"), None);
        assert_eq!(metric_value(text, "process_open_fds"), None);
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n").as_deref(),
            Some("hello, world")
        );
        assert_eq!(dechunk("5\r\nhel"), None);
        assert_eq!(dechunk("zz\r\n"), None);
    }

    #[test]
    fn status_lines_and_their_task_counts() {
        let msg = "READY=1\nSTATUS=connected to relay r1 over quic; 41 tasks, 17 fds, 12 MiB\n";
        let line = status_line(msg).unwrap();
        assert_eq!(
            line,
            "connected to relay r1 over quic; 41 tasks, 17 fds, 12 MiB"
        );
        assert_eq!(tasks_in_status(line), Some(41));
        assert_eq!(
            tasks_in_status("connected to relay r1 over quic; 3 connections, 10041 tasks"),
            Some(10041)
        );
        assert_eq!(tasks_in_status("disconnected: timed out; 1 task"), Some(1));
        assert_eq!(tasks_in_status("connected to relay r1 over quic"), None);
        assert_eq!(tasks_in_status("disconnected: many tasks"), None);
        assert_eq!(status_line("READY=1\n"), None);
    }
}
