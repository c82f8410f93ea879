//! Watching the commands a logged-in client sends, without holding up its bytes.
//!
//! [`CommandWatch`] walks the client-to-server byte stream of the command phase packet by packet.
//! Bytes may pass as soon as the packet they belong to is known not to be a command a policy must
//! judge. A `COM_CHANGE_USER` is held back until it is complete, so its user name can be checked
//! before the server sees it; so are, when asked for, the commands that name a connection by id
//! (`COM_PROCESS_KILL`, and a short `COM_QUERY` whose text starts with `KILL`), so the id can be
//! rewritten. Everything else (16 MiB packet parts, `LOAD DATA LOCAL` file contents,
//! prepared-statement data, any other query) streams through without being buffered: for a
//! query, the watch looks at the first bytes of its text and no further.
//!
//! # Which packets start a command
//!
//! The server reads a command only from a packet with sequence id 0 (it drops a connection whose
//! command arrives with another id), and a packet that continues a payload of 16 MiB or more is
//! never a new command. So every packet the server takes as a command is one this watch also
//! takes as a command: nothing can slip past. The reverse is not quite true: a client that sends
//! more than 255 packets within one command (the file of a large `LOAD DATA LOCAL`) wraps its
//! sequence id back to 0. A packet with sequence id 0 that follows a non-empty packet with id
//! 255 therefore continues the exchange instead of starting a command (the file ends with an
//! empty packet, after which the server expects a command again).

use bytes::Bytes;

use super::MysqlError;
use super::command::{COM_CHANGE_USER, Command};
use super::kill::{self, COM_PROCESS_KILL, COM_QUERY, KILL_LIMIT, Prefix};
use super::packet::{HANDSHAKE_LIMIT, MAX_PAYLOAD, Packet};

/// What may happen to the bytes at the front of the client's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// The first `n` bytes (at least one) may go to the server.
    Pass(usize),
    /// Nothing more can pass until more bytes arrive.
    NeedMore,
    /// The first `len` bytes are one whole command packet that a policy must judge first:
    /// pass them, replace them, or refuse the command. Only `COM_CHANGE_USER` and (with
    /// [`CommandWatch::watching_kills`]) possible `KILL`s are held like this.
    Judge {
        /// The command.
        command: Command,
        /// Its length on the wire, header included.
        len: usize,
    },
}

/// Tracks packet boundaries in a client's command-phase byte stream.
///
/// Feed it the bytes that have not passed yet, front first: after [`Scan::Pass`] or
/// [`Scan::Judge`], the caller removes those bytes from its buffer before scanning again (the
/// watch has already moved past them).
#[derive(Debug, Clone)]
pub struct CommandWatch {
    /// Bytes of the current packet (header included) that have yet to pass.
    left: usize,
    /// The last packet part was [`MAX_PAYLOAD`] long: the next one continues it.
    continuation: bool,
    /// The last packet was non-empty with sequence id 255: a following id 0 is a wrap.
    wrapped: bool,
    /// The largest command this watch holds back to judge.
    limit: usize,
    /// Whether commands that name a connection by id are held back too.
    kills: bool,
}

impl Default for CommandWatch {
    fn default() -> Self {
        Self::new(HANDSHAKE_LIMIT)
    }
}

impl CommandWatch {
    /// A watch that refuses to hold back a command longer than `limit` bytes on the wire.
    ///
    /// A real `COM_CHANGE_USER` is a few hundred bytes; a longer one is an error (and should be
    /// refused), so a client cannot make the watcher buffer much.
    pub fn new(limit: usize) -> Self {
        Self {
            left: 0,
            continuation: false,
            wrapped: false,
            limit,
            kills: false,
        }
    }

    /// Also holds back `COM_PROCESS_KILL` and `COM_QUERY` packets of up to [`KILL_LIMIT`] bytes
    /// whose text starts with `KILL`, for a front end that hands out connection ids of its own.
    pub fn watching_kills(mut self) -> Self {
        self.kills = true;
        self
    }

