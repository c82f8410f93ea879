//! The greeting templates: one real greeting per service, which the front end copies (with its
//! own connection id and scramble) to greet clients before it has a backend connection.
//!
//! A template is fetched once (the relay fetches it when an agent serving the service registers;
//! the agent, on first need) and refreshed from every real backend greeting after a login, so
//! it follows upgrades. Fetching costs the database one connection that closes before any
//! login; at most one fetch per service runs at a time, and a failed one is remembered for
//! [`RETRY_AFTER`], so a flood of clients never turns into a flood of backend connections.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::mysql::{ErrPacket, Greeting, MysqlError, PacketReader};
use crate::protocol::{Code, Refusal};

/// How long a failed fetch answers for the service before the next client may try again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The templates of one process, by service.
#[derive(Debug, Default)]
pub struct Greetings {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Debug, Default)]
struct Slot {
    greeting: Mutex<Option<Greeting>>,
    /// Held while a fetch runs; the last failure and when it happened.
    fetch: tokio::sync::Mutex<Option<(Instant, Refusal)>>,
}

impl Greetings {
    /// No templates yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The template of `service`, if there is one.
    pub fn get(&self, service: &str) -> Option<Greeting> {
        self.slot(service)
            .greeting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets the template of `service` (its backend changed, or it is gone): the next client
    /// fetches a new one.
    pub fn forget(&self, service: &str) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(service);
    }

    /// Makes `greeting` (a real one, from the backend) the template of `service`.
    pub fn store(&self, service: &str, greeting: Greeting) {
        *self
            .slot(service)
            .greeting
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(greeting);
    }

    /// The template of `service`, fetched with `fetch` if there is none. Concurrent callers
    /// share one fetch; a failure is the answer for [`RETRY_AFTER`].
    pub async fn get_or_fetch<F, Fut>(&self, service: &str, fetch: F) -> Result<Greeting, Refusal>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Greeting, Refusal>>,
    {
        if let Some(g) = self.get(service) {
            return Ok(g);
        }
        let slot = self.slot(service);
        let mut last = slot.fetch.lock().await;
        // Someone else's fetch may have finished while this caller waited.
        if let Some(g) = self.get(service) {
            return Ok(g);
        }
        if let Some((at, refusal)) = last.as_ref()
            && at.elapsed() < RETRY_AFTER
        {
            return Err(refusal.clone());
        }
        match fetch().await {
            Ok(g) => {
                *last = None;
                self.store(service, g.clone());
                Ok(g)
            }
            Err(r) => {
                *last = Some((Instant::now(), r.clone()));
                Err(r)
            }
        }
    }

    /// Fetches the template of `service` again with `fetch` (one fetch at a time, as in
    /// [`get_or_fetch`](Self::get_or_fetch)), keeping the old one if it fails.
    pub async fn refresh<F, Fut>(&self, service: &str, fetch: F) -> Result<Greeting, Refusal>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Greeting, Refusal>>,
    {
        let slot = self.slot(service);
        let mut last = slot.fetch.lock().await;
        match fetch().await {
            Ok(g) => {
                *last = None;
                self.store(service, g.clone());
                Ok(g)
            }
            Err(r) => {
                *last = Some((Instant::now(), r.clone()));
                Err(r)
            }
        }
    }

    fn slot(&self, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match slots.get(service) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Slot::default());
                slots.insert(service.to_owned(), s.clone());
                s
            }
        }
    }
}

/// Why a backend's greeting could not be read for a template.
#[derive(Debug, thiserror::Error)]
pub enum GreetingError {
    /// The backend closed the connection first.
    #[error("no greeting from the database (it closed the connection)")]
    Closed,
    /// Reading failed.
    #[error("no greeting from the database ({0})")]
    Io(#[source] std::io::Error),
    /// Nothing came in time.
    #[error("no greeting from the database in time")]
    Timeout,
    /// The bytes are not a MySQL packet.
    #[error("no greeting from the database ({0})")]
    Protocol(#[source] MysqlError),
    /// The database refused the connection (too many connections, host blocked).
    #[error("the database refused the connection: {0}")]
    Refused(ErrPacket),
    /// A packet that is not a usable greeting.
    #[error("the database sent an unusable greeting ({0})")]
    Unusable(#[source] MysqlError),
}

impl GreetingError {
    /// The refusal a client of `service` gets for it.
    pub fn refusal(&self, service: &str) -> Refusal {
        Refusal::new(
            Code::BackendUnavailable,
            format!("service {service:?} is unavailable: {self}"),
        )
    }
}

/// Reads a backend's greeting from `io` (a fresh connection to it), within `timeout`.
pub async fn read_greeting<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<Greeting, GreetingError> {
    let read = async {
        let mut reader = PacketReader::default();
        let mut buf = BytesMut::new();
        loop {
            if let Some(p) = reader.decode(&mut buf).map_err(GreetingError::Protocol)? {
                return Ok(p);
            }
            buf.reserve(512);
            match io.read_buf(&mut buf).await {
                Ok(0) => return Err(GreetingError::Closed),
                Ok(_) => {}
                Err(e) => return Err(GreetingError::Io(e)),
            }
        }
    };
    let packet = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| GreetingError::Timeout)??;
    Greeting::parse(packet.payload).map_err(|e| match e {
        MysqlError::Refused(err) => GreetingError::Refused(err),
        e => GreetingError::Unusable(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::vectors::{self, payload};
    use crate::protocol::Code;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn greeting() -> Greeting {
        Greeting::parse(payload(vectors::GREETING).into()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn one_fetch_serves_everyone_and_a_failure_is_not_retried_at_once() {
        let g = Greetings::new();
        let fetches = &AtomicUsize::new(0);
        let fail = move || async move {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(Refusal::new(Code::BackendUnavailable, "down"))
        };
        let (a, b) = tokio::join!(
            g.get_or_fetch("orders", fail),
            g.get_or_fetch("orders", fail)
        );
        assert!(a.is_err() && b.is_err());
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "concurrent callers share one fetch"
        );
        assert!(g.get_or_fetch("orders", fail).await.is_err());
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "a failure answers for a while"
        );
        tokio::time::advance(RETRY_AFTER).await;
        let ok = move || async move {
            fetches.fetch_add(1, Ordering::SeqCst);
            Ok(greeting())
        };
        assert_eq!(g.get_or_fetch("orders", ok).await.unwrap(), greeting());
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // From now on the template is there; another service has its own.
        assert!(g.get_or_fetch("orders", fail).await.is_ok());
        assert!(g.get("other").is_none());
    }
}
