//! The small part of the MySQL protocol that refusals need: an ERR packet a stock client shows.
//!
//! A MySQL server may answer a new connection with an ERR packet instead of its greeting (this is
//! how "Too many connections" reaches clients). Postern uses the same place to say why a
//! connection was refused, so `mariadb` prints a reason instead of "Lost connection".

use crate::protocol::Code;

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
/// Unavailability maps to 2003 ("can't connect"), which drivers and pools already treat as a
/// transient failure worth retrying; authorisation to 1045 (access denied); limits to 1040.
pub fn error_for(code: Code) -> (u16, &'static str) {
    match code {
        Code::NotAuthorized => (1045, "28000"),
        Code::TooManyConnections => (1040, "08004"),
        Code::UnknownService => (1049, "42000"),
        Code::NoAgent | Code::BackendUnavailable | Code::ShuttingDown => (2003, "HY000"),
        Code::UnsupportedVersion | Code::BadRequest | Code::Unknown => (1105, "HY000"),
    }
}

/// An ERR packet for a Postern refusal, sequence id 0 (before any greeting).
pub fn refusal(code: Code, message: &str) -> Vec<u8> {
    let (errno, state) = error_for(code);
    err_packet(0, errno, state, &format!("postern: {message} [{code}]"))
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
}
