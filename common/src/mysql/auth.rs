//! Relaying the authentication exchange that follows the handshake response.
//!
//! The client leg and the backend leg may number their packets differently: a client that did
//! SSLRequest + TLS with this side sends its handshake response at sequence id 2, while a
//! plaintext backend leg expects it at 1. The difference (the offset) stays the same for the
//! rest of the connection phase, so every packet is renumbered by it: backend to client
//! `seq + offset`, client to backend `seq - offset`, modulo 256.
//!
//! The server decides how many rounds there are, so the relay has to know whose turn it is and
//! must never wait for the client while the server is about to speak:
//!
//! | from the backend                          | next turn  |
//! | ----------------------------------------- | ---------- |
//! | `0x00` OK                                 | done       |
//! | `0xff` ERR                                | done       |
//! | `0xfe` AuthSwitchRequest (plugin, data)   | client     |
//! | `01 03` under caching_sha2 (fast auth ok) | backend (an OK follows, nothing from the client) |
//! | `01 04` under caching_sha2 (full auth)    | client, or an error if the client sends its password in the clear to a plaintext backend |
//! | anything else (AuthMoreData, plugin data) | client     |
//!
//! Every client packet hands the turn back to the backend. Once done, the connection is in the
//! command phase, where every command starts again at sequence id 0 and bytes pass unchanged.

use bytes::{Bytes, BytesMut};

use super::codec::{Reader, owned};
use super::handshake::HandshakeResponse;
use super::packet::{Packet, encode};
use super::{CLIENT_SSL, MysqlError};

/// The name of MySQL's default authentication plugin since 8.0.
pub const CACHING_SHA2_PASSWORD: &[u8] = b"caching_sha2_password";

/// How the two legs of a connection were set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Legs {
    /// The client sent an SSLRequest and did TLS with this side.
    pub client_tls: bool,
    /// This side sent an SSLRequest to the backend and does TLS with it (mirrored TLS), so the
    /// backend considers the link secure.
    pub backend_tls: bool,
}

impl Legs {
    /// What is added to a backend sequence id to get the client's: one per SSLRequest that only
    /// one of the legs carried.
    pub fn offset(self) -> u8 {
        u8::from(self.client_tls).wrapping_sub(u8::from(self.backend_tls))
    }
}

/// Whose packet the connection phase waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The backend speaks next.
    Backend,
    /// The client speaks next.
    Client,
    /// The connection phase is over: bytes can now pass unchanged in both directions.
    Done(AuthOutcome),
}

/// How the connection phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The backend sent OK: the client is logged in.
    Accepted,
    /// The backend sent ERR: the backend closes the connection.
    Denied,
}

/// Relays the authentication exchange between a client leg and a backend leg.
#[derive(Debug, Clone)]
pub struct AuthRelay {
    legs: Legs,
    /// The sequence id of the next packet, in backend-leg numbering.
    next: u8,
    turn: Turn,
    plugin: Bytes,
}

impl AuthRelay {
    /// Starts after the client's handshake `response`, which arrived at sequence id
    /// `response_seq` on the client leg.
    ///
    /// Returns the relay and the response as bytes for the backend: CLIENT_SSL set or cleared
    /// to match the backend leg and the sequence id shifted. Any other change (a connection
    /// attribute) belongs in `response` before this call.
    pub fn start(legs: Legs, response_seq: u8, response: &HandshakeResponse) -> (Self, BytesMut) {
        let mut response = response.clone();
        if legs.backend_tls {
            response.capabilities |= CLIENT_SSL;
        } else {
            response.capabilities &= !CLIENT_SSL;
        }
        let mut out = BytesMut::new();
        let next = encode(
            response_seq.wrapping_sub(legs.offset()),
            &response.encode(),
            &mut out,
        );
        let relay = Self {
            legs,
            next,
            turn: Turn::Backend,
            plugin: response.auth_plugin.unwrap_or_default(),
        };
        (relay, out)
    }

    /// Whose packet to read next.
    pub fn turn(&self) -> Turn {
        self.turn
    }

    /// The authentication plugin in use (the client's, or the last one the server switched to).
    pub fn plugin(&self) -> &[u8] {
        &self.plugin
    }

