//! Who may use a service and as which MySQL users: the rules the relay's config states, in a
//! form the relay applies itself and sends to agents that end TLS (end-to-end mode).
//!
//! These are plain values, serialised as JSON inside [`Control::Policy`] frames; they hold no
//! I/O and no secrets.
//!
//! [`Control::Policy`]: crate::protocol::Control::Policy

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::pki::Identity;

/// Which client identities may use a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Acl {
    /// Any client certificate signed by the CA, except the service broker's bindings
    /// ([`BINDING_PREFIX`]): each of those is admitted only by its own service's [`Bindings`].
    Any,
    /// Only these client names.
    Only(BTreeSet<String>),
}

impl Acl {
    /// Whether `id` may use the service. Agents never may.
    pub fn allows(&self, id: &Identity) -> bool {
        match (self, id) {
            (_, Identity::Agent(_)) => false,
            (Self::Any, Identity::Client(n)) => !is_binding(n),
            (Self::Only(names), Identity::Client(n)) => names.contains(n),
        }
    }
}

/// Which MySQL user names each client identity may log in as.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowedUsers {
    /// No policy: any user the database accepts.
    #[default]
    Any,
    /// A policy: per-client lists, and a list for every other client (`"*"`, or the plain list
    /// form). A client that neither names may log in as no one.
    Policy {
        /// Lists by client name.
        clients: BTreeMap<String, Users>,
        /// The list for clients not named.
        others: Option<Users>,
    },
}

/// A list of MySQL user names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Users {
    /// Any user (`"*"` in the list).
    Any,
    /// Only these, compared byte for byte (MySQL user names are case-sensitive).
    Only(BTreeSet<String>),
}

impl Users {
    /// Whether `user` is on the list.
    pub fn allows(&self, user: &[u8]) -> bool {
        match self {
            Self::Any => true,
            Self::Only(names) => names.iter().any(|n| n.as_bytes() == user),
        }
    }
}

impl AllowedUsers {
    /// The users client `name` may log in as.
    pub fn for_client(&self, name: &str) -> Users {
        match self {
            Self::Any => Users::Any,
            Self::Policy { clients, others } => clients
                .get(name)
                .or(others.as_ref())
                .cloned()
                .unwrap_or_else(|| Users::Only(BTreeSet::new())),
        }
    }
}

/// The rules of one MySQL service whose TLS ends at the agent, as the relay sends them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePolicy {
    /// The service name.
    pub name: String,
    /// Who may connect.
    pub clients: Acl,
    /// Which MySQL users each client may log in as.
    #[serde(default)]
    pub allowed_users: AllowedUsers,
    /// Whether sessions get the connection attribute `postern_client`.
    #[serde(default)]
    pub client_attribute: bool,
    /// Deadline for the connection phase, in milliseconds (as the relay's `handshake_timeout`).
    pub handshake_timeout_ms: u64,
    /// Deadline for the client's first packet after the greeting, in milliseconds (as the
    /// relay's `first_packet_timeout`); 0 (an older relay) means `handshake_timeout_ms`.
    #[serde(default)]
    pub first_packet_timeout_ms: u64,
    /// Limit of connections still in their handshake (not yet authorised) at the agent; when
    /// it is reached, the oldest gives way. 0 means no limit.
    #[serde(default)]
    pub max_handshakes: usize,
    /// The service broker's bindings of this service.
    #[serde(default, skip_serializing_if = "Bindings::is_empty")]
    pub bindings: Bindings,
}

/// The prefix of the client identity names the relay's service broker issues
/// (`postern://client/binding-ID`): such a name is never admitted by `clients: "*"`, only by
/// the [`Bindings`] of the service it was bound to.
pub const BINDING_PREFIX: &str = "binding-";

/// Whether `name` is a client identity issued by the service broker.
pub fn is_binding(name: &str) -> bool {
    name.starts_with(BINDING_PREFIX)
}

/// The service broker's live bindings of one service: each binding's client identity name, and
/// the MySQL user it is limited to when the binding has a user of its own (that user is then
/// reserved to it: no other client may log in as it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bindings(pub BTreeMap<String, Option<String>>);

impl Bindings {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the binding identity `name` is live for the service.
    pub fn allows(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Whether any binding has a MySQL user of its own.
    pub fn has_users(&self) -> bool {
        self.0.values().any(Option::is_some)
    }

    /// Whether `client` may log in as `user` as far as the bindings say: `Some(verdict)` when
    /// they decide (a binding with its own user; a user that belongs to another binding),
    /// `None` when the service's `allowed_users` do.
    pub fn user_verdict(&self, client: &str, user: &[u8]) -> Option<bool> {
        if let Some(Some(own)) = self.0.get(client) {
            return Some(own.as_bytes() == user);
        }
        if self
            .0
            .iter()
            .any(|(name, u)| name != client && u.as_ref().is_some_and(|u| u.as_bytes() == user))
        {
            return Some(false);
        }
        None
    }
}

/// The longest handshake deadline an agent accepts from a relay's policy.
pub const MAX_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl ServicePolicy {
    /// The handshake deadline, bounded: the value comes from the relay, and a wrong relay must
    /// not be able to make the agent's deadline arithmetic overflow (or switch deadlines off).
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout_ms)
            .clamp(std::time::Duration::from_millis(1), MAX_HANDSHAKE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_survive_json() {
        let p = ServicePolicy {
            name: "orders".into(),
            clients: Acl::Only(["alice".to_owned()].into()),
            allowed_users: AllowedUsers::Policy {
                clients: [("alice".to_owned(), Users::Any)].into(),
                others: Some(Users::Only(["app".to_owned()].into())),
            },
            client_attribute: true,
            handshake_timeout_ms: 5000,
            first_packet_timeout_ms: 2000,
            max_handshakes: 100,
            bindings: Bindings([("binding-b".to_owned(), None)].into()),
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<ServicePolicy>(&json).unwrap(), p);
        let any: ServicePolicy =
            serde_json::from_str(r#"{"name":"x","clients":"any","handshake_timeout_ms":1}"#)
                .unwrap();
        assert_eq!(any.allowed_users, AllowedUsers::Any);
        let huge: ServicePolicy = serde_json::from_str(
            r#"{"name":"x","clients":"any","handshake_timeout_ms":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(huge.handshake_timeout(), MAX_HANDSHAKE_TIMEOUT);
        let _ = tokio::time::Instant::now() + huge.handshake_timeout();
        assert!(any.clients.allows(&Identity::Client("z".into())));
    }
}
