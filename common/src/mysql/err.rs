//! ERR packets: the ones Postern sends to refuse a client, and reading the ones a server sends.
//!
//! A MySQL server may answer a new connection with an ERR packet instead of its greeting (this is
//! how "Too many connections" reaches clients). Postern uses the same place to say why a
//! connection was refused, so `mariadb` prints a reason instead of "Lost connection". Later in
//! the connection phase the same packet goes at the sequence id the client expects next (see
//! [`Packet::next_seq`](super::Packet::next_seq)), e.g. 2 after a plaintext handshake response.
//!
//! Payload: `0xff`, error number u16, then (protocol 4.1) `#` and a 5-byte SQLSTATE, then the
//! message to the end of the packet.

use std::fmt;

use bytes::Bytes;

use super::codec::{Reader, owned};
use crate::protocol::Code;

/// An ERR packet a server sent, for logs and for deciding what to tell a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    /// The MySQL error number.
    pub code: u16,
    /// The SQLSTATE, when the server sent one.
    pub sqlstate: Option<[u8; 5]>,
    /// The message, in the server's character set.
    pub message: Bytes,
}

impl ErrPacket {
    /// Parses an ERR payload; `None` when it is not one.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let mut r = Reader::new(payload, "error packet");
        if r.u8().ok()? != 0xff {
            return None;
        }
        let code = r.u16().ok()?;
        let rest = r.rest();
        let (sqlstate, message) = match rest.split_first() {
            Some((b'#', tail)) => match tail.split_first_chunk::<5>() {
                Some((state, message)) => (Some(*state), message),
                None => (None, rest),
            },
            _ => (None, rest),
        };
        Some(Self {
            code,
            sqlstate,
            message: owned(message),
        })
    }
}

impl fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}", self.code)?;
        if let Some(state) = &self.sqlstate {
            write!(f, " ({})", String::from_utf8_lossy(state))?;
        }
        write!(f, ": {}", String::from_utf8_lossy(&self.message))
    }
}

/// An ERR packet (sequence id `seq`) with the given error number, SQLSTATE and message.
pub fn err_packet(seq: u8, errno: u16, sqlstate: &str, message: &str) -> Vec<u8> {
    let state = sqlstate.as_bytes();
    let mut state5 = [b'H', b'Y', b'0', b'0', b'0'];
    if state.len() == 5 {
        state5.copy_from_slice(state);
    }
    // The message is capped so the packet always fits in one MySQL packet.
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut payload = Vec::with_capacity(9 + msg.len());
    payload.push(0xff);
    payload.extend_from_slice(&errno.to_le_bytes());
    payload.push(b'#');
    payload.extend_from_slice(&state5);
    payload.extend_from_slice(msg);
    let len = payload.len() as u32;
    let mut packet = Vec::with_capacity(4 + payload.len());
    packet.extend_from_slice(&len.to_le_bytes()[..3]);
    packet.push(seq);
    packet.extend_from_slice(&payload);
    packet
}

/// The MySQL error number and SQLSTATE a client sees for a Postern refusal code.
///
/// Only server error numbers (1000 to 1999) are used: current MariaDB clients (Connector/C 3.3
/// and the `mariadb` tools built on it) reject an ERR packet from a server that carries a client
/// error number such as 2003 as "malformed packet", hiding the message. Unavailability maps to
/// 1053 with SQLSTATE 08S01 (a communication failure), which drivers and pools treat as a
/// transient connection failure worth retrying; authorisation to 1045 (access denied); limits
/// to 1040 (too many connections).
pub fn error_for(code: Code) -> (u16, &'static str) {
    match code {
        Code::NotAuthorized => (1045, "28000"),
        Code::TooManyConnections => (1040, "08004"),
        Code::UnknownService => (1049, "42000"),
        Code::NoAgent | Code::BackendUnavailable | Code::ShuttingDown => (1053, "08S01"),
        Code::UnsupportedVersion | Code::BadRequest | Code::AdminFailed | Code::Unknown => {
            (1105, "HY000")
        }
    }
}

/// An ERR packet for a Postern refusal, sequence id 0 (before any greeting).
pub fn refusal(code: Code, message: &str) -> Vec<u8> {
    refusal_at(0, code, message)
}

/// An ERR packet for a Postern refusal at sequence id `seq`, for refusals after the greeting.
pub fn refusal_at(seq: u8, code: Code, message: &str) -> Vec<u8> {
    let (errno, state) = error_for(code);
    err_packet(seq, errno, state, &format!("postern: {message} [{code}]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_packet_layout() {
        let p = err_packet(0, 2003, "HY000", "down");
        assert_eq!(&p[..4], &[13, 0, 0, 0]);
        assert_eq!(p[4], 0xff);
        assert_eq!(u16::from_le_bytes([p[5], p[6]]), 2003);
        assert_eq!(&p[7..13], b"#HY000");
        assert_eq!(&p[13..], b"down");
    }

    #[test]
    fn err_packets_parse_with_and_without_sqlstate() {
        let p = err_packet(2, 1045, "28000", "no");
        let e = ErrPacket::parse(&p[4..]).unwrap();
        assert_eq!(e.code, 1045);
        assert_eq!(e.sqlstate, Some(*b"28000"));
        assert_eq!(&e.message[..], b"no");
        assert_eq!(e.to_string(), "error 1045 (28000): no");

        // Pre-4.1 shape, as some servers send before they know the client's capabilities.
        let e = ErrPacket::parse(b"\xff\x10\x04Too many connections").unwrap();
        assert_eq!(e.code, 1040);
        assert_eq!(e.sqlstate, None);
        assert_eq!(&e.message[..], b"Too many connections");

        assert_eq!(ErrPacket::parse(b"\x00\x00"), None);
        assert_eq!(ErrPacket::parse(b"\xff\x01"), None);
    }

    #[test]
    fn captured_access_denied_parses() {
        let wire = crate::mysql::vectors::hex(crate::mysql::vectors::ACCESS_DENIED);
        let e = ErrPacket::parse(&wire[4..]).unwrap();
        assert_eq!(e.code, 1045);
        assert_eq!(e.sqlstate, Some(*b"28000"));
        assert!(
            e.to_string()
                .starts_with("error 1045 (28000): Access denied for user 'root'")
        );
    }

    #[test]
    fn refusal_at_uses_the_given_sequence_id() {
        let p = refusal_at(2, Code::NotAuthorized, "tls required");
        assert_eq!(p[3], 2);
        let e = ErrPacket::parse(&p[4..]).unwrap();
        assert_eq!(e.code, 1045);
        assert_eq!(&e.message[..], b"postern: tls required [not_authorized]");
    }
}
