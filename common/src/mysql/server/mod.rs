//! The MySQL front end for stock MySQL and MariaDB clients with mutual TLS: the async code that
//! drives the pure codecs of [`crate::mysql`], the same wherever TLS ends: at the relay
//! (`tls_termination: relay`) or at the agent (`tls_termination: agent`, end to end, so the
//! relay only carries ciphertext).
//!
//! # A client that has not shown a certificate costs little and the database nothing
//!
//! MySQL negotiates TLS in-band: the server greets in plaintext, the client asks for TLS with a
//! 32-byte SSLRequest, and the TLS handshake runs on the same connection. The front end does
//! not wait for the database to greet: it greets the client itself with a copy of a real
//! greeting of that backend (a per-service template, [`Greetings`]), with a connection id of its
//! own ([`ConnIds`]) and a random scramble. [`serve_tls`] then:
//!
//! 1. Sends that greeting with CLIENT_SSL set and compression cleared.
//! 2. Requires the client's SSLRequest within the first-packet deadline; a plaintext handshake
//!    response gets ERR "TLS with a client certificate is required", naming the options of the
//!    common drivers.
//! 3. Runs the TLS handshake. A certificate that does not chain to the Postern CA, has expired
//!    or is revoked fails the handshake; the client cannot read an ERR then, so the events sink
//!    records why.
//! 4. Reads the handshake response over TLS, then refuses (ERR over TLS) a client that sent no
//!    certificate, an identity not in the service's `clients`, or a MySQL user outside
//!    `allowed_users`.
//!
//! Steps 1 to 4 hold no backend connection, run under one deadline counted from accept
//! (`handshake_timeout`), and count against the service's cap on connections in their handshake
//! ([`Gate`]): when it is full, a new connection evicts the oldest one still in its handshake.
//! A real client's handshake takes milliseconds while a silent socket sits for seconds, so an
//! authorised client gets through unless an attacker opens connections faster than a handshake
//! completes; and no number of silent sockets costs the database anything.
//!
//! Only then (authorised):
//!
//! 5. The caller's dialler connects to the backend (at the relay, a stream through an agent; at
//!    the agent, the database), whose real greeting refreshes the template. If that greeting
//!    lacks capabilities the client negotiated with the template (the database was upgraded or
//!    replaced by a different server), the client gets a clear ERR and its retry sees the new
//!    template.
//! 6. The client gets an AuthSwitchRequest with the backend's plugin and scramble; its answer
//!    becomes the auth data of the handshake response the backend gets (the client's user,
//!    database and attributes, its capabilities intersected with the backend's, and the
//!    `postern_client` attribute with `client_attribute`), see [`Handover`]. The rest of the
//!    login is relayed with [`AuthRelay`] (a backend that switches again, to ed25519 or
//!    caching_sha2, still works); sequence ids are renumbered on both legs.
//! 7. Bytes are spliced. The client's commands pass a [`CommandWatch`]: a `COM_CHANGE_USER` to a
//!    user outside the policy is refused and the connection closed, an allowed one gets
//!    `postern_client` set again (the new session's attributes are the ones in that command,
//!    so a client could otherwise forge them), and a `KILL` of a connection id this front end
//!    handed out is rewritten to the real id (see below).
//!
//! # Connection ids and `KILL`
//!
//! The greeting's connection id is what drivers use to cancel a query: Connector/J's query
//! timeouts and `Statement.cancel`, the `mariadb` CLI's Ctrl-C, send `KILL QUERY <id>` on a
//! second connection. The front end hands out ids from 2^31 up ([`FAKE_ID_MIN`]), a range real
//! thread ids do not reach, remembers which real id each live connection has (per process), and
//! rewrites `KILL [QUERY|CONNECTION] <id>` and `COM_PROCESS_KILL` that arrive through it, when
//! the id is one of its own connections of the same client identity on the same database
//! server. An id in that range it does not know (another process's, a finished connection's, or
//! another client's) gets the database's own "Unknown thread id" error, so a `KILL` can never
//! reach a connection its sender was not given. Limits: in relay mode the ids live in one relay
//! instance, so a cancel that arrives through another instance (behind a load balancer) fails
//! with that error (end to end, the ids live in the agent, which every instance reaches);
//! `SELECT CONNECTION_ID()` and `SHOW PROCESSLIST` show the real ids, and a `KILL` of such a
//! real id passes unchanged (the database checks privileges as ever) unless it is 2^31 or above.
//!
//! [`serve_inspected`] runs steps 4 to 7 without TLS and with the backend's own greeting, for
//! clients that arrive already authenticated inside an encrypted tunnel (`connect` streams, the
//! relay's TLS-first listener); the backend connection is opened after they are authorised.

mod gate;
mod greetings;
mod ids;
mod io;
mod login;
mod serve;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::events::{Events, Origin};
use crate::pki::Identity;
use crate::policy::{Acl, AllowedUsers, Bindings, Users, is_binding};
use crate::protocol::{Code, Refusal};

