//! MySQL packet framing: splitting a byte stream into packets and back.
//!
//! A packet is a 3-byte little-endian payload length, a 1-byte sequence id and the payload. A
//! payload of [`MAX_PAYLOAD`] (`0xffffff`) bytes or more is sent as several packets with
//! consecutive sequence ids: every packet but the last carries exactly `0xffffff` bytes, so a
//! payload whose length is a multiple of `0xffffff` ends with an empty packet. [`PacketReader`]
//! joins such parts back into one [`Packet`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::MysqlError;

/// The largest payload one packet carries; a part this long means another part follows.
pub const MAX_PAYLOAD: usize = 0xff_ffff;

/// The default budget of a [`PacketReader`] for the connection phase, in bytes on the wire.
///
/// Greetings, SSL requests, handshake responses and authentication rounds are a few hundred
/// bytes each; 64 KiB leaves room for large connection attributes and Kerberos tokens while a
/// peer that keeps talking cannot make a connection hold more.
pub const HANDSHAKE_LIMIT: usize = 64 * 1024;

/// One logical packet: continuation parts already joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The sequence id of the first part.
    pub seq: u8,
    /// The payload, all parts joined.
    pub payload: Bytes,
}

impl Packet {
    /// The sequence id of the packet that follows this one (in either direction).
    ///
    /// A payload split into several parts uses one sequence id per part.
    pub fn next_seq(&self) -> u8 {
        // Wrapping is what the protocol does: sequence ids are taken modulo 256.
        self.seq.wrapping_add(parts(self.payload.len()) as u8)
    }

    /// Checks that the packet carries the sequence id due at this point of the exchange.
    pub fn expect_seq(&self, expected: u8) -> Result<(), MysqlError> {
        if self.seq == expected {
            Ok(())
        } else {
            Err(MysqlError::Sequence {
                expected,
                got: self.seq,
            })
        }
    }

    /// The packet as bytes on the wire, with sequence id `seq` on its first part.
    pub fn encode_with_seq(&self, seq: u8) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.payload.len() + 4 * parts(self.payload.len()));
        encode(seq, &self.payload, &mut out);
        out
    }
}

/// Appends `payload` as packets starting at sequence id `seq`; returns the next sequence id.
pub fn encode(seq: u8, payload: &[u8], out: &mut BytesMut) -> u8 {
    out.reserve(payload.len() + 4 * parts(payload.len()));
    let mut seq = seq;
    let mut rest = payload;
    loop {
        let (part, tail) = rest.split_at(rest.len().min(MAX_PAYLOAD));
        // A part is at most MAX_PAYLOAD long, so its length fits in 3 bytes.
        out.put_slice(&(part.len() as u32).to_le_bytes()[..3]);
        out.put_u8(seq);
        out.put_slice(part);
        seq = seq.wrapping_add(1);
        rest = tail;
        if part.len() < MAX_PAYLOAD {
            return seq;
        }
    }
}

/// Takes whole packets off the front of a buffer, with a budget for everything it decodes.
///
/// The budget counts every byte of every packet this reader has returned or is waiting for,
/// headers included. A length prefix that would take it over the budget is an error as soon as
/// the 4-byte header arrives, so a peer cannot make the caller buffer more than the budget plus
/// one read. Bytes after the last complete packet stay in the buffer: during the connection
/// phase they may be a TLS ClientHello or the first command, which belong to someone else.
#[derive(Debug, Clone)]
pub struct PacketReader {
    limit: usize,
    used: usize,
}

impl Default for PacketReader {
    fn default() -> Self {
        Self::new(HANDSHAKE_LIMIT)
    }
}

impl PacketReader {
    /// A reader that decodes at most `limit` bytes in total.
    pub fn new(limit: usize) -> Self {
        Self { limit, used: 0 }
    }

    /// How many bytes this reader may still decode.
    pub fn remaining(&self) -> usize {
        self.limit.saturating_sub(self.used)
    }

