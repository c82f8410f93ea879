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
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{debug, info};

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
    Opened {
        /// Where.
        origin: Origin,
        /// The id the relay and the agent both log.
        conn_id: u64,
        /// The service.
        service: String,
        /// The client's identity, when known at this end.
        identity: Option<String>,
        /// The other end: the agent (at the relay) or the backend address (at the agent).
        via: String,
    },
    /// A tunnel ended.
    Closed {
        /// Where.
        origin: Origin,
        /// The id the relay and the agent both log.
        conn_id: u64,
        /// The service.
        service: String,
        /// Bytes from the client towards the backend.
        up: u64,
        /// Bytes from the backend towards the client.
        down: u64,
        /// `None` for a clean end (both directions finished); why it failed otherwise.
        failure: Option<String>,
    },
}

impl Event {
    /// The kind of event, for counters.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Refused { .. } => Kind::Refused,
            Self::Opened { .. } => Kind::Opened,
            Self::Closed { failure: None, .. } => Kind::Closed,
            Self::Closed { .. } => Kind::Failed,
        }
    }

    /// Where it happened.
    pub fn origin(&self) -> Origin {
        match self {
            Self::Refused { origin, .. }
            | Self::Opened { origin, .. }
            | Self::Closed { origin, .. } => *origin,
        }
    }
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
            }),
        }
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
            Event::Opened {
                origin,
                conn_id,
                service,
                identity,
                via,
            } => {
                let identity = identity.as_deref().unwrap_or_default();
                info!(origin = %origin, conn_id, service, identity, via, "tunnel open");
            }
            Event::Closed {
                origin,
                conn_id,
                service,
                up,
                down,
                failure,
            } => match failure {
                None => debug!(origin = %origin, conn_id, service, up, down, "tunnel closed"),
                Some(why) => {
                    debug!(origin = %origin, conn_id, service, up, down, reason = %why, "tunnel failed")
                }
            },
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
        events.emit(Event::Opened {
            origin: Origin::MysqlListener,
            conn_id: 1,
            service: "orders".into(),
            identity: Some("postern://client/alice".into()),
            via: "db1".into(),
        });
        events.emit(Event::Closed {
            origin: Origin::MysqlListener,
            conn_id: 1,
            service: "orders".into(),
            up: 10,
            down: 20,
            failure: Some("reset".into()),
        });
        assert_eq!(reader.recv().await.unwrap().kind(), Kind::Opened);
        assert_eq!(reader.recv().await.unwrap().kind(), Kind::Failed);
        assert_eq!(events.count(Kind::Failed, None), 1);
    }
}