#[cfg(doc)]
use crate::mysql::{AuthRelay, CommandWatch, Handover};

pub use gate::{Admission, Gate};
pub use greetings::{GreetingError, Greetings, RETRY_AFTER, read_greeting};
pub use ids::{ConnIds, FAKE_ID_MIN, Issued};
pub use io::{Conn, Rewind};
pub use serve::{Dialled, Greeter, refuse, serve_inspected, serve_tls};

/// The connection attribute that names the client identity (`postern://client/NAME`) to the
/// database, with `client_attribute: true`.
pub const CLIENT_ATTRIBUTE: &str = "postern_client";

/// The rules of one service, wherever they come from (the relay's config, or the policy the
/// relay sent the agent): a borrowed view.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The service name, for messages.
    pub service: &'a str,
    /// Who may connect.
    pub clients: &'a Acl,
    /// Which MySQL users each client may log in as.
    pub allowed_users: &'a AllowedUsers,
    /// The service broker's bindings of the service.
    pub bindings: &'a Bindings,
    /// Whether sessions get the connection attribute `postern_client`.
    pub client_attribute: bool,
    /// The deadline for each packet of the login exchange once the client is authorised.
    pub handshake_timeout: Duration,
}

impl Rules<'_> {
    /// Whether a client that arrives already authenticated must log in through the front end
    /// ([`serve_inspected`]) so that the user policy and the client attribute apply to it.
    pub fn needs_inspection(&self, identity: &Identity) -> bool {
        self.client_attribute
            || self.allowed_users.for_client(identity.name()) != Users::Any
            || self.bindings.has_users()
    }

    /// Whether `client` may use the service.
    pub fn authorise(&self, client: &Identity) -> Result<(), Refusal> {
        let allowed = match client {
            Identity::Client(name) if is_binding(name) => self.bindings.allows(name),
            other => self.clients.allows(other),
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::new(
                Code::NotAuthorized,
                format!("{client} is not allowed to use service {:?}", self.service),
            ))
        }
    }

    /// Whether `identity` may log in to the service as MySQL user `user`.
    pub fn check_user(&self, identity: &Identity, user: &[u8]) -> Result<(), Refusal> {
        let allowed = match self.bindings.user_verdict(identity.name(), user) {
            Some(verdict) => verdict,
            None => self.allowed_users.for_client(identity.name()).allows(user),
        };
        if allowed {
            return Ok(());
        }
        Err(Refusal::new(
            Code::NotAuthorized,
            format!(
                "{identity} may not log in to service {:?} as MySQL user {:?}",
                self.service,
                String::from_utf8_lossy(user)
            ),
        ))
    }
}

/// Where a front end runs, for its events: the rules it applies, the events sink, which
/// listener or stream kind, and the client's address.
#[derive(Debug, Clone, Copy)]
pub struct Front<'a> {
    /// The service's rules.
    pub rules: Rules<'a>,
    /// The process's events sink.
    pub events: &'a Events,
    /// Where the client came in.
    pub origin: Origin,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
}

impl Front<'_> {
    /// Records that the client (`identity`, once known) was refused.
    pub fn refused(&self, identity: Option<&Identity>, refusal: &Refusal) {
        let identity = identity.map(Identity::uri);
        self.events.refused(
            self.origin,
            self.peer,
            Some(self.rules.service),
            identity.as_deref(),
            refusal,
        );
    }
}

/// The deadlines of a connection in its handshake, both counted from accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// For the client's first packet after the greeting (its SSLRequest).
    pub first_packet: Instant,
    /// For everything up to the client being authorised.
    pub handshake: Instant,
}

impl Deadlines {
    /// The deadlines of a connection accepted at `accepted`. The first-packet deadline is never
    /// later than the handshake deadline; durations too long to add (a peer may send any) end
    /// far in the future instead of overflowing.
    pub fn from_accept(accepted: Instant, first_packet: Duration, handshake: Duration) -> Self {
        let at = |d: Duration| {
            accepted
                .checked_add(d)
                .unwrap_or_else(|| accepted + Duration::from_secs(365 * 24 * 3600))
        };
        let handshake = at(handshake);
        Self {
            first_packet: at(first_packet).min(handshake),
            handshake,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_count_from_accept_and_never_overflow() {
        let t = Instant::now();
        let d = Deadlines::from_accept(t, Duration::from_secs(3), Duration::from_secs(10));
        assert_eq!(d.first_packet, t + Duration::from_secs(3));
        assert_eq!(d.handshake, t + Duration::from_secs(10));
        let d = Deadlines::from_accept(t, Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(d.first_packet, d.handshake);
        let d = Deadlines::from_accept(t, Duration::MAX, Duration::MAX);
        assert!(d.handshake > t + Duration::from_secs(3600));
    }
}
