//! The yamux frame scanner under the WebSocket transport follows frame boundaries in the byte
//! stream both ways (to reset streams on time): the headers it sees and the payload it counts
//! for each stream must not depend on how the stream was cut, and it never fails or panics,
//! whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::fuzzing::yamux_headers;

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
    let (bytes, cuts) = (i.bytes, i.cuts);
    let whole = yamux_headers(bytes, &[]);
    assert_eq!(whole, yamux_headers(bytes, &cuts), "cut at {cuts:?}");
    // Every byte is a header byte or payload.
    let payload: usize = whole.1.iter().map(|(_, n)| n).sum();
    let seen = whole.0.len() * 12 + payload;
    assert!(seen <= bytes.len());
    // What is left is the start of a header that has not all arrived.
    assert!(
        bytes.len() - seen < 12,
        "{} of {} bytes unaccounted",
        bytes.len() - seen,
        bytes.len()
    );
});
