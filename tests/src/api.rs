//! The relay's HTTP surface as an operator's tools see it: `/v0/*` (Switchboard's JSON, basic
//! auth), `/metrics` (Prometheus text, parsed by [`Metrics`]), `/healthz` and `/readyz`.
//!
//! Requests are plain HTTP/1.1 with `Connection: close` over a fresh TCP connection each, so a
//! test sees exactly the status, headers and body the relay wrote. The typed views
//! ([`Backend`], [`Cluster`], [`Event`]) name every field the API promises: a missing field fails
//! the parse, so a test that reads them checks the shape too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one request may take.
const REQUEST_WITHIN: Duration = Duration::from_secs(10);

/// A client of one relay's HTTP listener, with or without credentials.
#[derive(Debug, Clone)]
pub struct Api {
    /// The relay's HTTP address.
    pub addr: SocketAddr,
    auth: Option<(String, String)>,
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone).
    pub body: String,
}

impl Response {
    /// The first header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON of type `T` (panics with the body when it is not).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "not the expected JSON ({e}), status {}: {}",
                self.status, self.body
            )
        })
    }

    /// Asserts the status is `status` and returns the response.
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status, status, "status; body: {}", self.body);
        self
    }
}

impl Api {
    /// `addr` with basic-auth `user` and `password`.
    pub fn new(addr: SocketAddr, user: &str, password: &str) -> Self {
        Self {
            addr,
            auth: Some((user.to_owned(), password.to_owned())),
        }
    }

    /// `addr` without credentials.
    pub fn anonymous(addr: SocketAddr) -> Self {
        Self { addr, auth: None }
    }

    /// The same relay with other credentials.
    pub fn with_auth(&self, user: &str, password: &str) -> Self {
        Self::new(self.addr, user, password)
    }

    /// The same relay without credentials.
    pub fn without_auth(&self) -> Self {
        Self::anonymous(self.addr)
    }

    /// `http://user:password@addr/` (the dashboard's URL for a browser).
    pub fn url_with_credentials(&self, path: &str) -> String {
        match &self.auth {
            Some((u, p)) => format!("http://{u}:{p}@{}{path}", self.addr),
            None => format!("http://{}{path}", self.addr),
        }
    }

    /// One request; `body` is form-encoded (`application/x-www-form-urlencoded`) if given.
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.request_with(method, path, &[], body).await
    }

    /// [`request`](Self::request) with extra headers.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        tokio::time::timeout(
            REQUEST_WITHIN,
            self.request_inner(method, path, headers, body),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {REQUEST_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> std::io::Result<Response> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: postern-tests\r\n",
            self.addr
        );
        if let Some((u, p)) = &self.auth {
            head.push_str(&format!(
                "Authorization: Basic {}\r\n",
                base64(format!("{u}:{p}").as_bytes())
            ));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method != "GET" {
            let json = body.starts_with('{');
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                if json {
                    "application/json"
                } else {
                    "application/x-www-form-urlencoded"
                },
                body.len()
            ));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse_response(&raw)
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, None).await
    }

    /// `PATCH path` with a form body.
    pub async fn patch(&self, path: &str, form: &str) -> Response {
        self.request("PATCH", path, Some(form)).await
    }

    /// `GET /v0/backends` (with `?service=` if given), which must answer 200.
    pub async fn backends(&self, service: Option<&str>) -> Vec<Backend> {
        self.get(&with_service("/v0/backends", service))
            .await
            .expect(200)
            .json()
    }

    /// `GET /v0/cluster` (with `?service=` if given), which must answer 200.
    pub async fn cluster(&self, service: Option<&str>) -> Cluster {
        self.get(&with_service("/v0/cluster", service))
            .await
            .expect(200)
            .json()
    }

    /// `GET /v0/cluster/events` (with `?service=` if given), which must answer 200.
    pub async fn events(&self, service: Option<&str>) -> Vec<Event> {
        self.get(&with_service("/v0/cluster/events", service))
            .await
            .expect(200)
            .json()
    }

    /// `GET /v0/status`, which must answer 200.
    pub async fn status(&self) -> serde_json::Value {
        self.get("/v0/status").await.expect(200).json()
    }

    /// `PATCH /v0/cluster` with `trafficEnabled` (and `message`), which must answer 200; the
    /// cluster it echoes.
    pub async fn set_traffic(&self, enabled: bool, message: &str) -> Cluster {
        let form = format!("trafficEnabled={enabled}&message={}", form_encode(message));
        self.patch("/v0/cluster", &form).await.expect(200).json()
    }

    /// `GET /metrics`, which must answer 200 and parse.
    pub async fn metrics(&self) -> Metrics {
        let r = self.get("/metrics").await.expect(200);
        Metrics::parse(&r.body).unwrap_or_else(|e| panic!("/metrics: {e}\n{}", r.body))
    }

    /// The active node of the service as `/v0/backends` shows it: `(term, name)` of the one
    /// backend marked active (`None` if none is; panics if several are).
    pub async fn active(&self, service: Option<&str>) -> (u64, Option<String>) {
        let backends = self.backends(service).await;
        active_of(&backends)
    }
}

