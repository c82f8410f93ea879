//! The input layout of the targets that take real traffic with a small header in front
//! (`command_watch`, `websocket_frames`, `yamux_headers`); included by each with `#[path]`.

/// The input's layout, so that seeds can be real traffic with a small header in front:
/// `flags: u8, a: u16, b: u16, room: u16, cuts: u8, then that many u16 cut offsets`, all little
/// endian, then the bytes under test. Short inputs read as zeros.
pub struct Input<'a> {
    pub flags: u8,
    pub a: u16,
    pub b: u16,
    pub room: u16,
    pub cuts: Vec<usize>,
    pub bytes: &'a [u8],
}

pub fn input(data: &[u8]) -> Input<'_> {
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
