//! MySQL packets as read from a peer that may send anything: a reader never returns more than
//! its budget, never consumes a partial packet, and each packet it returns re-encodes to the
//! exact bytes it took (continuation parts included).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postern_common::mysql::{self as packet, PacketReader};

fuzz_target!(|data: &[u8]| {
    let Some((&budget, rest)) = data.split_first() else {
        return;
    };
    // Budgets from 64 bytes to 16 KiB, so the limit is reached as well as missed.
    let limit = 64usize << (budget % 9);
    let mut reader = PacketReader::new(limit);
    let mut buf = BytesMut::from(rest);
    let mut taken = 0usize;
    loop {
        // What is left of the input: the reader only ever takes bytes off the front.
        let before = &rest[taken..];
        match reader.decode(&mut buf) {
            Ok(Some(p)) => {
                let used = before.len() - buf.len();
                taken += used;
                assert!(
                    taken <= limit,
                    "{taken} bytes decoded with a budget of {limit}"
                );
                assert_eq!(reader.remaining(), limit - taken);
                let wire = p.encode_with_seq(p.seq);
                assert_eq!(
                    &wire[..],
                    &before[..used],
                    "a packet re-encodes to other bytes"
                );
                let mut out = BytesMut::new();
                assert_eq!(packet::encode(p.seq, &p.payload, &mut out), p.next_seq());
            }
            Ok(None) => {
                assert_eq!(&buf[..], before, "a partial packet was consumed");
                return;
            }
            Err(_) => {
                assert_eq!(&buf[..], before, "a refused packet was consumed");
                return;
            }
        }
    }
});
