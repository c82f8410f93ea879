//! The MySQL protocol as far as Postern needs it: ERR packets that explain refusals, and the
//! connection phase of a front end that gives stock MySQL/MariaDB clients mutual TLS.
//!
//! The codecs here are pure code over buffers: no sockets, no tasks. [`server`] is the async
//! front end that drives them; the relay (or the agent, when TLS ends there) owns the
//! connections and calls it, so the same code serves either end.
//!
//! # Wire format
//!
//! A MySQL connection carries packets: a 3-byte little-endian payload length, a 1-byte
//! sequence id and the payload (see [`PacketReader`] and [`encode`]). The sequence id goes up
//! by one with every packet in either direction, runs on through the whole connection phase,
//! and starts again at 0 with every command. The connection phase of a client that upgrades to
//! TLS at this side, greeted by this side with a copy of the backend's greeting, looks like this
//! (sequence ids in brackets); the backend is reached only once the client is authorised:
//!
//! ```text
//! client                          this side                          backend
//!   <-- copied greeting [0], own id and scramble, CLIENT_SSL set
//!   --- SSLRequest [1] ------------->
//!   === TLS handshake (client certificate checked) ===
//!   --- HandshakeResponse [2] ------>  (policy applied; connect)
//!                                      <------------------- greeting [0] --
//!   <-- AuthSwitchRequest [3] -------  (the backend's plugin and scramble)
//!   --- auth data [4] -------------->  --- response [1], CLIENT_SSL cleared -->
//!   <-- auth switch / more data [n+3]  <-- [n] --------------------------------
//!   --- auth data [m] -------------->  --- [m-3] ----------------------------->
//!   <-- OK or ERR [k+3] -------------  <-- [k] --------------------------------
//!   ==== command phase: bytes pass (every command restarts at 0) ====
//! ```
//!
//! # Driving it
//!
//! 1. Keep a real greeting of the backend ([`Greeting::parse`]) and greet each client with
//!    [`Greeting::reissue`] (an id and scramble of this side's) and [`Greeting::for_client`],
//!    at sequence id 0.
//! 2. Read the client's first packet ([`Packet::expect_seq`] 1); [`ClientFirst::parse`] tells
//!    an SSLRequest from a plaintext response. Refuse a plaintext one with [`refusal_at`] at
//!    [`Packet::next_seq`] (2).
//! 3. Run TLS on the same connection. Bytes the reader left in the buffer are the start of the
//!    ClientHello and go to TLS first.
//! 4. Read the handshake response over TLS (sequence id 2, with a fresh reader: the TLS layer
//!    now owns the bytes) and parse it with [`HandshakeResponse::parse`]; check the identity
//!    and the user against the policy (refuse at sequence id 3).
//! 5. Connect to the backend and read its greeting. [`MysqlError::Refused`] means the server
//!    sent an ERR instead: send that packet to the client (at 3). [`Negotiated::missing_in`]
//!    says whether the backend lacks what the client chose from the copied greeting.
//! 6. [`HandshakeResponse::for_backend`] (and optionally
//!    [`HandshakeResponse::set_attribute`] to tag the session with the client's identity), then
//!    [`Handover::start`] gives the AuthSwitchRequest for the client, and
//!    [`Handover::finish`] takes its answer and gives the response for the backend and an
//!    [`AuthRelay`]: read from whichever side [`AuthRelay::turn`] names and pass each packet
//!    through [`AuthRelay::from_backend`] or [`AuthRelay::from_client`] until [`Turn::Done`].
//!    (A client that arrives authenticated gets the backend's own greeting and
//!    [`AuthRelay::start`] instead.)
//! 7. Forward bytes, starting with anything left in either reader's buffer, through a
//!    [`CommandWatch`], which holds back only the commands a policy judges: `COM_CHANGE_USER`,
//!    and the `KILL`s ([`Kill`]) whose id must become the backend's.

mod auth;
mod codec;
mod command;
mod err;
mod handshake;
mod kill;
mod packet;
pub mod server;
#[cfg(test)]
mod vectors;
mod watch;

