//! The Postern wire protocol: pure code over buffers, no sockets.
//!
//! # Format (version 1)
//!
//! Every stream between an agent, a relay and a `connect` client starts with the 4-byte magic
//! `PSTN` followed by **frames**. A frame is a 4-byte big-endian length `N` followed by `N`
//! bytes of UTF-8 JSON, an object whose `"type"` field names the message. `N` is at most
//! [`MAX_FRAME`]; a longer length is refused before anything is allocated.
//!
//! ```text
//! +------+----------+-----------------+----------+-----------------+
//! | PSTN | len (u32)| JSON message    | len (u32)| JSON message    | ...
//! +------+----------+-----------------+----------+-----------------+
//! ```
//!
//! Two kinds of stream exist:
//!
//! * The **control stream**, opened by the agent once per session. The agent sends
//!   [`Control::Hello`] (the protocol versions it speaks and the services it offers); the relay
//!   answers [`Control::Welcome`] (the chosen version, which services it accepted and why it
//!   refused the others) or [`Control::Refused`] and closes. Afterwards both sides send
//!   [`Control::Heartbeat`] every interval; a side that hears nothing for about two intervals
//!   considers the peer dead. To agents whose hello lists [`FEATURE_MYSQL_E2E`], the relay also
//!   sends [`Control::Policy`] right after the welcome and whenever it changes.
//! * A **data stream**, one per client connection. The opener (the relay towards an agent, a
//!   `connect` client towards the relay) sends one [`Open`] frame; the other side answers with one
//!   [`Answer`] frame. After an [`Answer::Ok`] the stream carries raw bytes in both directions,
//!   and a finished direction is a half-close. After an [`Answer::Refused`] the stream ends.
//!
//! An **admin stream** is a data stream whose [`Open`] carries [`Open::admin`]: the relay asks
//! the agent for an administrative action on the service's database instead of a client
//! connection, only of agents whose hello lists [`FEATURE_USERS`] (an older agent would ignore
//! the field and connect a plain stream). The agent does the work first, then answers either
//! [`Answer::Refused`] (the service manages no users, no healthy node, the database's error) or
//! [`Answer::Ok`] followed by exactly one [`AdminDone`] frame, and ends the stream; no raw bytes
//! follow. The database's admin credential and the grants a user gets stay in the agent's own
//! config: the frame names only the binding, so a relay cannot ask for more than the agent
//! allows.
//!
//! ```text
//! relay → agent   PSTN {"type":"open","service":"orders","admin":{"action":"create_user","binding":"b-1"}}
//! agent → relay   PSTN {"type":"ok","backend":"10.0.0.11:3306"}
//!                      {"type":"user","username":"pb_3f1c0d2e9a7b4","password":"…"}
//! ```
//!
//! Versions are negotiated in the hello: the agent lists every version it speaks, the relay
//! picks the highest it also speaks or refuses with [`Code::UnsupportedVersion`]. The framing
//! (magic, length prefix, JSON object with `type`) is fixed across versions, so a peer of any
//! version can always read a refusal. Unknown fields are ignored, so a newer peer may add
//! fields without breaking an older one.

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The bytes every Postern stream starts with.
pub const MAGIC: [u8; 4] = *b"PSTN";

/// The largest frame body either side accepts or sends, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// The protocol versions this build speaks, oldest first.
pub const VERSIONS: &[u16] = &[1];

/// The ALPN protocol name of the agent and client links.
pub const ALPN: &[u8] = b"postern/1";