    /// The sequence id the client expects on the next packet it receives: where an ERR goes if
    /// this side ends the exchange itself.
    pub fn client_seq(&self) -> u8 {
        self.next.wrapping_add(self.legs.offset())
    }

    /// Takes a packet from the backend; returns it as bytes for the client.
    pub fn from_backend(&mut self, packet: &Packet) -> Result<BytesMut, MysqlError> {
        if self.turn != Turn::Backend {
            return Err(MysqlError::OutOfTurn("backend"));
        }
        self.check_seq(packet.seq)?;
        let payload = &packet.payload[..];
        let turn = match payload {
            [] => {
                return Err(MysqlError::Malformed {
                    what: "authentication packet",
                    why: "empty packet from the server",
                });
            }
            [0x00, ..] => Turn::Done(AuthOutcome::Accepted),
            [0xff, ..] => Turn::Done(AuthOutcome::Denied),
            [0xfe, rest @ ..] => {
                // AuthSwitchRequest: plugin name NUL, then the plugin's data. A bare 0xfe is the
                // pre-4.1 switch to the old password hash.
                self.plugin = owned(Reader::new(rest, "auth switch").nul_terminated_or_rest());
                Turn::Client
            }
            [0x01, 0x03] if self.plugin == CACHING_SHA2_PASSWORD => Turn::Backend,
            [0x01, 0x04] if self.plugin == CACHING_SHA2_PASSWORD => {
                // The client believes its link is secure and will send the password in the
                // clear; a server on a plaintext link refuses that, so fail here with a reason.
                if self.legs.client_tls && !self.legs.backend_tls {
                    return Err(MysqlError::FullAuthNeedsTls);
                }
                Turn::Client
            }
            _ => Turn::Client,
        };
        let out = packet.encode_with_seq(packet.seq.wrapping_add(self.legs.offset()));
        self.next = packet.next_seq();
        self.turn = turn;
        Ok(out)
    }

    /// Takes a packet from the client; returns it as bytes for the backend.
    pub fn from_client(&mut self, packet: &Packet) -> Result<BytesMut, MysqlError> {
        if self.turn != Turn::Client {
            return Err(MysqlError::OutOfTurn("client"));
        }
        let backend_seq = packet.seq.wrapping_sub(self.legs.offset());
        self.check_seq(backend_seq)?;
        let out = packet.encode_with_seq(backend_seq);
        self.next = backend_seq.wrapping_add(packet.next_seq().wrapping_sub(packet.seq));
        self.turn = Turn::Backend;
        Ok(out)
    }

