//! Connection ids for the greetings a front end builds itself, and the real id behind each.
//!
//! A front end greets a client before it has a backend connection, so the connection id in its
//! greeting cannot be the database's. Drivers use that id to cancel queries (`KILL QUERY <id>`
//! on a second connection), so the front end remembers, for each live connection, the real id
//! the database gave it, and rewrites such commands (see the [module doc](super)).
//!
//! Ids come from [`FAKE_ID_MIN`] up (2^31: a database would have to accept two billion
//! connections since it started before its thread ids got there), from a random start per
//! process, so two processes rarely hand out the same id at the same time; and a `KILL` is only
//! rewritten for a connection of the same client identity on the same database server anyway.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// The lowest connection id a front end hands out in its own greetings.
pub const FAKE_ID_MIN: u32 = 0x8000_0000;

/// The ids this process has handed out, for live connections.
#[derive(Debug)]
pub struct ConnIds {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    next: u32,
    live: HashMap<u32, Owner>,
}

/// Whose connection an id is, once the client is known and the backend has greeted.
#[derive(Debug, Default, Clone)]
struct Owner {
    bound: Option<Bound>,
}

#[derive(Debug, Clone)]
struct Bound {
    identity: String,
    node: String,
    real: u32,
}

impl Default for ConnIds {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnIds {
    /// No ids handed out yet; the first one is random within the range.
    pub fn new() -> Self {
        Self::starting_at(rand::random::<u32>())
    }

    fn starting_at(next: u32) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next: next | FAKE_ID_MIN,
                live: HashMap::new(),
            }),
        }
    }

    /// Whether `id` is in the range this front end hands out (whether or not it is live).
    pub fn in_range(id: u64) -> bool {
        u32::try_from(id).is_ok_and(|id| id >= FAKE_ID_MIN)
    }

    /// Hands out an id for a new connection; it is forgotten when the guard is dropped.
    pub fn issue(&self) -> Issued<'_> {
        let mut inner = self.lock();
        let mut id = inner.next;
        // Skips ids still live; the range holds far more ids than a process has connections.
        while inner.live.contains_key(&id) {
            id = next_id(id);
        }
        inner.next = next_id(id);
        inner.live.insert(id, Owner::default());
        Issued { ids: self, id }
    }

    /// The real id of live connection `id`, if it belongs to `identity` and its backend is
    /// `node` (the database server a `KILL` from `identity` on `node` would reach).
    pub fn resolve(&self, id: u64, identity: &str, node: &str) -> Option<u32> {
        let id = u32::try_from(id).ok()?;
        let inner = self.lock();
        let bound = inner.live.get(&id)?.bound.as_ref()?;
        (bound.identity == identity && bound.node == node).then_some(bound.real)
    }

    /// How many ids are live.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn next_id(id: u32) -> u32 {
    id.checked_add(1).unwrap_or(FAKE_ID_MIN).max(FAKE_ID_MIN)
}

/// A connection id handed out for one connection; forgotten on drop.
#[derive(Debug)]
pub struct Issued<'a> {
    ids: &'a ConnIds,
    id: u32,
}

impl Issued<'_> {
    /// The id, for the greeting.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Records that the connection belongs to `identity` and has id `real` on database server
    /// `node`.
    pub fn bind(&self, identity: &str, node: &str, real: u32) {
        if let Some(owner) = self.ids.lock().live.get_mut(&self.id) {
            owner.bound = Some(Bound {
                identity: identity.to_owned(),
                node: node.to_owned(),
                real,
            });
        }
    }
}

impl Drop for Issued<'_> {
    fn drop(&mut self) {
        self.ids.lock().live.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_in_range_and_forgotten_when_the_connection_ends() {
        let ids = ConnIds::starting_at(u32::MAX - 1);
        let a = ids.issue();
        let b = ids.issue();
        let c = ids.issue();
        assert_eq!(
            (a.id(), b.id(), c.id()),
            (u32::MAX - 1, u32::MAX, FAKE_ID_MIN)
        );
        assert!(ConnIds::in_range(u64::from(a.id())));
        assert!(!ConnIds::in_range(42));
        assert!(!ConnIds::in_range(u64::MAX));
        drop(b);
        assert_eq!(ids.live(), 2);
        // Wrapping around skips the ids still in use.
        let ids = ConnIds::starting_at(FAKE_ID_MIN);
        let first = ids.issue();
        ids.lock().next = FAKE_ID_MIN;
        assert_eq!(ids.issue().id(), FAKE_ID_MIN + 1);
        drop(first);
    }

    #[test]
    fn only_the_same_client_on_the_same_server_resolves_an_id() {
        let ids = ConnIds::new();
        let conn = ids.issue();
        let id = u64::from(conn.id());
        assert_eq!(ids.resolve(id, "postern://client/alice", "db1"), None);
        conn.bind("postern://client/alice", "db1", 17);
        assert_eq!(ids.resolve(id, "postern://client/alice", "db1"), Some(17));
        assert_eq!(ids.resolve(id, "postern://client/mallory", "db1"), None);
        assert_eq!(ids.resolve(id, "postern://client/alice", "db2"), None);
        assert_eq!(ids.resolve(id + 1, "postern://client/alice", "db1"), None);
        drop(conn);
        assert_eq!(ids.resolve(id, "postern://client/alice", "db1"), None);
    }
}
