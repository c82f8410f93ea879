//! One events sink per process: every refusal, every tunnel opened and every tunnel closed is an
//! [`Event`] with typed fields, sent to one [`Events`] handle. Logging, the counters the metrics
//! endpoint will serve, and any other reader (an audit trail, a live dashboard) read from here;
//! no protocol code writes a log line or bumps a counter for these things itself.
//!
//! # Logs an attacker cannot flood
//!
//! Anyone who can reach a listening port can make a refusal happen: random bytes, a silent
//! socket, a certificate from another CA. So refusals are logged at `info`, and at most
//! [`BURST`] per [`WINDOW`] for each kind (origin and code); past that they are only counted,
//! and the next line of that kind (or a summary once the window is over) says how many were
//! left out. The counters always see every event.
//!
//! A process makes one `Events` (the relay and the agent each hold theirs in their state; tests
//! that run both in one process get two) and passes clones to its tasks.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::protocol::{Code, Refusal};

/// How many refusals of one kind are logged per [`WINDOW`] before the rest are only counted.
pub const BURST: u32 = 10;
/// The window of [`BURST`].
pub const WINDOW: Duration = Duration::from_secs(10);

/// Where in the process something happened: which listener or session kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The relay's MySQL-native listener of a service.
    MysqlListener,
    /// The relay's TLS-first listener of a service.
    TlsListener,
    /// The relay's QUIC endpoint (agents and `connect` clients).
    Quic,
    /// The relay's `/v1/tunnel` WebSocket endpoint.
    Tunnel,
    /// A stream opened by a `connect` client on its session with the relay.
    ClientStream,
    /// An agent's session with the relay (seen from either end).
    AgentSession,
    /// A stream from the relay to an agent (seen by the agent).
    AgentStream,
    /// The local port of `postern-agent connect`.
    Connect,
}

impl Origin {
    /// The name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MysqlListener => "mysql_listener",
            Self::TlsListener => "tls_listener",
            Self::Quic => "quic",
            Self::Tunnel => "tunnel",
            Self::ClientStream => "client_stream",
            Self::AgentSession => "agent_session",
            Self::AgentStream => "agent_stream",
            Self::Connect => "connect",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something a reader of the sink may care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer was refused: a connection, a session or a stream, before any of its bytes reached
    /// a backend.
    Refused {
        /// Where.
        origin: Origin,
        /// The peer's address, when known.
        peer: Option<SocketAddr>,
        /// The service asked for, when known.
        service: Option<String>,
        /// The peer's identity (`postern://client/NAME`), when known.
        identity: Option<String>,
        /// Why, with the stable code the peer was told (or would have been told).
        refusal: Refusal,
    },
    /// A client connection reached its backend: a tunnel is open.
    Opened(Arc<Tunnel>),
    /// A tunnel ended: the audit record of one tunneled connection ([`Event::audit`]).
    Closed {
        /// What [`Event::Opened`] said.
        tunnel: Arc<Tunnel>,
        /// Bytes from the client towards the backend (up to the failure, for a failure).
        up: u64,
        /// Bytes from the backend towards the client.
        down: u64,
        /// How long the tunnel was open.
        duration: Duration,
        /// `None` for a clean end (both directions finished); why it failed otherwise.
        failure: Option<String>,
    },
}

/// Who and what one tunneled connection is, as one end knows it: what [`Event::Opened`] says
/// and [`Event::Closed`] repeats, so that the closing record alone answers who reached which
/// database, when, over what, and how much they moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// Where.
    pub origin: Origin,
    /// The id the relay and the agent both log.
    pub conn_id: u64,
    /// The service.
    pub service: String,
    /// The client's identity (`postern://client/NAME`), when known at this end.
    pub identity: Option<String>,
    /// The client's address, when known at this end.
    pub client_addr: Option<SocketAddr>,
    /// The other end: the agent (at the relay), the backend address (at the agent), the relay
    /// (at `connect`).
    pub via: String,
    /// The database node reached, when known.
    pub node: Option<String>,
    /// The transport of the relay–agent (or `connect`–relay) session that carried it.
    pub transport: Option<&'static str>,
    /// The key exchange group of the client's TLS at this end, when it ended here
    /// ([`crate::tls::kx::group_name`]).
    pub client_tls: Option<&'static str>,
    /// When it opened (wall clock, for the record).
    pub opened_at: SystemTime,
    /// When it opened (monotonic, for the duration).
    pub opened: Instant,
}

