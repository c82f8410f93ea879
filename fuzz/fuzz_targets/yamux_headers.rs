//! The yamux frame scanner under the WebSocket transport follows frame boundaries in the byte
//! stream both ways (to reset streams on time): the headers it sees and the payload it counts
//! for each stream must not depend on how the stream was cut, and it never fails or panics,
//! whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::fuzzing::yamux_headers;

#[path = "layout.rs"]
#[allow(dead_code)] // not every target reads every field
mod layout;

use layout::input;

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