/// Messages on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// First message from the agent.
    Hello {
        /// Protocol versions the agent speaks.
        versions: Vec<u16>,
        /// Services the agent offers, by name.
        services: Vec<String>,
        /// The agent's software version, for logs and the dashboard.
        #[serde(default)]
        software: String,
        /// Set when this session takes over from a live session of the same agent (for example
        /// moving from WebSocket to QUIC): the relay sends new streams here and lets the old
        /// session finish its streams instead of closing it at once.
        #[serde(default)]
        take_over: bool,
        /// Optional features the agent supports ([`FEATURE_MYSQL_E2E`]); older agents send
        /// none, and the relay sends them nothing they would not understand.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// The relay accepts the session.
    Welcome {
        /// The version both sides now speak.
        version: u16,
        /// Identifies the relay instance (stable for the process lifetime).
        relay_instance: String,
        /// Services the relay will route to this agent.
        accepted: Vec<String>,
        /// Services the agent offered that the relay refused, with the reason.
        #[serde(default)]
        rejected: Vec<Rejected>,
        /// How often the relay will send heartbeats, in milliseconds.
        heartbeat_ms: u64,
        /// On Cloud Foundry: the relay app's GUID, so the agent can pin one session to every
        /// instance with `X-Cf-App-Instance: GUID:INDEX`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app_guid: Option<String>,
        /// On Cloud Foundry: this instance's index.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance_index: Option<u32>,
        /// Optional features the relay supports ([`FEATURE_DRAIN`]); the agent sends it nothing
        /// it would not understand.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// The relay refuses the whole session.
    Refused {
        /// Why, as a stable code.
        code: Code,
        /// Why, for people.
        message: String,
    },
    /// Liveness; sent by both sides every heartbeat interval.
    Heartbeat {
        /// Increments with every heartbeat a side sends.
        seq: u64,
    },
    /// The rules for services whose TLS ends at the agent ([`StreamMode::MysqlE2e`]), sent by
    /// the relay after the welcome and again whenever they change (a new revocation list), to
    /// agents that listed [`FEATURE_MYSQL_E2E`]. Each message replaces the previous one whole.
    Policy {
        /// One entry per end-to-end service this agent serves; a service not listed is refused.
        services: Vec<crate::policy::ServicePolicy>,
        /// The relay's revocation lists (PEM), applied to client certificates as the relay
        /// applies them. The whole message must fit in [`MAX_FRAME`]: a relay whose lists do
        /// not fit sends no services, so the agent refuses end-to-end clients rather than admit
        /// a revoked one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        crl_pem: Option<String>,
    },
    /// Agent → relay: the state of the services this agent serves (their nodes' health and the
    /// current decision), to relays whose welcome lists [`FEATURE_BACKENDS`]. Sent after the
    /// welcome, whenever a decision or a node's health changes, and every few seconds with fresh
    /// connection counts. Each message replaces the previous one whole.
    State {
        /// One entry per service the relay accepted from this agent.
        services: Vec<ServiceState>,
    },
    /// Relay → agent: an operator's command from the relay's API, to agents whose hello lists
    /// [`FEATURE_BACKENDS`].
    Command {
        /// What to do.
        command: Command,
    },
    /// The sender is going away (a relay or an agent shutting down): it routes nothing new over
    /// this session, lets the streams it carries finish, and closes the session when they are
    /// done or its grace period is over. A relay's drain tells an agent to open its next session
    /// now (to another relay instance, when there is one), before this one closes: make before
    /// break. Peers that do not know the message never get it (see [`FEATURE_DRAIN`]).
    Drain {
        /// Why, for logs.
        reason: String,
        /// How long the sender will wait for open streams, in milliseconds.
        grace_ms: u64,
    },
}

/// The feature of a hello that only checks whether the relay would accept this agent
/// (`postern-agent diagnose`): the relay answers it as any hello (a welcome with the services it
/// accepts, or a refusal), but registers nothing, so a running agent of the same identity keeps
/// its session; it lists the feature in that welcome, and closes the session once the agent has
/// read it. A relay that does not list it in its welcome took the session for the agent's own.
pub const FEATURE_PROBE: &str = "probe";

/// The feature (in the hello and in the welcome) of peers that speak [`Control::State`] and
/// [`Control::Command`], and fill [`Open::node`] and [`Open::term`].
pub const FEATURE_BACKENDS: &str = "backends";

/// The state of one service as its agent sees it: every node's health, and the decision that
/// names the node new connections go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The service.
    pub service: String,
    /// The decision's number: it only grows, and one term never names two nodes, whichever
    /// agent made it. Relays route by the highest term they know from any agent.
    pub term: u64,
    /// The node new connections go to, by name; `None` when no node is healthy, or traffic is
    /// disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// Why the decision is what it is, in words for the dashboard and logs.
    #[serde(default)]
    pub reason: String,
    /// When the decision was made, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub decided_at_ms: u64,
    /// Whether new connections are taken at all (Switchboard's `trafficEnabled`).
    pub traffic_enabled: bool,
    /// The operator's message when traffic is disabled.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The service's nodes, in config order.
    pub nodes: Vec<NodeState>,
}