impl Tunnel {
    /// A tunnel opening now, with what every end knows; the rest is filled in by the caller.
    pub fn new(origin: Origin, conn_id: u64, service: &str, via: &str) -> Self {
        Self {
            origin,
            conn_id,
            service: service.to_owned(),
            identity: None,
            client_addr: None,
            via: via.to_owned(),
            node: None,
            transport: None,
            client_tls: None,
            opened_at: SystemTime::now(),
            opened: Instant::now(),
        }
    }

    /// Emits [`Event::Opened`] for it, and returns what [`Tunnel::closed`] needs.
    pub fn open(self, events: &Events) -> Arc<Tunnel> {
        let t = Arc::new(self);
        events.emit(Event::Opened(t.clone()));
        t
    }

    /// Emits [`Event::Closed`] for a tunnel that moved `up` and `down` bytes and ended as
    /// `failure` says.
    pub fn closed(self: Arc<Self>, events: &Events, up: u64, down: u64, failure: Option<String>) {
        let duration = self.opened.elapsed();
        events.emit(Event::Closed {
            tunnel: self,
            up,
            down,
            duration,
            failure,
        });
    }
}

impl Event {
    /// The kind of event, for counters.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Refused { .. } => Kind::Refused,
            Self::Opened(_) => Kind::Opened,
            Self::Closed { failure: None, .. } => Kind::Closed,
            Self::Closed { .. } => Kind::Failed,
        }
    }

    /// Where it happened.
    pub fn origin(&self) -> Origin {
        match self {
            Self::Refused { origin, .. } => *origin,
            Self::Opened(t) | Self::Closed { tunnel: t, .. } => t.origin,
        }
    }

    /// The audit record of a [`Event::Closed`]: one JSON object per tunneled connection, with
    /// `instance` naming this relay or agent. `None` for other events.
    pub fn audit(&self, instance: &str) -> Option<serde_json::Value> {
        let Self::Closed {
            tunnel: t,
            up,
            down,
            duration,
            failure,
        } = self
        else {
            return None;
        };
        let opened = t
            .opened_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Some(serde_json::json!({
            "record": "tunnel",
            "opened_at": rfc3339_millis(opened),
            "closed_at": rfc3339_millis(opened + duration.as_millis() as u64),
            "duration_ms": duration.as_millis() as u64,
            "instance": instance,
            "origin": t.origin,
            "conn_id": t.conn_id,
            "service": t.service,
            "identity": t.identity,
            "client_addr": t.client_addr.map(|a| a.to_string()),
            "via": t.via,
            "node": t.node,
            "transport": t.transport,
            "client_tls": t.client_tls,
            "bytes_up": up,
            "bytes_down": down,
            "ended": if failure.is_some() { "failed" } else { "closed" },
            "reason": failure,
        }))
    }
}

/// `2026-11-29T08:38:04.123Z` for milliseconds since the Unix epoch.
fn rfc3339_millis(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH
        + time::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX));
    let seconds = crate::pki::rfc3339(t);
    let seconds = seconds.strip_suffix('Z').unwrap_or(&seconds);
    format!("{seconds}.{:03}Z", t.millisecond())
}

/// What counters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// [`Event::Refused`].
    Refused,
    /// [`Event::Opened`].
    Opened,
    /// [`Event::Closed`] with no failure.
    Closed,
    /// [`Event::Closed`] with a failure.
    Failed,
}

/// One counter: how many events of a kind happened at an origin (with a code, for refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CounterKey {
    /// The kind.
    pub kind: Kind,
    /// Where.
    pub origin: Origin,
    /// The refusal code (refusals only).
    pub code: Option<Code>,
}

