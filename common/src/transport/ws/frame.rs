//! RFC 6455 framing for the data path of a WebSocket session, once the HTTP upgrade is done.
//!
//! tungstenite still does the upgrade; the frames after it are ours, because its frame reader
//! zero-fills its whole read buffer (128 KiB by default) before every read, which cost most of
//! the instructions of a small query. Here the socket is read into spare capacity that is never
//! initialised first, and data payloads go straight to the reader, unmasked on the way, without
//! waiting for a whole frame: memory stays at one read buffer whatever the peer sends.
//!
//! The wire format (RFC 6455 section 5.2), most significant bit first:
//!
//! ```text
//! byte 0: FIN (1) RSV1-3 (3, must be 0) opcode (4)
//! byte 1: MASK (1) length (7): 0-125, or 126 (a u16 follows), or 127 (a u64 follows)
//! then:   extended length (0, 2 or 8 bytes, in its shortest form), mask key (4 bytes if MASK),
//!         payload (XORed with the mask key, byte i with key[i % 4])
//! ```
//!
//! Frames from a client are masked and frames from a server are not; the other way round is an
//! error. We only speak binary messages: a text message is refused. Control frames (Close, Ping,
//! Pong) carry at most 125 bytes, are never fragmented and may come between the fragments of a
//! message. A Close carries nothing, or a two-byte code and a UTF-8 reason.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::ReadBuf;

/// The longest frame header: two bytes, an eight-byte length and a four-byte mask key.
pub(super) const MAX_HEADER: usize = 14;

/// The longest control frame payload.
const MAX_CONTROL: usize = 125;

pub(super) const CONTINUATION: u8 = 0x0;
pub(super) const TEXT: u8 = 0x1;
pub(super) const BINARY: u8 = 0x2;
pub(super) const CLOSE: u8 = 0x8;
pub(super) const PING: u8 = 0x9;
pub(super) const PONG: u8 = 0xA;

/// Which end of the WebSocket we are: a client masks what it sends, a server does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Client,
    Server,
}

/// A frame the peer sent that breaks RFC 6455 or our limits; the session ends on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A reserved bit is set, and no extension was agreed that would give it a meaning.
    #[error("frame with reserved bits set")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("frame with unknown opcode {0:#x}")]
    Opcode(u8),
    /// A client frame without a mask key.
    #[error("unmasked frame from the client")]
    Unmasked,
    /// A server frame with a mask key.
    #[error("masked frame from the server")]
    Masked,
    /// A control frame without the FIN bit.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame over 125 bytes.
    #[error("control frame of {0} bytes (at most 125)")]
    ControlTooLong(u64),
    /// A length in a longer form than it needs, or with its top bit set.
    #[error("frame length not in its shortest form")]
    Length,
    /// A frame over the frame size limit.
    #[error("frame of {size} bytes (at most {max})")]
    FrameTooLong {
        /// What the header says.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A message over the message size limit.
    #[error("message of more than {max} bytes")]
    MessageTooLong {
        /// The limit.
        max: u64,
    },
    /// A continuation frame with no message to continue.
    #[error("continuation frame outside a message")]
    Continuation,
    /// A new data message before the last fragment of the previous one.
    #[error("new message before the end of a fragmented one")]
    Interleaved,
    /// A text message: our protocol is binary.
    #[error("text message")]
    Text,
    /// A Close whose payload is one byte long.
    #[error("close frame with a one-byte payload")]
    CloseLength,
    /// A Close code that may not be sent (RFC 6455 section 7.4).
    #[error("close code {0} is not allowed")]
    CloseCode(u16),
    /// A Close reason that is not UTF-8.
    #[error("close reason is not utf-8")]
    CloseReason,
}

/// What [`Decoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Item {
    /// This many bytes of a binary message went to the reader (at least one).
    Data(usize),
    /// A Ping, with its payload to echo.
    Ping(Bytes),
    /// A Pong.
    Pong,
    /// A Close, with its code and reason if it had one; nothing is decoded after it.
    Close(Option<(u16, String)>),
}

