//! The cap on a service's connections that are not yet authorised, where the oldest gives way.
//!
//! A connection in its handshake holds no backend connection, but it does hold a task, a socket
//! and TLS state, so their number is capped (`max_handshakes`). A full gate never refuses a
//! newcomer: it evicts the connection that has waited longest. A real client finishes its
//! handshake in milliseconds while a silent socket waits for its deadline, so under a flood of
//! silent sockets the ones evicted are the attacker's, and an authorised client gets through
//! unless connections arrive faster than one handshake completes. Refusing newcomers instead
//! would let a few hundred silent sockets lock everyone out.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;

/// One service's connections in their handshake, oldest first.
#[derive(Debug, Default)]
pub struct Gate {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// By admission order; the sender evicts.
    pending: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Gate {
    /// A gate with no connections.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits a new connection, evicting the oldest ones while more than `limit` (at least 1;
    /// 0 means no limit) would be in their handshake. Returns the admission and how many were
    /// evicted.
    pub fn admit(&self, limit: usize) -> (Admission<'_>, usize) {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        let mut evicted = 0;
        while inner.pending.len() >= limit {
            let Some((_, oldest)) = inner.pending.pop_first() else {
                break;
            };
            // A connection that has just finished may have dropped its receiver: fine.
            let _ = oldest.send(());
            evicted += 1;
        }
        let seq = inner.next;
        inner.next += 1;
        inner.pending.insert(seq, tx);
        (
            Admission {
                gate: self,
                seq,
                evicted: rx,
            },
            evicted,
        )
    }

    /// How many connections are in their handshake.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place in the gate, until it is authorised, refused or evicted (dropped).
#[derive(Debug)]
pub struct Admission<'a> {
    gate: &'a Gate,
    seq: u64,
    evicted: oneshot::Receiver<()>,
}

impl Admission<'_> {
    /// Resolves once a newer connection has evicted this one.
    pub async fn evicted(&mut self) {
        // A dropped sender means the entry left the gate: this connection is out either way.
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.gate.lock().pending.remove(&self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn is_evicted(a: &mut Admission<'_>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        pin!(a.evicted()).as_mut().poll(&mut cx) == Poll::Ready(())
    }

    #[test]
    fn a_full_gate_evicts_the_oldest_and_admits_the_newcomer() {
        let gate = Gate::new();
        let (mut a, n) = gate.admit(2);
        assert_eq!(n, 0);
        let (mut b, _) = gate.admit(2);
        let (mut c, n) = gate.admit(2);
        assert_eq!(n, 1);
        assert!(is_evicted(&mut a));
        assert!(!is_evicted(&mut b));
        assert!(!is_evicted(&mut c));
        assert_eq!(gate.pending(), 2);
        // One that finishes frees its place: the next newcomer evicts nobody.
        drop(c);
        let (_d, n) = gate.admit(2);
        assert_eq!(n, 0);
        drop(a);
        assert_eq!(gate.pending(), 2);
        drop(b);
        assert_eq!(gate.pending(), 1);
    }

    #[test]
    fn no_limit_evicts_nobody() {
        let gate = Gate::new();
        let all: Vec<_> = (0..100).map(|_| gate.admit(0)).collect();
        assert!(all.iter().all(|(_, n)| *n == 0));
        assert_eq!(gate.pending(), 100);
    }
}