/// The process's events sink. Cheap to clone; all clones are the same sink.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    counters: Mutex<HashMap<CounterKey, u64>>,
    limits: Mutex<HashMap<(Origin, Code), Budget>>,
    readers: broadcast::Sender<Event>,
    audit: OnceLock<AuditFile>,
}

/// The file that audit records are appended to, one JSON object per line.
struct AuditFile {
    path: PathBuf,
    file: Mutex<File>,
    instance: String,
    /// Set while writes fail, so that a full disk is logged once, not once per connection.
    failing: AtomicBool,
}

impl AuditFile {
    fn write(&self, record: &serde_json::Value) {
        let mut line = record.to_string().into_bytes();
        line.push(b'\n');
        // One write of one whole line, in append mode: lines of concurrent writers (another
        // process on the same file) do not interleave.
        let written = self
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&line);
        match written {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    warn!(path = %self.path.display(), "audit records are written again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(path = %self.path.display(), error = %e, "cannot write audit records (they stay in the log)");
                }
            }
        }
    }
}

/// The log budget of one kind of refusal.
struct Budget {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// How many events a slow reader may fall behind before it misses some.
pub const READER_BACKLOG: usize = 1024;

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// A new sink with the log and counter readers.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                counters: Mutex::default(),
                limits: Mutex::default(),
                readers: broadcast::channel(READER_BACKLOG).0,
                audit: OnceLock::new(),
            }),
        }
    }

    /// Appends the audit record of every tunnel that ends from now on ([`Event::audit`]) to
    /// the file at `path` (created if missing), with `instance` naming this process. Records are
    /// written as the tunnels end, none is dropped; they are also in the log, under the
    /// `audit` target. A sink appends to one file only: a second call is an error.
    pub fn audit_to(&self, path: &Path, instance: &str) -> io::Result<()> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        self.inner
            .audit
            .set(AuditFile {
                path: path.to_owned(),
                file: Mutex::new(file),
                instance: instance.to_owned(),
                failing: AtomicBool::new(false),
            })
            .map_err(|_| io::Error::other("this events sink already appends to an audit file"))
    }

    /// Takes one event: counts it, logs it (refusals within their budget), and hands it to
    /// every subscribed reader.
    pub fn emit(&self, event: Event) {
        let key = CounterKey {
            kind: event.kind(),
            origin: event.origin(),
            code: match &event {
                Event::Refused { refusal, .. } => Some(refusal.code),
                _ => None,
            },
        };
        *self
            .inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
        self.log(&event);
        if let Some(file) = self.inner.audit.get()
            && let Some(record) = event.audit(&file.instance)
        {
            file.write(&record);
        }
        // Nobody listening is fine.
        let _ = self.inner.readers.send(event);
    }

    /// Shorthand for [`Event::Refused`].
    pub fn refused(
        &self,
        origin: Origin,
        peer: Option<SocketAddr>,
        service: Option<&str>,
        identity: Option<&str>,
        refusal: &Refusal,
    ) {
        self.emit(Event::Refused {
            origin,
            peer,
            service: service.map(str::to_owned),
            identity: identity.map(str::to_owned),
            refusal: refusal.clone(),
        });
    }

    /// A reader that sees every event from now on (a slow reader that falls more than
    /// [`READER_BACKLOG`] behind misses some, and is told so by the channel).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.readers.subscribe()
    }

    /// Every counter that is not zero.
    pub fn counters(&self) -> Vec<(CounterKey, u64)> {
        let map = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = map.iter().map(|(k, v)| (*k, *v)).collect();
        out.sort_by_key(|(k, _)| format!("{k:?}"));
        out
    }

    /// The sum of the counters of `kind` (at `origin`, when given).
    pub fn count(&self, kind: Kind, origin: Option<Origin>) -> u64 {
        self.inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(k, _)| k.kind == kind && origin.is_none_or(|o| o == k.origin))
            .map(|(_, v)| v)
            .sum()
    }

    fn log(&self, event: &Event) {
        match event {
            Event::Refused {
                origin,
                peer,
                service,
                identity,
                refusal,
            } => {
                let Some(suppressed) = self.budget(*origin, refusal.code) else {
                    return;
                };
                let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                let service = service.as_deref().unwrap_or_default();
                let identity = identity.as_deref().unwrap_or_default();
                if suppressed > 0 {
                    info!(origin = %origin, %peer, service, identity, code = %refusal.code, reason = %refusal.message, suppressed, "refused (and {suppressed} more like it not logged)");
                } else {
                    info!(origin = %origin, %peer, service, identity, code = %refusal.code, reason = %refusal.message, "refused");
                }
            }
            Event::Opened(t) => {
                let identity = t.identity.as_deref().unwrap_or_default();
                info!(origin = %t.origin, conn_id = t.conn_id, service = t.service, identity, via = t.via, "tunnel open");
            }
            Event::Closed {
                tunnel: t,
                up,
                down,
                duration,
                failure,
            } => {
                // The audit record in the log: one line per tunneled connection, under its own
                // target (`RUST_LOG=...,audit=off` leaves it out).
                let identity = t.identity.as_deref().unwrap_or_default();
                let client = t.client_addr.map(|a| a.to_string()).unwrap_or_default();
                let node = t.node.as_deref().unwrap_or_default();
                let transport = t.transport.unwrap_or_default();
                let client_tls = t.client_tls.unwrap_or_default();
                let duration_ms = duration.as_millis() as u64;
                let ended = if failure.is_some() {
                    "failed"
                } else {
                    "closed"
                };
                let reason = failure.as_deref().unwrap_or_default();
                info!(target: "audit", origin = %t.origin, conn_id = t.conn_id, service = t.service, identity, client, via = t.via, node, transport, client_tls, up, down, duration_ms, ended, reason, "tunnel {ended}");
            }
        }
    }

    /// Whether a refusal of this kind may be logged now: `Some(n)` with the number of refusals
    /// of the kind left out since the last logged one, `None` to leave this one out.
    fn budget(&self, origin: Origin, code: Code) -> Option<u64> {
        let now = Instant::now();
        let mut limits = self
            .inner
            .limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let b = limits.entry((origin, code)).or_insert(Budget {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(b.window_start) >= WINDOW {
            b.window_start = now;
            b.logged = 0;
        }
        if b.logged >= BURST {
            b.suppressed += 1;
            if b.suppressed == 1 {
                self.summarise_later(origin, code);
            }
            return None;
        }
        b.logged += 1;
        Some(std::mem::take(&mut b.suppressed))
    }

    /// Once the current window is over, logs how many refusals of the kind were left out, if no
    /// later refusal of the kind has said so already (a flood that stops is still reported).
    fn summarise_later(&self, origin: Origin, code: Code) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let events = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(WINDOW).await;
            let suppressed = {
                let mut limits = events
                    .inner
                    .limits
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                limits
                    .get_mut(&(origin, code))
                    .map(|b| std::mem::take(&mut b.suppressed))
                    .unwrap_or(0)
            };
            if suppressed > 0 {
                info!(origin = %origin, %code, suppressed, "{suppressed} more refusals not logged (rate limit)");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal() -> Refusal {
        Refusal::new(Code::BadRequest, "garbage")
    }

    #[tokio::test(start_paused = true)]
    async fn every_event_is_counted_but_a_flood_is_not_all_logged() {
        let events = Events::new();
        for _ in 0..1000 {
            events.refused(Origin::Quic, None, None, None, &refusal());
        }
        assert_eq!(events.count(Kind::Refused, Some(Origin::Quic)), 1000);
        assert_eq!(events.count(Kind::Refused, Some(Origin::Tunnel)), 0);
        let limits = events.inner.limits.lock().unwrap();
        let b = &limits[&(Origin::Quic, Code::BadRequest)];
        assert_eq!(b.logged, BURST);
        assert_eq!(b.suppressed, 1000 - u64::from(BURST));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_comes_back_after_the_window_and_reports_what_it_left_out() {
        let events = Events::new();
        for i in 0..BURST + 5 {
            let logged = events.budget(Origin::Quic, Code::BadRequest).is_some();
            assert_eq!(logged, i < BURST, "refusal {i}");
        }
        // 5 left out so far; the next window logs again and says so.
        tokio::time::advance(WINDOW).await;
        assert_eq!(events.budget(Origin::Quic, Code::BadRequest), Some(5));
        assert_eq!(events.budget(Origin::Quic, Code::BadRequest), Some(0));
        // Another kind has its own budget.
        assert_eq!(events.budget(Origin::Tunnel, Code::BadRequest), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_that_stops_is_summarised_once_its_window_is_over() {
        let events = Events::new();
        for _ in 0..BURST + 3 {
            events.refused(Origin::Quic, None, None, None, &refusal());
        }
        // The summary task takes the count once the window is over.
        tokio::time::sleep(WINDOW + Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        let limits = events.inner.limits.lock().unwrap();
        assert_eq!(limits[&(Origin::Quic, Code::BadRequest)].suppressed, 0);
    }

    #[tokio::test]
    async fn readers_see_every_event_in_order() {
        let events = Events::new();
        let mut reader = events.subscribe();
        let mut t = Tunnel::new(Origin::MysqlListener, 1, "orders", "db1");
        t.identity = Some("postern://client/alice".into());
        t.open(&events)
            .closed(&events, 10, 20, Some("reset".into()));
        assert_eq!(reader.recv().await.unwrap().kind(), Kind::Opened);
        assert_eq!(reader.recv().await.unwrap().kind(), Kind::Failed);
        assert_eq!(events.count(Kind::Failed, None), 1);
    }

    #[test]
    fn every_closed_tunnel_is_a_line_of_the_audit_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let events = Events::new();
        events.audit_to(&path, "relay-1").unwrap();
        assert!(events.audit_to(&path, "relay-1").is_err());
        for id in 1..=3 {
            let t = Tunnel::new(Origin::ClientStream, id, "orders", "agent-a");
            t.open(&events).closed(&events, id * 10, id * 100, None);
        }
        events.refused(Origin::Quic, None, None, None, &refusal());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        for (i, rec) in lines.iter().enumerate() {
            assert_eq!(rec["conn_id"], i as u64 + 1);
            assert_eq!(rec["instance"], "relay-1");
            assert_eq!(rec["bytes_down"], (i as u64 + 1) * 100);
        }
    }

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_795_329_484_123),
            "2026-11-22T06:38:04.123Z"
        );
        assert_eq!(
            rfc3339_millis(4_107_542_399_999),
            "2100-02-28T23:59:59.999Z"
        );
    }

    #[test]
    fn a_closed_tunnel_is_one_audit_record_with_everything_known() {
        let events = Events::new();
        let mut reader = events.subscribe();
        let mut t = Tunnel::new(Origin::TlsListener, 7, "orders", "db-agent");
        t.identity = Some("postern://client/alice".into());
        t.client_addr = Some("192.0.2.7:5555".parse().unwrap());
        t.node = Some("node2".into());
        t.transport = Some("quic");
        t.client_tls = Some("X25519MLKEM768");
        t.open(&events).closed(&events, 100, 2000, None);
        let opened = reader.try_recv().unwrap();
        let closed = reader.try_recv().unwrap();
        let rec = closed.audit("relay/0").unwrap();
        assert_eq!(rec["instance"], "relay/0");
        assert_eq!(rec["origin"], "tls_listener");
        assert_eq!(rec["conn_id"], 7);
        assert_eq!(rec["identity"], "postern://client/alice");
        assert_eq!(rec["client_addr"], "192.0.2.7:5555");
        assert_eq!(rec["node"], "node2");
        assert_eq!(rec["transport"], "quic");
        assert_eq!(rec["client_tls"], "X25519MLKEM768");
        assert_eq!(
            (rec["bytes_up"].as_u64(), rec["bytes_down"].as_u64()),
            (Some(100), Some(2000))
        );
        assert_eq!(rec["ended"], "closed");
        assert!(rec["reason"].is_null());
        assert!(rec["opened_at"].as_str().unwrap().ends_with('Z'));
        assert!(opened.audit("x").is_none());
    }
}