/// One node of a service, as the agent's health checks see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's name (unique within the service).
    pub name: String,
    /// Where it listens (`host:port`).
    pub address: String,
    /// Whether it may take connections (its check passed `rise` times since it last failed).
    pub healthy: bool,
    /// An operator drained it: no new connections, the open ones go on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// The kind of check (`mysql`, `http`, `tcp`).
    pub check: String,
    /// The last check's result, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckResult>,
    /// Checks failed in a row.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// When the node last turned healthy or unhealthy, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub last_transition_ms: u64,
    /// Why it last turned healthy or unhealthy.
    #[serde(default)]
    pub last_transition: String,
    /// Connections this agent has open to it.
    #[serde(default)]
    pub connections: u64,
    /// Galera's `wsrep_local_index`, when the check reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wsrep_local_index: Option<u32>,
    /// Checks run on this node since the agent started (a counter, for metrics).
    #[serde(default)]
    pub checks: u64,
    /// Of those, how many failed.
    #[serde(default)]
    pub check_failures: u64,
    /// How many times the node turned healthy or unhealthy since the agent started.
    #[serde(default)]
    pub transitions: u64,
}

/// The result of one health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Whether the node answered healthy.
    pub ok: bool,
    /// What it answered, or why the check failed (`503`, `timed out`, `wsrep_local_state 2`).
    pub detail: String,
    /// How long the check took, in milliseconds.
    pub latency_ms: u64,
    /// When it finished, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// An operator's command, from the relay's API to the agents that serve the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// Take new connections or not (Switchboard's `PATCH /v0/cluster trafficEnabled`); turning
    /// traffic off also closes the open connections, with `message` as the reason.
    Traffic {
        /// The service.
        service: String,
        /// Whether traffic is enabled.
        enabled: bool,
        /// Why it is disabled (shown to refused clients).
        #[serde(default)]
        message: String,
    },
    /// Stop giving a node new connections (its open ones finish), or resume.
    Drain {
        /// The service.
        service: String,
        /// The node.
        node: String,
        /// Drain (`true`) or resume (`false`).
        drain: bool,
    },
    /// Make `node` the active node now, if it is healthy (an operator's failback).
    Activate {
        /// The service.
        service: String,
        /// The node.
        node: String,
    },
}

/// The hello feature of agents that understand [`Control::Drain`] (and may send it).
pub const FEATURE_DRAIN: &str = "drain";

/// The hello feature of agents that serve MySQL with TLS ending at the agent: they understand
/// [`Control::Policy`] and [`StreamMode::MysqlE2e`].
pub const FEATURE_MYSQL_E2E: &str = "mysql_e2e";

/// What the bytes of a data stream are, after the [`Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMode {
    /// The client's bytes as the backend takes them (the relay or the client ended TLS).
    #[default]
    Plain,
    /// A MySQL client's raw connection, TLS negotiated in-band: the agent runs the MySQL front
    /// end (greeting, SSLRequest, TLS with the service certificate, policy) and the relay only
    /// carries ciphertext.
    MysqlE2e,
}

impl StreamMode {
    /// Whether this is the default (left out of frames, so older peers read them).
    pub fn is_plain(&self) -> bool {
        *self == Self::Plain
    }
}

/// A service the relay would not accept from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The service name.
    pub service: String,
    /// Why it was refused.
    pub reason: String,
}

/// The first frame of a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "open")]
pub struct Open {
    /// The service to reach.
    pub service: String,
    /// The client identity the relay authenticated (empty when a client opens towards the relay:
    /// the relay takes the identity from the client's certificate, never from the frame).
    #[serde(default)]
    pub client: String,
    /// The client's address as the relay saw it.
    #[serde(default)]
    pub client_addr: String,
    /// A relay-assigned id that appears in both sides' logs.
    #[serde(default)]
    pub conn_id: u64,
    /// The relay opened the stream without an authorised client (`client` is empty): to read
    /// the server's greeting for its greeting template, when no client byte ever goes into the
    /// stream; or in [`StreamMode::MysqlE2e`], where the agent authorises the client (the
    /// relay cannot read its bytes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_auth: bool,
    /// What the stream carries; see [`StreamMode`].
    #[serde(default, skip_serializing_if = "StreamMode::is_plain")]
    pub mode: StreamMode,
    /// The node the relay routes to: the active node of the highest term it knows from any
    /// agent of the service (with [`FEATURE_BACKENDS`]; `None` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The term of that decision (0 when `node` is `None`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub term: u64,
    /// Set on an admin stream: the action the relay asks for instead of a client connection
    /// (see the module docs); sent only to agents with [`FEATURE_USERS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
}

/// The hello feature of agents that manage per-binding database users for at least one of
/// their services (`services.NAME.users` in agent.yaml): they understand [`Open::admin`].
pub const FEATURE_USERS: &str = "users";