    /// Looks at `buf`, the bytes that have not passed yet, and says what may happen to them.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Scan, MysqlError> {
        if self.left > 0 {
            if buf.is_empty() {
                return Ok(Scan::NeedMore);
            }
            let n = self.left.min(buf.len());
            self.left -= n;
            return Ok(Scan::Pass(n));
        }
        let Some(&[a, b, c, seq]) = buf.first_chunk::<4>() else {
            return Ok(Scan::NeedMore);
        };
        let len = u32::from_le_bytes([a, b, c, 0]) as usize;
        let wire = len + 4;
        let starts_command = seq == 0 && !self.continuation && !self.wrapped;
        if starts_command && len > 0 {
            let Some(&first) = buf.get(4) else {
                return Ok(Scan::NeedMore);
            };
            let hold = match first {
                COM_CHANGE_USER => {
                    if len >= MAX_PAYLOAD || wire > self.limit {
                        return Err(MysqlError::TooLarge { limit: self.limit });
                    }
                    true
                }
                COM_PROCESS_KILL => self.kills && len == 5,
                COM_QUERY if self.kills && len <= KILL_LIMIT => {
                    let text = buf.get(5..wire.min(buf.len())).unwrap_or_default();
                    match kill::prefix(text, buf.len() >= wire) {
                        Prefix::Kill => true,
                        Prefix::Other => false,
                        Prefix::Unknown => return Ok(Scan::NeedMore),
                    }
                }
                _ => false,
            };
            if hold {
                let Some(whole) = buf.get(..wire) else {
                    return Ok(Scan::NeedMore);
                };
                let packet = Packet {
                    seq,
                    payload: Bytes::copy_from_slice(&whole[4..]),
                };
                let command = Command::parse(&packet)?.ok_or(MysqlError::Malformed {
                    what: "command",
                    why: "not a command",
                })?;
                self.after(seq, len);
                return Ok(Scan::Judge { command, len: wire });
            }
        }
        self.after(seq, len);
        let n = wire.min(buf.len());
        self.left = wire - n;
        Ok(Scan::Pass(n))
    }

    /// Records that a packet part with `seq` and payload length `len` starts here.
    fn after(&mut self, seq: u8, len: usize) {
        let continued = self.continuation;
        self.continuation = len == MAX_PAYLOAD;
        // The last part of a packet decides; an empty part that ends a long payload still ends
        // a non-empty packet.
        self.wrapped = seq == 255 && (len > 0 || continued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::{COM_PROCESS_KILL, KILL_LIMIT, encode};
    use bytes::{Buf, BytesMut};
    use proptest::prelude::*;

    /// Feeds `wire` in chunks of `sizes` (cycled) and returns what passed and what was judged.
    fn run(wire: &[u8], sizes: &[usize]) -> (Vec<u8>, Vec<Command>) {
        run_with(CommandWatch::default(), wire, sizes)
    }

    fn run_with(mut watch: CommandWatch, wire: &[u8], sizes: &[usize]) -> (Vec<u8>, Vec<Command>) {
        let mut pending = BytesMut::new();
        let mut passed = Vec::new();
        let mut judged = Vec::new();
        let mut at = 0;
        let mut i = 0;
        loop {
            match watch.scan(&pending).unwrap() {
                Scan::Pass(n) => {
                    assert!(n >= 1 && n <= pending.len());
                    passed.extend_from_slice(&pending[..n]);
                    pending.advance(n);
                }
                Scan::Judge { command, len } => {
                    passed.extend_from_slice(&pending[..len]);
                    pending.advance(len);
                    judged.push(command);
                }
                Scan::NeedMore => {
                    if at == wire.len() {
                        return (passed, judged);
                    }
                    let n = sizes[i % sizes.len()].min(wire.len() - at);
                    i += 1;
                    pending.extend_from_slice(&wire[at..at + n]);
                    at += n;
                }
            }
        }
    }

    fn change_user(user: &[u8]) -> Vec<u8> {
        let mut p = vec![COM_CHANGE_USER];
        p.extend_from_slice(user);
        p.extend_from_slice(b"\0\x14");
        p.extend_from_slice(&[0x11; 20]);
        p.extend_from_slice(b"\0");
        p
    }

    fn stream() -> Vec<u8> {
        let mut wire = BytesMut::new();
        encode(0, b"\x03SELECT 1", &mut wire);
        // A change of user, with an auth switch answer after it.
        encode(0, &change_user(b"bob"), &mut wire);
        encode(2, &[0x22; 20], &mut wire);
        // A 16 MiB+ query whose second part starts with the change-user byte.
        let mut big = vec![0x03];
        big.resize(MAX_PAYLOAD, b'x');
        big.extend_from_slice(&[COM_CHANGE_USER, 0, 0]);
        encode(0, &big, &mut wire);
        encode(0, &[crate::mysql::COM_QUIT], &mut wire);
        wire.to_vec()
    }

    #[test]
    fn only_change_user_is_judged_whatever_the_chunking() {
        let wire = stream();
        for sizes in [&[1][..], &[3, 7, 1], &[4096], &[wire.len()]] {
            let (passed, judged) = run(&wire, sizes);
            assert!(passed == wire, "every byte passes unchanged, in order");
            assert_eq!(
                judged,
                vec![Command::ChangeUser {
                    username: Bytes::from_static(b"bob")
                }]
            );
        }
    }

    #[test]
    fn kills_are_held_only_when_asked_for_whatever_the_chunking() {
        let mut wire = BytesMut::new();
        encode(0, b"\x03SELECT 1", &mut wire);
        encode(0, b"\x03  /* cancel */ KILL QUERY 3000000001", &mut wire);
        encode(0, b"\x03KILLER", &mut wire);
        encode(0, &[COM_PROCESS_KILL, 1, 0, 0, 0], &mut wire);
        // A statement that starts like a kill but is too long to be one is not held.
        let mut long = b"\x03KILL ".to_vec();
        long.resize(KILL_LIMIT + 10, b' ');
        encode(0, &long, &mut wire);
        // A kill statement without a plain id is judged as an ordinary query.
        encode(0, b"\x03KILL USER app", &mut wire);
        for sizes in [&[1][..], &[3, 7, 1], &[4096]] {
            let (passed, judged) = run_with(CommandWatch::default().watching_kills(), &wire, sizes);
            assert!(passed == wire[..], "every byte passes unchanged, in order");
            let ids: Vec<Option<u64>> = judged
                .iter()
                .map(|c| match c {
                    Command::Kill(k) => Some(k.id),
                    _ => None,
                })
                .collect();
            assert_eq!(ids, vec![Some(3_000_000_001), Some(1), None], "{sizes:?}");
            let (_, judged) = run(&wire, sizes);
            assert!(judged.is_empty());
        }
    }

    #[test]
    fn a_change_user_byte_in_a_continuing_packet_is_data() {
        let mut wire = BytesMut::new();
        // A long payload whose second part has sequence id 0 and starts like a change of user.
        let mut big = vec![0x03; MAX_PAYLOAD];
        big.extend_from_slice(&change_user(b"eve"));
        encode(255, &big, &mut wire);
        // A payload of exactly 16 MiB: its last part is empty.
        encode(0, &vec![0x03; MAX_PAYLOAD], &mut wire);
        encode(0, &change_user(b"eve"), &mut wire);
        let (passed, judged) = run(&wire, &[65536]);
        assert!(passed == wire[..]);
        assert_eq!(judged.len(), 1, "only the command after the long payloads");
    }

    #[test]
    fn wrapped_sequence_ids_continue_the_exchange() {
        // LOAD DATA LOCAL: the query, then file packets 2..=255, 0, 1, then the empty end.
        let mut wire = BytesMut::new();
        encode(0, b"\x03LOAD DATA LOCAL INFILE 'f' INTO TABLE t", &mut wire);
        let mut seq = 2u8;
        for _ in 0..256 {
            encode(seq, &change_user(b"not-a-command"), &mut wire);
            seq = seq.wrapping_add(1);
        }
        encode(seq, &[], &mut wire);
        encode(0, &change_user(b"eve"), &mut wire);
        let (passed, judged) = run(&wire, &[1000]);
        assert!(passed == wire[..]);
        assert_eq!(
            judged,
            vec![Command::ChangeUser {
                username: Bytes::from_static(b"eve")
            }]
        );
    }

    #[test]
    fn an_empty_packet_at_255_ends_the_exchange() {
        let mut wire = BytesMut::new();
        encode(255, &[], &mut wire);
        encode(0, &change_user(b"eve"), &mut wire);
        let (_, judged) = run(&wire, &[1]);
        assert_eq!(judged.len(), 1);
    }

    #[test]
    fn oversized_or_unreadable_change_user_is_an_error() {
        let mut watch = CommandWatch::new(100);
        let mut wire = BytesMut::new();
        encode(0, &change_user(&[b'a'; 200]), &mut wire);
        assert!(matches!(
            watch.scan(&wire),
            Err(MysqlError::TooLarge { limit: 100 })
        ));
        // Refused as soon as the header and command byte are there.
        assert!(CommandWatch::new(100).scan(&wire[..5]).is_err());
        let mut wire = BytesMut::new();
        encode(0, b"\x11no terminator", &mut wire);
        assert!(CommandWatch::default().scan(&wire).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_pass_in_order(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            size in 1usize..50,
        ) {
            let mut watch = CommandWatch::new(256);
            let mut pending = BytesMut::new();
            let mut passed = 0usize;
            let mut fed = 0usize;
            loop {
                match watch.scan(&pending) {
                    Err(_) => break,
                    Ok(Scan::Pass(n)) => {
                        prop_assert!(n >= 1 && n <= pending.len());
                        pending.advance(n);
                        passed += n;
                    }
                    Ok(Scan::Judge { len, .. }) => {
                        prop_assert!(len <= pending.len());
                        pending.advance(len);
                        passed += len;
                    }
                    Ok(Scan::NeedMore) => {
                        if fed == data.len() { break; }
                        let n = size.min(data.len() - fed);
                        pending.extend_from_slice(&data[fed..fed + n]);
                        fed += n;
                    }
                }
            }
            prop_assert!(passed <= data.len());
        }
    }
}
