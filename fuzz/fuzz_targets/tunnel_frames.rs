//! The tunnel's control frames (length prefix + JSON body), as read from a peer that may send
//! anything: every frame decoded re-encodes to a frame that decodes to the same message, a
//! length over the limit is refused from its 4-byte prefix alone, and nothing is consumed from
//! a partial frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postern_common::protocol::{self, Admin, Answer, Control, FrameError, MAX_FRAME, Open};
use serde::{Serialize, de::DeserializeOwned};

fn frames<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match protocol::decode::<T>(&mut buf) {
            Ok(Some(msg)) => {
                assert!(buf.len() < before, "a decoded frame consumed nothing");
                let mut again = BytesMut::new();
                protocol::encode(&msg, &mut again).expect("a decoded message encodes");
                let back = protocol::decode::<T>(&mut again)
                    .expect("a re-encoded frame decodes")
                    .expect("a re-encoded frame is complete");
                assert_eq!(back, msg);
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "a partial frame was consumed");
                if let Ok(Some(len)) = protocol::frame_len(&buf) {
                    assert!(len <= MAX_FRAME);
                    assert!(buf.len() < 4 + len);
                }
                return;
            }
            Err(FrameError::TooLarge(len)) => {
                assert!(len > MAX_FRAME);
                assert_eq!(buf.len(), before, "an oversized frame was consumed");
                return;
            }
            // A malformed body is consumed with its frame; the caller ends the stream.
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => frames::<Control>(rest),
        1 => frames::<Open>(rest),
        2 => frames::<Answer>(rest),
        _ => frames::<Admin>(rest),
    }
});