/// What a decoder for a server's end (`server`, else a client's) makes of `bytes` delivered in
/// pieces that end at `cuts` (sorted offsets), read into a buffer of `room` bytes: what came out
/// in order (runs of binary payload merged, as `(true, bytes)`; control frames as
/// `(false, their Debug)`), and the error that ended the stream, if one did.
#[cfg(feature = "fuzzing")]
pub fn fuzz_frames(
    server: bool,
    limits: (u64, u64),
    bytes: &[u8],
    cuts: &[usize],
    room: usize,
) -> (Vec<(bool, Vec<u8>)>, Option<FrameError>) {
    let role = if server { Role::Server } else { Role::Client };
    let mut decoder = Decoder::new(role, limits.0, limits.1);
    let mut out = vec![0u8; room.max(1)];
    let mut input = BytesMut::new();
    let mut items: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut from = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let end = end.clamp(from, bytes.len());
        input.extend_from_slice(&bytes[from..end]);
        from = end;
        loop {
            let mut buf = ReadBuf::new(&mut out);
            match decoder.decode(&mut input, &mut buf) {
                Ok(None) => break,
                Ok(Some(Item::Data(n))) => {
                    assert!(n >= 1 && n == buf.filled().len(), "data of {n} bytes");
                    match items.last_mut() {
                        Some((true, run)) => run.extend_from_slice(buf.filled()),
                        _ => items.push((true, buf.filled().to_vec())),
                    }
                }
                Ok(Some(other)) => items.push((false, format!("{other:?}").into_bytes())),
                Err(e) => return (items, Some(e)),
            }
        }
    }
    (items, None)
}

/// The receiving side of a WebSocket: frames in, binary payload and control frames out.
#[derive(Debug)]
pub(super) struct Decoder {
    role: Role,
    max_frame: u64,
    max_message: u64,
    /// Bytes so far of a fragmented message whose last fragment has not come yet.
    message: Option<u64>,
    /// The data frame whose payload is being passed on.
    payload: Option<Payload>,
    closed: bool,
}

#[derive(Debug)]
struct Payload {
    left: u64,
    mask: Option<[u8; 4]>,
    /// Where in the mask key the next byte is.
    phase: usize,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Header bytes, payload not included.
    size: usize,
}

impl Decoder {
    /// A decoder for `role`'s end, refusing frames over `max_frame` bytes and messages over
    /// `max_message` bytes.
    pub(super) fn new(role: Role, max_frame: u64, max_message: u64) -> Self {
        Self {
            role,
            max_frame,
            max_message,
            message: None,
            payload: None,
            closed: false,
        }
    }

    /// Decodes from `input` (consuming what it used) until one item comes out, writing binary
    /// payload to `out`, which must have room. `None` when `input` needs more bytes first (and
    /// forever after a Close).
    pub(super) fn decode(
        &mut self,
        input: &mut BytesMut,
        out: &mut ReadBuf<'_>,
    ) -> Result<Option<Item>, FrameError> {
        loop {
            if self.closed {
                return Ok(None);
            }
            if let Some(p) = &mut self.payload {
                let n = usize::try_from(p.left)
                    .unwrap_or(usize::MAX)
                    .min(input.len())
                    .min(out.remaining());
                if n == 0 {
                    return Ok(None);
                }
                let start = out.filled().len();
                out.put_slice(&input[..n]);
                input.advance(n);
                if let Some(mask) = p.mask {
                    apply_mask(&mut out.filled_mut()[start..], mask, p.phase);
                    p.phase = (p.phase + n) % 4;
                }
                p.left -= n as u64;
                if p.left == 0 {
                    self.payload = None;
                }
                return Ok(Some(Item::Data(n)));
            }
            let Some(h) = self.header(input)? else {
                return Ok(None);
            };
            if h.opcode >= CLOSE {
                // At most 125 bytes (checked in `header`), so the length fits.
                let end = h.size + h.len as usize;
                if input.len() < end {
                    return Ok(None);
                }
                let mut payload = input[h.size..end].to_vec();
                input.advance(end);
                if let Some(mask) = h.mask {
                    apply_mask(&mut payload, mask, 0);
                }
                return match h.opcode {
                    PING => Ok(Some(Item::Ping(payload.into()))),
                    PONG => Ok(Some(Item::Pong)),
                    _ => {
                        self.closed = true;
                        close_payload(&payload).map(|c| Some(Item::Close(c)))
                    }
                };
            }
            let so_far = match (h.opcode, self.message) {
                (TEXT, None) => return Err(FrameError::Text),
                (BINARY, None) => 0,
                (CONTINUATION, Some(n)) => n,
                (CONTINUATION, None) => return Err(FrameError::Continuation),
                _ => return Err(FrameError::Interleaved),
            };
            if h.len > self.max_frame {
                return Err(FrameError::FrameTooLong {
                    size: h.len,
                    max: self.max_frame,
                });
            }
            let total = so_far + h.len;
            if total > self.max_message {
                return Err(FrameError::MessageTooLong {
                    max: self.max_message,
                });
            }
            self.message = (!h.fin).then_some(total);
            input.advance(h.size);
            if h.len > 0 {
                self.payload = Some(Payload {
                    left: h.len,
                    mask: h.mask,
                    phase: 0,
                });
            }
        }
    }