/// An administrative action on a service's database, asked by the relay (its service broker)
/// on an admin stream. Only the binding is named: the user's name is derived from it
/// ([`binding_username`]), and its host, grants and the admin credential come from the agent's
/// config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Admin {
    /// Create the binding's user, or give it a new password if it exists (a retried bind), and
    /// set its grants to the agent's configured ones. Answered with [`AdminDone::User`].
    CreateUser {
        /// The binding id (the platform's, e.g. a GUID).
        binding: String,
    },
    /// Drop the binding's user; a user that does not exist is not an error (a retried unbind).
    /// Answered with [`AdminDone::Dropped`].
    DropUser {
        /// The binding id.
        binding: String,
    },
}

impl Admin {
    /// The binding the action is for.
    pub fn binding(&self) -> &str {
        match self {
            Self::CreateUser { binding } | Self::DropUser { binding } => binding,
        }
    }
}

/// The frame that follows [`Answer::Ok`] on an admin stream: what the agent did. `Debug`
/// never shows a password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminDone {
    /// The binding's user exists with this password and the configured grants.
    User {
        /// The MySQL user name ([`binding_username`]).
        username: String,
        /// Its new password (random, alphanumeric).
        password: String,
    },
    /// The binding's user does not exist (any more).
    Dropped {
        /// The MySQL user name.
        username: String,
    },
}

impl std::fmt::Debug for AdminDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User { username, .. } => f
                .debug_struct("User")
                .field("username", username)
                .field("password", &"***")
                .finish(),
            Self::Dropped { username } => f
                .debug_struct("Dropped")
                .field("username", username)
                .finish(),
        }
    }
}

/// The longest binding id an agent takes (platform ids are GUIDs; this is generous).
pub const MAX_BINDING_ID: usize = 255;

/// The MySQL user name of binding `binding`: `pb_` and the first 13 hex digits of the SHA-256
/// of the binding id (16 characters: within every MySQL and MariaDB limit, even MySQL 5.6's
/// 16). Deterministic, so a retried bind or unbind finds the same user and no table of names
/// is needed; a fixed prefix, so an operator can tell binding users apart (`SELECT User FROM
/// mysql.user WHERE User LIKE 'pb\_%'`).
pub fn binding_username(binding: &str) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, binding.as_bytes());
    let mut name = String::from("pb_");
    for b in digest.as_ref() {
        let _ = write!(name, "{b:02x}");
    }
    name.truncate(16);
    name
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Open {
    /// An open as a client sends it to the relay: only the service; the relay knows who the
    /// client is from its certificate and fills in the rest towards the agent. An empty service
    /// is a probe the relay answers itself (has it accepted our certificate?).
    pub fn for_service(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            client: String::new(),
            client_addr: String::new(),
            conn_id: 0,
            pre_auth: false,
            mode: StreamMode::default(),
            node: None,
            term: 0,
            admin: None,
        }
    }
}

/// The answer to an [`Open`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Answer {
    /// The stream is connected; raw bytes follow.
    Ok {
        /// The backend the agent connected to (`host:port`), for logs.
        #[serde(default)]
        backend: String,
    },
    /// The stream was refused; nothing follows.
    Refused {
        /// Why, as a stable code.
        code: Code,
        /// Why, for people.
        message: String,
    },
}

/// Stable reasons for refusing a session or a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// No common protocol version.
    UnsupportedVersion,
    /// The peer's identity may not do this.
    NotAuthorized,
    /// The named service does not exist on this side.
    UnknownService,
    /// No agent offering the service is connected to the relay.
    NoAgent,
    /// The agent could not connect to the service's backend.
    BackendUnavailable,
    /// A limit on concurrent connections was reached.
    TooManyConnections,
    /// The peer sent something that is not valid protocol.
    BadRequest,
    /// The side is shutting down.
    ShuttingDown,
    /// The database refused an administrative action (its error is in the message).
    AdminFailed,
    /// A code from a newer peer that this build does not know.
    #[serde(other)]
    Unknown,
}