    /// Takes one packet off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a packet (nothing is consumed then).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, MysqlError> {
        let Some((len, parts)) = self.complete(buf)? else {
            return Ok(None);
        };
        let mut wire = buf.split_to(len);
        self.used = self.used.saturating_add(len);
        let seq = header(&wire).map_or(0, |(_, seq)| seq);
        if parts == 1 {
            // The payload is the rest of the bytes, without copying.
            wire.advance(4.min(wire.len()));
            return Ok(Some(Packet {
                seq,
                payload: wire.freeze(),
            }));
        }
        let mut payload = BytesMut::with_capacity(len);
        while let Some((part, _)) = header(&wire) {
            wire.advance(4);
            let part = part.min(wire.len());
            payload.put_slice(&wire.split_to(part));
        }
        Ok(Some(Packet {
            seq,
            payload: payload.freeze(),
        }))
    }

    /// The wire length and the number of parts of the packet at the front of `buf`, once all
    /// its parts are there.
    fn complete(&self, buf: &[u8]) -> Result<Option<(usize, usize)>, MysqlError> {
        let mut at = 0usize;
        let mut parts = 0usize;
        let mut expected_seq: Option<u8> = None;
        loop {
            let Some((part, seq)) = buf.get(at..).and_then(header) else {
                return Ok(None);
            };
            if let Some(expected) = expected_seq
                && seq != expected
            {
                return Err(MysqlError::Sequence { expected, got: seq });
            }
            expected_seq = Some(seq.wrapping_add(1));
            let end = at.saturating_add(4).saturating_add(part);
            if self.used.saturating_add(end) > self.limit {
                return Err(MysqlError::TooLarge { limit: self.limit });
            }
            if buf.len() < end {
                return Ok(None);
            }
            at = end;
            parts += 1;
            if part < MAX_PAYLOAD {
                return Ok(Some((at, parts)));
            }
        }
    }
}

/// The payload length and sequence id in the header at the front of `buf`.
fn header(buf: &[u8]) -> Option<(usize, u8)> {
    let &[a, b, c, seq] = buf.first_chunk::<4>()?;
    Some((u32::from_le_bytes([a, b, c, 0]) as usize, seq))
}