/// `(term, active node)` from a `/v0/backends` answer; panics if two backends are active.
pub fn active_of(backends: &[Backend]) -> (u64, Option<String>) {
    let active: Vec<&Backend> = backends.iter().filter(|b| b.active).collect();
    assert!(
        active.len() <= 1,
        "more than one active backend: {backends:#?}"
    );
    let term = backends.iter().map(|b| b.term).max().unwrap_or(0);
    (term, active.first().map(|b| b.name.clone()))
}

fn with_service(path: &str, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("{path}?service={s}"),
        None => path.to_owned(),
    }
}

/// One entry of `GET /v0/backends`: Switchboard's fields and Postern's.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Switchboard: the node's host.
    pub host: String,
    /// Switchboard: the node's port.
    pub port: u16,
    /// Switchboard: whether its check passes.
    pub healthy: bool,
    /// Switchboard: the node's name.
    pub name: String,
    /// Switchboard: this relay's open connections to the node.
    pub current_session_count: u64,
    /// Switchboard: whether it is the active node.
    pub active: bool,
    /// Switchboard: whether the service takes traffic.
    pub traffic_enabled: bool,
    /// The service.
    pub service: String,
    /// The term of the decision the relay routes by.
    pub term: u64,
    /// Whether an operator drains it.
    pub draining: bool,
    /// `mysql`, `http`, `tcp` or `none`.
    pub check: String,
    /// The last check's result.
    pub last_check: Option<LastCheck>,
    /// Failed checks in a row.
    pub consecutive_failures: u64,
    /// When and why its health last changed.
    pub last_transition: Option<Transition>,
    /// `wsrep_local_index`, when known.
    pub wsrep_local_index: Option<u64>,
}

/// `lastCheck` of a backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastCheck {
    /// Whether it passed.
    pub ok: bool,
    /// What it saw (`503`, `timed out`, `Synced`, ...).
    pub detail: Option<String>,
    /// How long it took.
    pub latency_ms: f64,
    /// When.
    pub at: serde_json::Value,
}

/// `lastTransition` of a backend.
#[derive(Debug, Clone, Deserialize)]
pub struct Transition {
    /// When.
    pub at: serde_json::Value,
    /// Why.
    pub why: String,
}

/// `GET /v0/cluster`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// Switchboard: the active node, or null.
    pub active_backend: Option<ActiveBackend>,
    /// Switchboard: whether the service takes traffic.
    pub traffic_enabled: bool,
    /// Switchboard: the operator's message.
    pub message: Option<String>,
    /// Switchboard: when it last changed (RFC 3339).
    pub last_updated: String,
    /// The service.
    pub service: String,
    /// The term.
    pub term: u64,
    /// Why the active node is the active node.
    pub reason: Option<String>,
}

/// `activeBackend` of `/v0/cluster`.
#[derive(Debug, Clone, Deserialize)]
pub struct ActiveBackend {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Its name.
    pub name: String,
}