impl Code {
    /// The code as it appears on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnsupportedVersion => "unsupported_version",
            Self::NotAuthorized => "not_authorized",
            Self::UnknownService => "unknown_service",
            Self::NoAgent => "no_agent",
            Self::BackendUnavailable => "backend_unavailable",
            Self::TooManyConnections => "too_many_connections",
            Self::BadRequest => "bad_request",
            Self::ShuttingDown => "shutting_down",
            Self::AdminFailed => "admin_failed",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a peer was refused: a stable [`Code`] and words for people. The message is shown to the
/// peer (in an [`Answer::Refused`], a MySQL ERR packet, a log line), so it says what happened and,
/// where it can, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The stable code.
    pub code: Code,
    /// The reason, in words.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The answer that carries this refusal on a data stream.
    pub fn answer(&self) -> Answer {
        Answer::Refused {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.message, self.code)
    }
}

/// What can be wrong with bytes that should be a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream did not start with [`MAGIC`].
    #[error("stream does not start with the postern magic (got {0:02x?})")]
    BadMagic([u8; 4]),
    /// A length prefix over [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    /// The body is not a message this version understands.
    #[error("malformed frame: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The stream ended in the middle of a frame or before an expected one.
    #[error("stream ended before a complete frame")]
    Truncated,
}

/// Appends `msg` as one frame to `buf`.
pub fn encode<T: Serialize>(msg: &T, buf: &mut BytesMut) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::Malformed)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    buf.reserve(4 + body.len());
    // MAX_FRAME fits in u32, so the cast cannot truncate.
    buf.put_u32(body.len() as u32);
    buf.put_slice(&body);
    Ok(())
}

/// Takes one frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (nothing is consumed then), and an
/// error as soon as the length prefix is over the limit, without waiting for the body.
pub fn decode<T: DeserializeOwned>(buf: &mut BytesMut) -> Result<Option<T>, FrameError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len);
    decode_body(&body).map(Some)
}