pub use auth::{AuthOutcome, AuthRelay, CACHING_SHA2_PASSWORD, Handover, Legs, Turn, auth_switch};
pub use command::{COM_CHANGE_USER, COM_QUIT, COM_RESET_CONNECTION, ChangeUser, Command};
pub use err::{ErrPacket, err_packet, error_for, refusal, refusal_at};
pub use handshake::{
    ClientFirst, Greeting, HandshakeResponse, Missing, Negotiated, SSL_REQUEST_LEN, SslRequest,
};
pub use kill::{COM_PROCESS_KILL, COM_QUERY, KILL_LIMIT, Kill, unknown_thread};
pub use packet::{HANDSHAKE_LIMIT, MAX_PAYLOAD, Packet, PacketReader, encode};
pub use watch::{CommandWatch, Scan};

/// Set by MySQL servers and clients; MariaDB clears it to say its extended capabilities follow
/// in the reserved bytes (historically `CLIENT_LONG_PASSWORD`).
pub const CLIENT_MYSQL: u32 = 0x1;
/// The handshake response names an initial database.
pub const CLIENT_CONNECT_WITH_DB: u32 = 0x8;
/// zlib-compressed packets after the handshake.
pub const CLIENT_COMPRESS: u32 = 0x20;
/// The 4.1 protocol, which everything here requires.
pub const CLIENT_PROTOCOL_41: u32 = 0x200;
/// TLS: the server offers it, or the client asks for it with an SSLRequest.
pub const CLIENT_SSL: u32 = 0x800;
/// The auth response has a length prefix instead of a NUL.
pub const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
/// Authentication plugins are named in the handshake.
pub const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
/// The handshake response carries connection attributes.
pub const CLIENT_CONNECT_ATTRS: u32 = 0x10_0000;
/// The auth response has a length-encoded length (it may exceed 255 bytes).
pub const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 0x20_0000;
/// The client can handle an expired password (the server lets it log in to change it).
pub const CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS: u32 = 0x40_0000;
/// OK packets carry session state changes.
pub const CLIENT_SESSION_TRACK: u32 = 0x80_0000;
/// OK packets replace EOF packets in result sets.
pub const CLIENT_DEPRECATE_EOF: u32 = 0x100_0000;
/// zstd-compressed packets after the handshake.
pub const CLIENT_ZSTD: u32 = 0x400_0000;
/// The client verifies the server's certificate (meaningful to the client alone).
pub const CLIENT_SSL_VERIFY_SERVER_CERT: u32 = 0x4000_0000;
/// The client keeps its options after a failed connect (meaningful to the client alone).
pub const CLIENT_REMEMBER_OPTIONS: u32 = 0x8000_0000;

/// What can go wrong reading or relaying the MySQL connection phase.
#[derive(Debug, thiserror::Error)]
pub enum MysqlError {
    /// The peer sent more than the reader's budget allows.
    #[error("mysql packets exceed the limit of {limit} bytes")]
    TooLarge {
        /// The reader's budget.
        limit: usize,
    },
    /// A packet carried a sequence id other than the one due.
    #[error("mysql packet out of order: expected sequence id {expected}, got {got}")]
    Sequence {
        /// The sequence id due.
        expected: u8,
        /// The sequence id received.
        got: u8,
    },
    /// A payload ended before a field it must contain.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A payload is not what its place in the exchange requires.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// The message being read.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The server greeting has a protocol version other than 10.
    #[error("unsupported mysql protocol version {0} in the server greeting")]
    ProtocolVersion(u8),
    /// A peer lacks something this side needs, such as protocol 4.1.
    #[error("unsupported peer: {0}")]
    Unsupported(&'static str),
    /// The server sent an ERR packet instead of its greeting.
    #[error("server refused the connection: {0}")]
    Refused(ErrPacket),
    /// caching_sha2_password asked for the password while the backend leg is plaintext.
    #[error("caching_sha2_password full authentication needs TLS on the backend leg")]
    FullAuthNeedsTls,
    /// A packet arrived from the side whose turn it is not (or after the exchange ended).
    #[error("unexpected packet from the {0} during authentication")]
    OutOfTurn(&'static str),
}
