//! The WebSocket frame decoder reads what a relay or an agent (or anything that reached the
//! port) sends, in whatever pieces it arrives, into a reader's buffer of whatever size: what
//! comes out (payload bytes, pings, pongs, a close) and the error that ends the stream must not
//! depend on the pieces or on the buffer. Limits hold: no frame or message over them is taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::fuzzing::websocket_frames;

/// The input's layout, so that seeds can be real traffic with a small header in front:
/// `flags: u8, a: u16, b: u16, room: u16, cuts: u8, then that many u16 cut offsets`, all little
/// endian, then the bytes under test. Short inputs read as zeros.
#[allow(dead_code)] // one layout for several targets; not every target uses every field
struct Input<'a> {
    flags: u8,
    a: u16,
    b: u16,
    room: u16,
    cuts: Vec<usize>,
    bytes: &'a [u8],
}

fn input(data: &[u8]) -> Input<'_> {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    let n = usize::from(byte(7));
    let start = (8 + 2 * n).min(data.len());
    let bytes = &data[start..];
    let mut cuts: Vec<usize> = (0..n)
        .map(|k| usize::from(word(8 + 2 * k)) % (bytes.len() + 1))
        .collect();
    cuts.sort_unstable();
    Input {
        flags: byte(0),
        a: word(1),
        b: word(3),
        room: word(5),
        cuts,
        bytes,
    }
}

fuzz_target!(|data: &[u8]| {
    let i = input(data);
    let (server, bytes, cuts) = (i.flags & 1 == 1, i.bytes, i.cuts);
    // The transport's limit (1 MiB for frames and messages) unless the header asks for others.
    let limits = if i.flags & 2 == 2 {
        (u64::from(i.a), u64::from(i.b).max(u64::from(i.a)))
    } else {
        (1024 * 1024, 1024 * 1024)
    };
    let room = usize::from(i.room % 4096) + 1;
    let whole = websocket_frames(server, limits, bytes, &[], 16 * 1024);
    let pieces = websocket_frames(server, limits, bytes, &cuts, room);
    assert_eq!(whole, pieces, "cut at {cuts:?}, room {room}");
    // No message longer than the limit came through.
    for (data, run) in &whole.0 {
        if *data {
            assert!(run.len() as u64 <= bytes.len() as u64);
        }
    }
});