/// Reads the length prefix at the front of `buf`, checking it against [`MAX_FRAME`].
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Parses a frame body (without its length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

/// Checks the 4 bytes a stream starts with.
pub fn check_magic(bytes: [u8; 4]) -> Result<(), FrameError> {
    if bytes == MAGIC {
        Ok(())
    } else {
        Err(FrameError::BadMagic(bytes))
    }
}

/// Picks the highest version both sides speak.
pub fn negotiate(offered: &[u16]) -> Option<u16> {
    VERSIONS.iter().rev().find(|v| offered.contains(v)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let mut buf = BytesMut::new();
        encode(&msg, &mut buf).unwrap();
        // Feed the encoding one byte at a time: nothing decodes until the last byte.
        let bytes = buf.split().freeze();
        let mut feed = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            feed.put_u8(*b);
            let got: Option<T> = decode(&mut feed).unwrap();
            if i + 1 < bytes.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got.unwrap(), msg);
                assert!(feed.is_empty());
            }
        }
    }

    #[test]
    fn messages_roundtrip_byte_by_byte() {
        roundtrip(Control::Hello {
            versions: vec![1],
            services: vec!["orders".into()],
            software: "0.1.0".into(),
            take_over: false,
            features: vec![FEATURE_MYSQL_E2E.into()],
        });
        roundtrip(Control::Policy {
            services: vec![crate::policy::ServicePolicy {
                name: "orders".into(),
                clients: crate::policy::Acl::Any,
                allowed_users: Default::default(),
                client_attribute: false,
                handshake_timeout_ms: 10_000,
                first_packet_timeout_ms: 3_000,
                max_handshakes: 100,
                bindings: crate::policy::Bindings(
                    [("binding-1".to_owned(), Some("pb_1".to_owned()))].into(),
                ),
            }],
            crl_pem: Some("-----BEGIN X509 CRL-----".into()),
        });
        roundtrip(Control::Heartbeat { seq: 7 });
        roundtrip(Control::Drain {
            reason: "relay shutting down".into(),
            grace_ms: 8000,
        });
        roundtrip(Control::State {
            services: vec![ServiceState {
                service: "orders".into(),
                term: 7,
                active: Some("n1".into()),
                reason: "n2 unhealthy: 503".into(),
                decided_at_ms: 1,
                traffic_enabled: true,
                message: String::new(),
                nodes: vec![NodeState {
                    name: "n1".into(),
                    address: "10.0.0.1:3306".into(),
                    healthy: true,
                    draining: false,
                    check: "mysql".into(),
                    last_check: Some(CheckResult {
                        ok: true,
                        detail: "synced".into(),
                        latency_ms: 2,
                        at_ms: 3,
                    }),
                    consecutive_failures: 0,
                    last_transition_ms: 4,
                    last_transition: "rose".into(),
                    connections: 12,
                    wsrep_local_index: Some(0),
                    checks: 10,
                    check_failures: 1,
                    transitions: 2,
                }],
            }],
        });
        roundtrip(Control::Command {
            command: Command::Traffic {
                service: "orders".into(),
                enabled: false,
                message: "maintenance".into(),
            },
        });
        roundtrip(Control::Refused {
            code: Code::NotAuthorized,
            message: "no".into(),
        });
        roundtrip(Open {
            service: "orders".into(),
            client: "alice".into(),
            client_addr: "127.0.0.1:1".into(),
            conn_id: 9,
            pre_auth: false,
            mode: StreamMode::Plain,
            node: None,
            term: 0,
            admin: None,
        });
        roundtrip(Open {
            service: "orders".into(),
            client: String::new(),
            client_addr: "127.0.0.1:1".into(),
            conn_id: 10,
            pre_auth: true,
            mode: StreamMode::MysqlE2e,
            node: None,
            term: 0,
            admin: None,
        });
        roundtrip(Open {
            admin: Some(Admin::CreateUser {
                binding: "b-1".into(),
            }),
            ..Open::for_service("orders")
        });
        roundtrip(Open {
            admin: Some(Admin::DropUser {
                binding: "b-1".into(),
            }),
            ..Open::for_service("orders")
        });
        roundtrip(AdminDone::User {
            username: "pb_0123456789abc".into(),
            password: "p".into(),
        });
        roundtrip(AdminDone::Dropped {
            username: "pb_0123456789abc".into(),
        });
        roundtrip(Answer::Refused {
            code: Code::BackendUnavailable,
            message: "connection refused".into(),
        });
    }

    #[test]
    fn admin_frames_are_what_older_peers_can_read() {
        // Without an action the field is left out: an older agent reads the open as before.
        let body = serde_json::to_string(&Open::for_service("orders")).unwrap();
        assert!(!body.contains("admin"), "{body}");
        let open: Open = decode_body(
            br#"{"type":"open","service":"orders","admin":{"action":"drop_user","binding":"b"}}"#,
        )
        .unwrap();
        assert_eq!(
            open.admin,
            Some(Admin::DropUser {
                binding: "b".into()
            })
        );
        let done = AdminDone::User {
            username: "pb_x".into(),
            password: "hunter2hunter2".into(),
        };
        assert!(!format!("{done:?}").contains("hunter2"));
    }

    #[test]
    fn binding_usernames_are_short_stable_and_distinct() {
        let a = binding_username("6d9e4a30-0f5e-4d7c-9b1e-2a8f7c3d1e00");
        assert_eq!(a.len(), 16);
        assert!(a.starts_with("pb_"));
        assert!(a[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, binding_username("6d9e4a30-0f5e-4d7c-9b1e-2a8f7c3d1e00"));
        assert_ne!(a, binding_username("6d9e4a30-0f5e-4d7c-9b1e-2a8f7c3d1e01"));
        // SHA-256("abc") starts ba7816bf8f01c.
        assert_eq!(binding_username("abc"), "pb_ba7816bf8f01c");
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME + 1) as u32);
        assert!(matches!(
            decode::<Control>(&mut buf),
            Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1
        ));
    }

    #[test]
    fn unknown_codes_from_newer_peers_are_readable() {
        let a: Answer =
            decode_body(br#"{"type":"refused","code":"quota_exceeded","message":"m"}"#).unwrap();
        assert_eq!(
            a,
            Answer::Refused {
                code: Code::Unknown,
                message: "m".into()
            }
        );
    }

    #[test]
    fn two_frames_in_one_buffer_decode_in_order() {
        let mut buf = BytesMut::new();
        encode(&Control::Heartbeat { seq: 1 }, &mut buf).unwrap();
        encode(&Control::Heartbeat { seq: 2 }, &mut buf).unwrap();
        assert_eq!(
            decode::<Control>(&mut buf).unwrap(),
            Some(Control::Heartbeat { seq: 1 })
        );
        assert_eq!(
            decode::<Control>(&mut buf).unwrap(),
            Some(Control::Heartbeat { seq: 2 })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn version_negotiation_picks_the_highest_common() {
        assert_eq!(negotiate(&[1, 2, 3]), Some(1));
        assert_eq!(negotiate(&[7]), None);
        assert_eq!(negotiate(&[]), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode::<Control>(&mut buf);
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode::<Open>(&mut buf);
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode::<Answer>(&mut buf);
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(&body);
            let _ = decode::<Control>(&mut buf);
        }
    }
}
