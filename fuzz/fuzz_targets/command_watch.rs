//! The command watcher reads a client's command-phase byte stream as it arrives, in whatever
//! pieces TCP and TLS deliver it: what it holds back for judgement (and where), what it passes
//! and where it gives up must not depend on how the stream was cut. Each step also makes
//! progress: a pass is at least one byte, a judged packet is whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::mysql::{CommandWatch, Scan};

/// What the watcher decided about a stream: the judged packets (offset, length, command kind),
/// the offset of an error, and how many bytes it let through in all.
#[derive(Debug, PartialEq, Eq)]
struct Verdicts {
    judged: Vec<(usize, usize, String)>,
    error_at: Option<usize>,
    consumed: usize,
}

/// Feeds `stream` to a fresh watcher in pieces ending at `cuts` (sorted offsets), then whole.
fn run(stream: &[u8], cuts: &[usize], kills: bool, limit: usize) -> Verdicts {
    let mut watch = CommandWatch::new(limit);
    if kills {
        watch = watch.watching_kills();
    }
    let mut v = Verdicts {
        judged: Vec::new(),
        error_at: None,
        consumed: 0,
    };
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        // The bytes that have arrived and not passed yet.
        loop {
            let buf = &stream[v.consumed..end];
            match watch.scan(buf) {
                Ok(Scan::Pass(n)) => {
                    assert!(n >= 1 && n <= buf.len(), "pass {n} of {}", buf.len());
                    v.consumed += n;
                }
                Ok(Scan::NeedMore) => break,
                Ok(Scan::Judge { command, len }) => {
                    assert!(len > 4 && len <= buf.len(), "judged {len} of {}", buf.len());
                    v.judged.push((v.consumed, len, format!("{command:?}")));
                    v.consumed += len;
                }
                Err(_) => {
                    v.error_at = Some(v.consumed);
                    return v;
                }
            }
        }
    }
    v
}

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
    let (kills, stream, cuts) = (i.flags & 1 == 1, i.bytes, i.cuts);
    // The front end's limit, unless the header asks for a small one.
    let limit = if i.flags & 2 == 2 {
        usize::from(i.a).max(4)
    } else {
        postern_common::mysql::HANDSHAKE_LIMIT
    };
    let whole = run(stream, &[], kills, limit);
    let pieces = run(stream, &cuts, kills, limit);
    assert_eq!(whole, pieces, "cut at {cuts:?}");
    // Byte by byte, the worst case for a streaming parser.
    if stream.len() <= 256 {
        let each: Vec<usize> = (0..stream.len()).collect();
        assert_eq!(whole, run(stream, &each, kills, limit));
    }
});
