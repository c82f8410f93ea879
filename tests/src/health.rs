//! A health endpoint the test controls, compatible with Cloud Foundry's galera-agent
//! (`GET /api/v1/status`) and clustercheck, for the agent's `http` check: on an ephemeral port,
//! answering every path (and every request of a keep-alive connection) as the current
//! [`HealthMode`] says, switchable at any time with [`HealthServer::set`].
//!
//! [`HealthMode::Hang`] accepts and reads the request and never answers (the connection stays
//! open until the server is dropped), as a node whose health process is stuck does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthMode {
    /// 200 with galera-agent's JSON and `"healthy": true`.
    Healthy,
    /// 200 with `"healthy": false` (galera-agent's answer for a node that is not Synced).
    UnhealthyJson,
    /// That status with a plain-text body (503 is clustercheck's and galera-agent's "down").
    Status(u16),
    /// Reads the request and never answers.
    Hang,
}

/// A running health endpoint. Stops (and closes hung connections) on drop.
pub struct HealthServer {
    /// Where it listens.
    pub addr: SocketAddr,
    mode: watch::Sender<HealthMode>,
    requests: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl HealthServer {
    /// Starts an endpoint answering [`HealthMode::Healthy`], whose JSON reports
    /// `wsrep_local_index` `index`.
    pub async fn start(index: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a health endpoint");
        let addr = listener.local_addr().expect("health endpoint address");
        let (mode, watch) = watch::channel(HealthMode::Healthy);
        let requests = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (count, token) = (requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = token.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let (watch, count, token) = (watch.clone(), count.clone(), token.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = serve(stream, watch, count, index) => {}
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            requests,
            stop,
        }
    }

    /// Switches what every following request gets.
    pub fn set(&self, mode: HealthMode) {
        self.mode.send_replace(mode);
    }

    /// What it answers now.
    pub fn mode(&self) -> HealthMode {
        *self.mode.borrow()
    }

    /// galera-agent's URL on this endpoint, for a node's `health_url`.
    pub fn url(&self) -> String {
        format!("http://{}/api/v1/status", self.addr)
    }

    /// How many requests it has read so far (hung ones included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Waits until it has read `n` more requests than `since` (within `within`), e.g. to see
    /// that the agent checks it.
    pub async fn wait_requests(&self, since: u64, n: u64, within: Duration) {
        crate::eventually(within, "health checks to arrive", || {
            let seen = self.requests();
            async move { (seen >= since + n).then_some(()) }
        })
        .await;
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Answers the requests of one connection until the client closes it or asks to.
async fn serve(
    mut stream: TcpStream,
    mode: watch::Receiver<HealthMode>,
    count: Arc<AtomicU64>,
    index: u32,
) {
    let mut buf = Vec::new();
    loop {
        // One request head (a GET has no body); 16 KiB is plenty.
        let head_end = loop {
            if let Some(at) = find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > 16 * 1024 {
                return;
            }
            let mut chunk = [0u8; 2048];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        buf.drain(..head_end);
        count.fetch_add(1, Ordering::Relaxed);
        let close = head.contains("connection: close");
        let current = *mode.borrow();
        let (status, reason, body, kind) = match current {
            HealthMode::Hang => {
                // Never answer; keep the connection open until the server stops.
                std::future::pending::<()>().await;
                return;
            }
            HealthMode::Healthy => (
                200,
                "OK",
                galera_agent_json(index, true),
                "application/json",
            ),
            HealthMode::UnhealthyJson => (
                200,
                "OK",
                galera_agent_json(index, false),
                "application/json",
            ),
            HealthMode::Status(code) => (
                code,
                reason_of(code),
                format!("node is unhealthy ({code})\n"),
                "text/plain",
            ),
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// galera-agent's `/api/v1/status` body.
fn galera_agent_json(index: u32, healthy: bool) -> String {
    let (state, comment) = if healthy {
        (4, "Synced")
    } else {
        (2, "Donor/Desynced")
    };
    format!(
        r#"{{"wsrep_local_state":{state},"wsrep_local_state_comment":"{comment}","wsrep_local_index":{index},"healthy":{healthy}}}"#
    )
}

fn reason_of(code: u16) -> &'static str {
    match code {
        200 => "OK",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
