//! The WebSocket frame decoder reads what a relay or an agent (or anything that reached the
//! port) sends, in whatever pieces it arrives, into a reader's buffer of whatever size: what
//! comes out (payload bytes, pings, pongs, a close) and the error that ends the stream must not
//! depend on the pieces or on the buffer. Limits hold: no frame or message over them is taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::fuzzing::websocket_frames;

#[path = "layout.rs"]
#[allow(dead_code)] // not every target reads every field
mod layout;

use layout::input;

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