/// One entry of `GET /v0/cluster/events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// When.
    pub at: serde_json::Value,
    /// The decision's term.
    pub term: u64,
    /// The node before.
    pub from: Option<String>,
    /// The node decided (null: none healthy).
    pub to: Option<String>,
    /// Why.
    pub reason: String,
    /// The agent that decided.
    pub agent: String,
}

/// A `/metrics` page: every sample, by name and labels.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
    /// Every sample: name, labels, value.
    pub samples: Vec<Sample>,
}

/// One sample of a [`Metrics`] page.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sample's name (`postern_failovers_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Metrics {
    /// Parses Prometheus text format (0.0.4, or OpenMetrics as prometheus-client writes it):
    /// every line a comment, blank, or a well-formed sample whose family has a `# TYPE`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut m = Self::default();
        for (n, line) in text.lines().enumerate() {
            let at = |e: &str| format!("line {}: {e}: {line:?}", n + 1);
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| at("bad TYPE"))?;
                const KINDS: [&str; 8] = [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "untyped",
                    "unknown",
                    "info",
                    "stateset",
                ];
                if !KINDS.contains(&kind) {
                    return Err(at("unknown metric type"));
                }
                check_name(name).map_err(|e| at(&e))?;
                m.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line).map_err(|e| at(&e))?;
            if m.family_of(&sample.name).is_none() {
                return Err(at("sample without a # TYPE for its family"));
            }
            m.samples.push(sample);
        }
        if m.samples.is_empty() {
            return Err("no samples".into());
        }
        Ok(m)
    }

    /// The family (`# TYPE` name) a sample name belongs to.
    pub fn family_of(&self, sample: &str) -> Option<&str> {
        if let Some((k, _)) = self.types.get_key_value(sample) {
            return Some(k);
        }
        for suffix in ["_total", "_bucket", "_sum", "_count", "_created", "_info"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && let Some((k, _)) = self.types.get_key_value(base)
            {
                return Some(k);
            }
        }
        None
    }

    /// The sum of samples named `name` whose labels include every pair of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// Whether a sample named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return Err("no value".into()),
    };
    check_name(name)?;
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        // name="value" pairs, values with \\, \" and \n escapes.
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            if let Some((i, '}')) = chars.peek().copied() {
                end = i + 1;
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            check_name(&key).map_err(|e| format!("label: {e}"))?;
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("unterminated escape".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            labels.insert(key, value);
        }
        &body[end..]
    } else {
        rest
    };
    let mut parts = rest.split_whitespace();
    let value = parts.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = parts.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad =
        |what: &str| std::io::Error::other(format!("{what}: {:?}", String::from_utf8_lossy(raw)));
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = unchunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn unchunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// `application/x-www-form-urlencoded` of one value.
pub fn form_encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Standard base64 with padding (for basic auth).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_rfc_4648_says() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"admin:pw"), "YWRtaW46cHc=");
    }

    #[test]
    fn prometheus_text_parses_and_bad_text_does_not() {
        let text = "# HELP postern_failovers Failovers.\n# TYPE postern_failovers counter\n\
                    postern_failovers_total{service=\"orders\",why=\"a \\\"b\\\"\"} 3\n\
                    # TYPE postern_term gauge\npostern_term{service=\"orders\"} 7 1700000000\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n# EOF\n";
        let m = Metrics::parse(text).unwrap();
        assert_eq!(
            m.sum("postern_failovers_total", &[("service", "orders")]),
            3.0
        );
        assert_eq!(m.sum("postern_term", &[]), 7.0);
        assert_eq!(m.sum("h_count", &[]), 2.0);
        assert!(Metrics::parse("untyped_thing 1\n").is_err());
        assert!(Metrics::parse("# TYPE x counter\nx_total{a=b} 1\n").is_err());
        assert!(Metrics::parse("# TYPE x counter\nx_total one\n").is_err());
    }

    #[test]
    fn chunked_bodies_are_undone() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
    }
}
