//! The `http` check, compatible with galera-agent (`/api/v1/status`, JSON with `healthy`) and
//! clustercheck (200 when synced, 503 when not): a plain HTTP/1.1 `GET`, so that no HTTP
//! client library is needed for one request.
//!
//! Healthy is 200 whose body, when it is JSON, says `"healthy": true` (galera-agent also gives
//! `wsrep_local_index`, which is kept). Any other status or `"healthy": false` is an explicit
//! unhealthy answer. A refused connection, a reply that is not HTTP, or a hang (the caller's
//! timeout) is a failed check. The head and the body are each read up to a few KiB, so a
//! misbehaving endpoint cannot make the agent buffer without bound.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Probe, first_line};
use crate::config::HttpTarget;

/// The largest response head read.
const MAX_HEAD: usize = 8 * 1024;
/// The largest response body read (galera-agent's answer is about 100 bytes).
const MAX_BODY: usize = 4 * 1024;

/// `GET`s `target`; the caller bounds the time.
pub(super) async fn probe(target: &HttpTarget) -> Probe {
    let mut tcp = match TcpStream::connect((target.host.as_str(), target.port)).await {
        Ok(t) => t,
        Err(e) => return Probe::failed(first_line(&e.to_string())),
    };
    let host = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: postern-agent\r\nAccept: application/json, */*\r\nConnection: close\r\n\r\n",
        target.path
    );
    if let Err(e) = tcp.write_all(request.as_bytes()).await {
        return Probe::failed(first_line(&e.to_string()));
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        match HttpResponse::parse(&buf, false) {
            Ok(Some(r)) => return r.verdict(),
            Ok(None) => {}
            Err(e) => return Probe::failed(e),
        }
        let n = match tcp.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => return Probe::failed(first_line(&e.to_string())),
        };
        if n == 0 {
            return match HttpResponse::parse(&buf, true) {
                Ok(Some(r)) => r.verdict(),
                Ok(None) => Probe::failed("connection closed before a full response"),
                Err(e) => Probe::failed(e),
            };
        }
        let room = (MAX_HEAD + MAX_BODY).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..n.min(room)]);
        if n > room || buf.len() >= MAX_HEAD + MAX_BODY {
            // Enough: judge what we have as if the peer had closed.
            return match HttpResponse::parse(&buf, true) {
                Ok(Some(r)) => r.verdict(),
                Ok(None) => Probe::failed("response too large"),
                Err(e) => Probe::failed(e),
            };
        }
    }
}

/// A response: its status and (the first [`MAX_BODY`] bytes of) its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

impl HttpResponse {
    /// Parses a response from the bytes read so far: `Ok(None)` while more are needed (`eof`:
    /// no more will come, so the body is what there is), `Err` when it is not HTTP.
    pub(crate) fn parse(buf: &[u8], eof: bool) -> Result<Option<Self>, String> {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() >= MAX_HEAD {
                return Err("response head too large".into());
            }
            if eof {
                return Err(if buf.is_empty() {
                    "empty response".into()
                } else {
                    format!(
                        "not an http response: {}",
                        first_line(&String::from_utf8_lossy(buf))
                    )
                });
            }
            return Ok(None);
        };
        let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not text")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("not an http response: {}", first_line(status_line)))?;
        let (mut length, mut chunked) = (None, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        let raw = &buf[end + 4..];
        let body = if chunked {
            match dechunk(raw) {
                Some(b) => b,
                None if eof => return Err("truncated chunked body".into()),
                None => return Ok(None),
            }
        } else if let Some(len) = length {
            let want = len.min(MAX_BODY);
            if raw.len() < want {
                if eof {
                    return Err("connection closed inside the body".into());
                }
                return Ok(None);
            }
            raw[..want].to_vec()
        } else if eof {
            raw[..raw.len().min(MAX_BODY)].to_vec()
        } else {
            return Ok(None);
        };
        Ok(Some(Self { status, body }))
    }

    /// What the response says about the node.
    pub(crate) fn verdict(&self) -> Probe {
        let text = String::from_utf8_lossy(&self.body);
        let shown = first_line(&text);
        let detail = if shown.is_empty() {
            self.status.to_string()
        } else {
            format!("{} {shown}", self.status)
        };
        if self.status != 200 {
            return Probe::down(detail);
        }
        if !text.trim_start().starts_with('{') {
            return Probe::up(detail, None);
        }
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v.get("healthy") == Some(&serde_json::Value::Bool(true)) => {
                let index = v
                    .get("wsrep_local_index")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok());
                Probe::up("200 healthy", index)
            }
            Ok(v) => {
                let state = v
                    .get("wsrep_local_state_comment")
                    .and_then(serde_json::Value::as_str)
                    .map(|s| format!(" ({})", first_line(s)))
                    .unwrap_or_default();
                Probe::down(format!("200 healthy:false{state}"))
            }
            Err(_) => Probe::down(format!("200 with a body that is not JSON: {shown}")),
        }
    }
}

/// A chunked body decoded, or `None` while it is incomplete. At most [`MAX_BODY`] bytes are
/// kept; the rest is skipped.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if raw.len() < size {
            if out.len() + raw.len() >= MAX_BODY {
                out.extend_from_slice(&raw[..raw.len().min(MAX_BODY - out.len().min(MAX_BODY))]);
                return Some(out);
            }
            return None;
        }
        let room = MAX_BODY.saturating_sub(out.len());
        out.extend_from_slice(&raw[..size.min(room)]);
        raw = raw.get(size + 2..).unwrap_or_default();
        if out.len() >= MAX_BODY {
            return Some(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Outcome;

    fn judge(raw: &str) -> Probe {
        HttpResponse::parse(raw.as_bytes(), true)
            .unwrap()
            .unwrap()
            .verdict()
    }

    #[test]
    fn galera_agent_and_clustercheck_answers() {
        let body = r#"{"wsrep_local_state":4,"wsrep_local_state_comment":"Synced","wsrep_local_index":1,"healthy":true}"#;
        let p = judge(&format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        assert_eq!(p, Probe::up("200 healthy", Some(1)));
        let p = judge(
            "HTTP/1.1 200 OK\r\n\r\n{\"wsrep_local_state\":1,\"wsrep_local_state_comment\":\"Joining\",\"healthy\":false}",
        );
        assert_eq!(p, Probe::down("200 healthy:false (Joining)"));
        let p = judge("HTTP/1.1 200 OK\r\n\r\nPercona XtraDB Cluster Node is synced.\r\n");
        assert_eq!(p.outcome, Outcome::Up);
        let p = judge(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 44\r\n\r\nPercona XtraDB Cluster Node is not synced.\r\n",
        );
        assert_eq!(
            p,
            Probe::down("503 Percona XtraDB Cluster Node is not synced.")
        );
        assert_eq!(judge("HTTP/1.0 500 x\r\n\r\n"), Probe::down("500"));
        let p = judge("HTTP/1.1 200 OK\r\n\r\n{\"healthy\": tru");
        assert_eq!(p.outcome, Outcome::Down);
    }

    #[test]
    fn partial_responses_wait_and_garbage_fails() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        for cut in 0..full.len() {
            assert_eq!(HttpResponse::parse(&full[..cut], false), Ok(None), "{cut}");
        }
        assert!(HttpResponse::parse(full, false).unwrap().is_some());
        assert!(HttpResponse::parse(b"SSH-2.0-OpenSSH\r\n", true).is_err());
        assert!(HttpResponse::parse(b"", true).is_err());
        assert!(HttpResponse::parse(&vec![b'x'; MAX_HEAD], false).is_err());
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"hea\r\nb\r\nlthy\":true}\r\n0\r\n\r\n";
        assert!(
            HttpResponse::parse(&raw.as_bytes()[..raw.len() - 8], false)
                .unwrap()
                .is_none()
        );
        let r = HttpResponse::parse(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!(r.body, b"{\"healthy\":true}");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600), eof: bool) {
            if let Ok(Some(r)) = HttpResponse::parse(&bytes, eof) {
                let _ = r.verdict();
            }
        }
    }
}
