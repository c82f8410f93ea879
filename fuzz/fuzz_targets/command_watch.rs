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

#[path = "layout.rs"]
#[allow(dead_code)] // not every target reads every field
mod layout;

use layout::input;

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
