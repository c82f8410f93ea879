//! The answer an HTTP proxy gives to `CONNECT`: read byte-exactly up to its blank line (what
//! follows belongs to the relay and must stay unread), bounded in length, and its status line
//! parsed (a status is 100 to 599, as HTTP defines them), whatever the proxy (or whatever
//! answers in its place) sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::fuzzing::connect_answer;

const END: &[u8] = b"\r\n\r\n";

fuzz_target!(|bytes: &[u8]| {
    let (outcome, left) = connect_answer(bytes);
    match outcome {
        Ok((head, status)) => {
            // The head is the input up to and including the first blank line, no more.
            assert!(head.ends_with(END));
            assert_eq!(&bytes[..head.len()], &head[..]);
            assert_eq!(left, bytes.len() - head.len(), "read past the head");
            let first = bytes.windows(4).position(|w| w == END).unwrap();
            assert_eq!(first + 4, head.len());
            if let Some((code, _)) = status {
                assert!((100..=599).contains(&code), "status {code}");
                assert!(head.starts_with(b"HTTP/1."));
            }
        }
        Err(why) => match why.as_str() {
            "eof" => {
                assert_eq!(left, 0);
                assert!(!bytes.windows(4).any(|w| w == END));
            }
            "too long" => assert!(bytes.len() >= 16 * 1024),
            other => panic!("{other}"),
        },
    }
});