    /// Parses and checks the header at the start of `input` without consuming it; `None` if it
    /// is not all there yet.
    fn header(&self, input: &[u8]) -> Result<Option<Header>, FrameError> {
        let [b0, b1, ..] = *input else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(FrameError::Reserved);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let control = match opcode {
            CONTINUATION | TEXT | BINARY => false,
            CLOSE | PING | PONG => true,
            other => return Err(FrameError::Opcode(other)),
        };
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(FrameError::Unmasked),
            (Role::Client, true) => return Err(FrameError::Masked),
            _ => {}
        }
        let short = b1 & 0x7F;
        if control {
            if !fin {
                return Err(FrameError::FragmentedControl);
            }
            if usize::from(short) > MAX_CONTROL {
                return Err(FrameError::ControlTooLong(u64::from(short)));
            }
        }
        let extra = match short {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let size = 2 + extra + if masked { 4 } else { 0 };
        if input.len() < size {
            return Ok(None);
        }
        let len = match short {
            126 => {
                let len = u64::from(u16::from_be_bytes([input[2], input[3]]));
                if len < 126 {
                    return Err(FrameError::Length);
                }
                len
            }
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&input[2..10]);
                let len = u64::from_be_bytes(be);
                if len <= 0xFFFF || len >> 63 != 0 {
                    return Err(FrameError::Length);
                }
                len
            }
            n => u64::from(n),
        };
        let mask = masked.then(|| {
            let k = 2 + extra;
            [input[k], input[k + 1], input[k + 2], input[k + 3]]
        });
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            len,
            size,
        }))
    }
}

/// The header of a final frame of `opcode` with `len` payload bytes: the bytes, and how many
/// of them are used.
pub(super) fn header(opcode: u8, len: usize, mask: Option<[u8; 4]>) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = 0x80 | opcode;
    let bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = match len {
        0..=125 => {
            h[1] = bit | len as u8;
            2
        }
        126..=0xFFFF => {
            h[1] = bit | 126;
            h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            h[1] = bit | 127;
            h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    if let Some(m) = mask {
        h[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    (h, n)
}

/// Appends a whole control frame to `out`, masked with a fresh key if we are the client.
/// `payload` is cut to the 125 bytes a control frame may carry.
pub(super) fn control(role: Role, opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let payload = &payload[..payload.len().min(MAX_CONTROL)];
    let mask = new_mask(role);
    let (h, n) = header(opcode, payload.len(), mask);
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// The payload of a Close with `code` and `reason` (cut at a character boundary to fit).
pub(super) fn close_frame_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// A mask key for a frame we send: a client's is fresh and unpredictable (RFC 6455 section
/// 5.3); a server sends none.
pub(super) fn new_mask(role: Role) -> Option<[u8; 4]> {
    (role == Role::Client).then(rand::random::<[u8; 4]>)
}

/// XORs `buf` with the mask key, starting at position `phase` of the key.
pub(super) fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) {
    let k: [u8; 4] = std::array::from_fn(|i| mask[(phase + i) % 4]);
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut v = [0u8; 8];
        v.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(v) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

fn close_payload(p: &[u8]) -> Result<Option<(u16, String)>, FrameError> {
    match p {
        [] => Ok(None),
        [_] => Err(FrameError::CloseLength),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(FrameError::CloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::CloseReason)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// The codes an endpoint may send (RFC 6455 section 7.4 and the IANA registry): 1004-1006 and
/// 1015 are reserved, 1016-2999 unassigned, 5000 and above undefined.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests;