    /// Checks a sequence id in backend-leg numbering, reporting it in the sender's numbering.
    fn check_seq(&self, backend_seq: u8) -> Result<(), MysqlError> {
        if backend_seq == self.next {
            return Ok(());
        }
        let shift = match self.turn {
            Turn::Client => self.legs.offset(),
            _ => 0,
        };
        Err(MysqlError::Sequence {
            expected: self.next.wrapping_add(shift),
            got: backend_seq.wrapping_add(shift),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::vectors::{self, hex, payload};
    use crate::mysql::{HANDSHAKE_LIMIT, PacketReader};
    use proptest::prelude::*;

    const PLAINTEXT_BACKEND: Legs = Legs {
        client_tls: true,
        backend_tls: false,
    };
    const MIRRORED: Legs = Legs {
        client_tls: true,
        backend_tls: true,
    };
    const NO_TLS: Legs = Legs {
        client_tls: false,
        backend_tls: false,
    };

    fn packet(seq: u8, payload: &[u8]) -> Packet {
        Packet {
            seq,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn captured(v: &str) -> Packet {
        let mut buf = BytesMut::from(&hex(v)[..]);
        PacketReader::new(HANDSHAKE_LIMIT)
            .decode(&mut buf)
            .unwrap()
            .unwrap()
    }

    fn response(v: &str) -> HandshakeResponse {
        HandshakeResponse::parse(&payload(v)).unwrap()
    }

    #[test]
    fn offsets() {
        assert_eq!(PLAINTEXT_BACKEND.offset(), 1);
        assert_eq!(MIRRORED.offset(), 0);
        assert_eq!(NO_TLS.offset(), 0);
        let backend_only = Legs {
            client_tls: false,
            backend_tls: true,
        };
        assert_eq!(backend_only.offset(), 255);
    }

    #[test]
    fn captured_auth_switch_through_a_plaintext_backend_leg() {
        // The client did TLS, so its response came at seq 2 with CLIENT_SSL set.
        let mut resp = response(vectors::RESPONSE_WITH_DB);
        resp.capabilities |= CLIENT_SSL;
        let (mut relay, to_backend) = AuthRelay::start(PLAINTEXT_BACKEND, 2, &resp);
        // The backend gets exactly what the captured client sent without TLS.
        assert_eq!(to_backend[..], hex(vectors::RESPONSE_WITH_DB)[..]);
        assert_eq!(relay.turn(), Turn::Backend);
        assert_eq!(relay.client_seq(), 3);

        let to_client = relay.from_backend(&captured(vectors::AUTH_SWITCH)).unwrap();
        assert_eq!(to_client[3], 3);
        assert_eq!(to_client[4..], hex(vectors::AUTH_SWITCH)[4..]);
        assert_eq!(relay.plugin(), b"mysql_native_password");
        assert_eq!(relay.turn(), Turn::Client);

        let to_backend = relay.from_client(&packet(4, &[])).unwrap();
        assert_eq!(to_backend[..], hex(vectors::EMPTY_REPLY)[..]);
        assert_eq!(relay.turn(), Turn::Backend);

        let to_client = relay.from_backend(&captured(vectors::OK_WITH_DB)).unwrap();
        assert_eq!(to_client[3], 5);
        assert_eq!(relay.turn(), Turn::Done(AuthOutcome::Accepted));
        assert!(relay.from_backend(&captured(vectors::OK_WITH_DB)).is_err());
        assert!(relay.from_client(&packet(6, b"x")).is_err());
    }

    #[test]
    fn mirrored_legs_pass_captured_packets_unchanged() {
        let resp = response(vectors::RESPONSE_WITH_PASSWORD);
        let mut with_ssl = hex(vectors::RESPONSE_WITH_PASSWORD);
        with_ssl[3] = 2;
        with_ssl[5] |= 0x08;
        let (mut relay, to_backend) = AuthRelay::start(MIRRORED, 2, &resp);
        assert_eq!(to_backend[..], with_ssl[..]);
        let mut denied = hex(vectors::ACCESS_DENIED);
        denied[3] = 3;
        let p = PacketReader::default()
            .decode(&mut BytesMut::from(&denied[..]))
            .unwrap()
            .unwrap();
        assert_eq!(relay.from_backend(&p).unwrap()[..], denied[..]);
        assert_eq!(relay.turn(), Turn::Done(AuthOutcome::Denied));
    }

    #[test]
    fn plaintext_everywhere_keeps_numbers() {
        let resp = response(vectors::RESPONSE_PLAIN);
        let (mut relay, to_backend) = AuthRelay::start(NO_TLS, 1, &resp);
        assert_eq!(to_backend[..], hex(vectors::RESPONSE_PLAIN)[..]);
        let ok = relay.from_backend(&captured(vectors::OK_PLAIN)).unwrap();
        assert_eq!(ok[..], hex(vectors::OK_PLAIN)[..]);
        assert_eq!(relay.turn(), Turn::Done(AuthOutcome::Accepted));
    }

    fn sha2_response() -> HandshakeResponse {
        let mut r = response(vectors::RESPONSE_WITH_PASSWORD);
        r.capabilities |= CLIENT_SSL;
        r.auth_response = Bytes::from_static(&[7; 32]);
        r.auth_plugin = Some(Bytes::from_static(CACHING_SHA2_PASSWORD));
        r
    }

    #[test]
    fn caching_sha2_fast_auth_waits_for_the_server_not_the_client() {
        let (mut relay, _) = AuthRelay::start(PLAINTEXT_BACKEND, 2, &sha2_response());
        let out = relay.from_backend(&packet(2, &[0x01, 0x03])).unwrap();
        assert_eq!(&out[..], &[2, 0, 0, 3, 0x01, 0x03]);
        assert_eq!(relay.turn(), Turn::Backend);
        // A client packet now is out of turn; the OK is what comes next.
        assert!(matches!(
            relay.clone().from_client(&packet(4, b"x")),
            Err(MysqlError::OutOfTurn("client"))
        ));
        let out = relay
            .from_backend(&packet(3, &[0, 0, 0, 2, 0, 0, 0]))
            .unwrap();
        assert_eq!(out[3], 4);
        assert_eq!(relay.turn(), Turn::Done(AuthOutcome::Accepted));
    }

    #[test]
    fn caching_sha2_full_auth_over_a_plaintext_backend_is_refused_with_a_reason() {
        let (mut relay, _) = AuthRelay::start(PLAINTEXT_BACKEND, 2, &sha2_response());
        let err = relay.from_backend(&packet(2, &[0x01, 0x04])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "caching_sha2_password full authentication needs TLS on the backend leg"
        );
        // The client would have got that packet at 3: its ERR goes there.
        assert_eq!(relay.client_seq(), 3);
    }

    #[test]
    fn caching_sha2_full_auth_over_mirrored_tls_goes_to_the_client() {
        let (mut relay, _) = AuthRelay::start(MIRRORED, 2, &sha2_response());
        relay.from_backend(&packet(3, &[0x01, 0x04])).unwrap();
        assert_eq!(relay.turn(), Turn::Client);
        let out = relay.from_client(&packet(4, b"secret\0")).unwrap();
        assert_eq!(out[3], 4);
        relay
            .from_backend(&packet(5, &[0, 0, 0, 2, 0, 0, 0]))
            .unwrap();
        assert_eq!(relay.turn(), Turn::Done(AuthOutcome::Accepted));
    }

    #[test]
    fn fast_auth_bytes_mean_nothing_under_other_plugins() {
        let (mut relay, _) = AuthRelay::start(
            PLAINTEXT_BACKEND,
            2,
            &response(vectors::RESPONSE_WITH_PASSWORD),
        );
        relay.from_backend(&packet(2, &[0x01, 0x04])).unwrap();
        assert_eq!(relay.turn(), Turn::Client);
    }

    #[test]
    fn switch_to_caching_sha2_then_fast_auth() {
        let (mut relay, _) = AuthRelay::start(
            PLAINTEXT_BACKEND,
            2,
            &response(vectors::RESPONSE_WITH_PASSWORD),
        );
        let mut switch = vec![0xfe];
        switch.extend_from_slice(CACHING_SHA2_PASSWORD);
        switch.extend_from_slice(b"\0abcdefghijklmnopqrst\0");
        relay.from_backend(&packet(2, &switch)).unwrap();
        assert_eq!(relay.plugin(), CACHING_SHA2_PASSWORD);
        relay.from_client(&packet(4, &[9; 32])).unwrap();
        relay.from_backend(&packet(4, &[0x01, 0x03])).unwrap();
        assert_eq!(relay.turn(), Turn::Backend);
    }

    #[test]
    fn wrong_sequence_ids_are_reported_in_the_senders_numbers() {
        let (mut relay, _) =
            AuthRelay::start(PLAINTEXT_BACKEND, 2, &response(vectors::RESPONSE_WITH_DB));
        assert!(matches!(
            relay.from_backend(&packet(5, &[0xfe])),
            Err(MysqlError::Sequence {
                expected: 2,
                got: 5
            })
        ));
        relay.from_backend(&packet(2, &[0xfe])).unwrap();
        assert!(matches!(
            relay.from_client(&packet(3, b"")),
            Err(MysqlError::Sequence {
                expected: 4,
                got: 3
            })
        ));
    }

    #[test]
    fn sequence_ids_wrap() {
        let (mut relay, out) =
            AuthRelay::start(PLAINTEXT_BACKEND, 0, &response(vectors::RESPONSE_PLAIN));
        assert_eq!(out[3], 255);
        relay.from_backend(&packet(0, &[0x01, 0x55])).unwrap();
        let out = relay.from_client(&packet(2, b"")).unwrap();
        assert_eq!(out[3], 1);
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(
            packets in proptest::collection::vec((any::<bool>(), any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..40)), 0..12),
            client_tls in any::<bool>(),
            backend_tls in any::<bool>(),
        ) {
            let legs = Legs { client_tls, backend_tls };
            let (mut relay, _) = AuthRelay::start(legs, 2, &sha2_response());
            for (from_backend, seq, payload) in packets {
                let p = packet(seq, &payload);
                let _ = if from_backend { relay.from_backend(&p) } else { relay.from_client(&p) };
                let _ = relay.client_seq();
            }
        }
    }
}