/// How many parts a payload of `len` bytes is sent in.
fn parts(len: usize) -> usize {
    len / MAX_PAYLOAD + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::vectors;
    use proptest::prelude::*;

    fn decode_all(reader: &mut PacketReader, buf: &mut BytesMut) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Some(p) = reader.decode(buf).unwrap() {
            out.push(p);
        }
        out
    }

    /// Feeds `stream` in pieces of the given sizes (cycled) and collects every packet.
    fn feed_in_chunks(stream: &[u8], sizes: &[usize], limit: usize) -> Vec<Packet> {
        let mut reader = PacketReader::new(limit);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = stream;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            i += 1;
            buf.put_slice(&rest[..n]);
            rest = &rest[n..];
            out.extend(decode_all(&mut reader, &mut buf));
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn captured_greeting_decodes_byte_by_byte() {
        let wire = vectors::hex(vectors::GREETING);
        let packets = feed_in_chunks(&wire, &[1], HANDSHAKE_LIMIT);
        assert_eq!(packets.len(), 1);
        assert_eq!(packets[0].seq, 0);
        assert_eq!(packets[0].payload.len(), 100);
        assert_eq!(packets[0].encode_with_seq(0), wire[..]);
    }

    #[test]
    fn captured_exchange_decodes_byte_by_byte() {
        let stream: Vec<u8> = vectors::EXCHANGE
            .iter()
            .flat_map(|h| vectors::hex(h))
            .collect();
        let got = feed_in_chunks(&stream, &[1], HANDSHAKE_LIMIT);
        assert_eq!(
            got.iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![0, 1, 1, 2, 3, 4]
        );
    }

    #[test]
    fn coalesced_packets_decode_in_order_and_leave_the_rest() {
        let mut buf = BytesMut::new();
        for p in [
            vectors::AUTH_SWITCH,
            vectors::EMPTY_REPLY,
            vectors::OK_WITH_DB,
        ] {
            buf.put_slice(&vectors::hex(p));
        }
        // The start of a TLS ClientHello after the packets stays for its owner.
        buf.put_slice(&[0x16, 0x03, 0x01]);
        let mut reader = PacketReader::default();
        let got = decode_all(&mut reader, &mut buf);
        assert_eq!(got.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(got[1].payload.is_empty());
        assert_eq!(&buf[..], &[0x16, 0x03, 0x01]);
    }

    #[test]
    fn empty_payload_is_one_header() {
        let mut out = BytesMut::new();
        assert_eq!(encode(7, &[], &mut out), 8);
        assert_eq!(&out[..], &[0, 0, 0, 7]);
    }

    #[test]
    fn sixteen_mib_and_more_survives_random_chunking() {
        let len = MAX_PAYLOAD + 5;
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut wire = BytesMut::new();
        assert_eq!(encode(250, &payload, &mut wire), 252);
        assert_eq!(wire.len(), len + 8);
        assert_eq!(&wire[..4], &[0xff, 0xff, 0xff, 250]);
        assert_eq!(&wire[MAX_PAYLOAD + 4..MAX_PAYLOAD + 8], &[5, 0, 0, 251]);
        // A second small packet right behind it, in the same stream.
        encode(252, b"next", &mut wire);

        // Chunk sizes from a fixed linear congruential sequence: random-looking, reproducible.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let sizes: Vec<usize> = (0..97)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                1 + (x >> 33) as usize % 300_000
            })
            .collect();
        let got = feed_in_chunks(&wire, &sizes, 2 * len);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].seq, 250);
        assert_eq!(got[0].next_seq(), 252);
        assert!(got[0].payload[..] == payload[..]);
        assert_eq!(got[1].seq, 252);
        assert_eq!(&got[1].payload[..], b"next");
        assert!(got[0].encode_with_seq(250)[..] == wire[..len + 8]);
    }

    #[test]
    fn payload_of_exactly_max_ends_with_an_empty_part() {
        let payload = vec![0xabu8; MAX_PAYLOAD];
        let mut wire = BytesMut::new();
        assert_eq!(encode(255, &payload, &mut wire), 1);
        assert_eq!(wire.len(), MAX_PAYLOAD + 8);
        assert_eq!(&wire[MAX_PAYLOAD + 4..], &[0, 0, 0, 0]);
        let mut reader = PacketReader::new(usize::MAX);
        let p = reader.decode(&mut wire).unwrap().unwrap();
        assert_eq!(p.payload.len(), MAX_PAYLOAD);
        assert_eq!(p.next_seq(), 1);
        assert!(wire.is_empty());
    }

    #[test]
    fn over_budget_is_refused_when_the_header_arrives() {
        let mut reader = PacketReader::new(HANDSHAKE_LIMIT);
        // Only the header of a 16 MiB packet: refused without waiting for the body.
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(
            reader.decode(&mut buf),
            Err(MysqlError::TooLarge {
                limit: HANDSHAKE_LIMIT
            })
        ));
        // The budget spans packets: many small ones cannot add up to more.
        let mut reader = PacketReader::new(100);
        let mut buf = BytesMut::new();
        for seq in 0..3 {
            encode(seq, &[0u8; 40], &mut buf);
        }
        assert!(reader.decode(&mut buf).unwrap().is_some());
        assert!(reader.decode(&mut buf).unwrap().is_some());
        assert_eq!(reader.remaining(), 12);
        assert!(reader.decode(&mut buf).is_err());
    }

    #[test]
    fn continuation_with_a_wrong_sequence_id_is_an_error() {
        let mut buf = BytesMut::new();
        buf.put_slice(&[0xff, 0xff, 0xff, 3]);
        buf.put_slice(&vec![0u8; MAX_PAYLOAD]);
        buf.put_slice(&[1, 0, 0, 9, 0]);
        let mut reader = PacketReader::new(usize::MAX);
        assert!(matches!(
            reader.decode(&mut buf),
            Err(MysqlError::Sequence {
                expected: 4,
                got: 9
            })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512),
                                       limit in 0usize..1024) {
            let mut reader = PacketReader::new(limit);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = reader.decode(&mut buf) {}
        }

        #[test]
        fn captured_exchange_survives_any_chunking(sizes in proptest::collection::vec(1usize..64, 1..20)) {
            let stream: Vec<u8> = vectors::EXCHANGE.iter().flat_map(|h| vectors::hex(h)).collect();
            let got = feed_in_chunks(&stream, &sizes, HANDSHAKE_LIMIT);
            prop_assert_eq!(got.len(), 6);
            let mut again = BytesMut::new();
            for p in &got {
                encode(p.seq, &p.payload, &mut again);
            }
            prop_assert_eq!(&again[..], &stream[..]);
        }

        #[test]
        fn encode_decode_roundtrip(payload in proptest::collection::vec(any::<u8>(), 0..2048),
                                   seq in any::<u8>()) {
            let mut wire = BytesMut::new();
            let next = encode(seq, &payload, &mut wire);
            let p = PacketReader::default().decode(&mut wire).unwrap().unwrap();
            prop_assert_eq!(p.seq, seq);
            prop_assert_eq!(p.next_seq(), next);
            prop_assert_eq!(&p.payload[..], &payload[..]);
            prop_assert!(wire.is_empty());
        }
    }
}
