//! The frame codec against hand-built frames: every rule of RFC 6455 that we enforce, fed whole,
//! byte by byte and in random chunks, and arbitrary bytes that must never panic.

use proptest::prelude::*;

use super::*;

const MAX: u64 = 1024 * 1024;

/// One frame as a peer in `from`'s role would send it, with explicit bits for malformed ones.
fn raw(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let (h, n) = header(opcode, payload.len(), mask);
    let mut f = h[..n].to_vec();
    if !fin {
        f[0] &= 0x7F;
    }
    let start = f.len();
    f.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut f[start..], m, 0);
    }
    f
}

/// A frame from a client (masked).
fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

/// Decodes all of `wire` fed in chunks of the given sizes (cycled), with a reader buffer of
/// `out_len` bytes: the data read, the other items, and the first error.
fn run(
    role: Role,
    wire: &[u8],
    chunks: &[usize],
    out_len: usize,
) -> (Vec<u8>, Vec<Item>, Option<FrameError>) {
    let mut d = Decoder::new(role, MAX, MAX);
    let mut input = BytesMut::new();
    let (mut data, mut items) = (Vec::new(), Vec::new());
    let mut fed = 0;
    let mut i = 0;
    let mut scratch = vec![0u8; out_len];
    loop {
        let mut out = ReadBuf::new(&mut scratch);
        match d.decode(&mut input, &mut out) {
            Ok(Some(Item::Data(n))) => {
                assert!(n > 0);
                assert_eq!(out.filled().len(), n);
                data.extend_from_slice(out.filled());
            }
            Ok(Some(item @ Item::Close(_))) => {
                items.push(item);
                return (data, items, None);
            }
            Ok(Some(item)) => items.push(item),
            Ok(None) => {
                assert!(input.len() <= MAX_HEADER + MAX_CONTROL, "{}", input.len());
                if fed == wire.len() {
                    return (data, items, None);
                }
                let k = chunks[i % chunks.len()].max(1).min(wire.len() - fed);
                i += 1;
                input.extend_from_slice(&wire[fed..fed + k]);
                fed += k;
            }
            Err(e) => return (data, items, Some(e)),
        }
    }
}

fn decode_all(role: Role, wire: &[u8]) -> (Vec<u8>, Vec<Item>, Option<FrameError>) {
    let whole = run(role, wire, &[wire.len().max(1)], 64 * 1024);
    let bytewise = run(role, wire, &[1], 7);
    assert_eq!(whole, bytewise);
    whole
}

fn error(role: Role, wire: &[u8]) -> FrameError {
    decode_all(role, wire).2.expect("an error")
}

#[test]
fn binary_messages_in_and_out_of_fragments() {
    let mut wire = client(true, BINARY, b"hello ");
    wire.extend(client(false, BINARY, b"frag"));
    wire.extend(client(false, CONTINUATION, b"men"));
    wire.extend(client(true, CONTINUATION, b"ted "));
    wire.extend(client(true, BINARY, b""));
    wire.extend(client(true, BINARY, &vec![7u8; 70_000]));
    let (data, items, err) = decode_all(Role::Server, &wire);
    assert_eq!(err, None);
    assert!(items.is_empty());
    let mut want = b"hello fragmented ".to_vec();
    want.extend(vec![7u8; 70_000]);
    assert_eq!(data, want);
}

#[test]
fn control_frames_come_between_fragments() {
    let mut wire = client(false, BINARY, b"a");
    wire.extend(client(true, PING, b"ping!"));
    wire.extend(client(false, CONTINUATION, b"b"));
    wire.extend(client(true, PONG, b"pong"));
    wire.extend(client(true, CONTINUATION, b"c"));
    wire.extend(client(
        true,
        CLOSE,
        &close_frame_payload(1001, "going away"),
    ));
    // Nothing after a Close counts, not even garbage.
    wire.extend(b"\xff\xff\xff");
    let (data, items, err) = decode_all(Role::Server, &wire);
    assert_eq!(err, None);
    assert_eq!(data, b"abc");
    assert_eq!(
        items,
        vec![
            Item::Ping(Bytes::from_static(b"ping!")),
            Item::Pong,
            Item::Close(Some((1001, "going away".into()))),
        ]
    );
}

#[test]
fn a_server_reads_unmasked_frames_only_as_a_client() {
    let frame = raw(true, BINARY, b"data", None);
    assert_eq!(decode_all(Role::Client, &frame).0, b"data");
    assert_eq!(error(Role::Server, &frame), FrameError::Unmasked);
    assert_eq!(
        error(Role::Client, &client(true, BINARY, b"data")),
        FrameError::Masked
    );
}

#[test]
fn an_empty_close_and_a_close_with_a_code() {
    let (_, items, err) = decode_all(Role::Server, &client(true, CLOSE, b""));
    assert_eq!((items, err), (vec![Item::Close(None)], None));
    let (_, items, _) = decode_all(Role::Client, &raw(true, CLOSE, &[0x03, 0xe8], None));
    assert_eq!(items, vec![Item::Close(Some((1000, String::new())))]);
}

#[test]
fn malformed_frames_are_refused() {
    let s = Role::Server;
    let mut rsv = client(true, BINARY, b"x");
    rsv[0] |= 0x40;
    assert_eq!(error(s, &rsv), FrameError::Reserved);
    for op in [3, 7, 0xB, 0xF] {
        assert_eq!(error(s, &client(true, op, b"x")), FrameError::Opcode(op));
    }
    assert_eq!(error(s, &client(true, TEXT, b"hi")), FrameError::Text);
    assert_eq!(
        error(s, &client(false, PING, b"")),
        FrameError::FragmentedControl
    );
    assert_eq!(
        error(s, &client(true, PING, &[0; 126])),
        FrameError::ControlTooLong(126)
    );
    assert_eq!(
        error(s, &client(true, CONTINUATION, b"x")),
        FrameError::Continuation
    );
    let mut two = client(false, BINARY, b"x");
    two.extend(client(true, BINARY, b"y"));
    assert_eq!(error(s, &two), FrameError::Interleaved);
    let mut text_inside = client(false, BINARY, b"x");
    text_inside.extend(client(true, TEXT, b"y"));
    assert_eq!(error(s, &text_inside), FrameError::Interleaved);
    assert_eq!(
        error(s, &client(true, CLOSE, &[0x03])),
        FrameError::CloseLength
    );
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
        assert_eq!(
            error(s, &client(true, CLOSE, &code.to_be_bytes())),
            FrameError::CloseCode(code)
        );
    }
    assert_eq!(
        error(s, &client(true, CLOSE, &[0x03, 0xe8, 0xff, 0xfe])),
        FrameError::CloseReason
    );
}

#[test]
fn lengths_must_take_their_shortest_form() {
    // 126 with a length that fits in seven bits.
    let f = [0x82, 126, 0, 100];
    assert_eq!(error(Role::Client, &f), FrameError::Length);
    // 127 with a length that fits in sixteen bits.
    let f = [0x82, 127, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    assert_eq!(error(Role::Client, &f), FrameError::Length);
    // The top bit of a 64-bit length.
    let f = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(error(Role::Client, &f), FrameError::Length);
}

#[test]
fn size_limits_hold_before_any_payload() {
    let mut d = Decoder::new(Role::Client, 1000, 1500);
    let mut scratch = [0u8; 16];
    // A header announcing 2^40 bytes is refused at once.
    let mut input = BytesMut::from(&[0x82, 127, 0, 0, 1, 0, 0, 0, 0, 0][..]);
    assert_eq!(
        d.decode(&mut input, &mut ReadBuf::new(&mut scratch)),
        Err(FrameError::FrameTooLong {
            size: 1 << 40,
            max: 1000
        })
    );
    // Fragments each within the frame limit, over the message limit together.
    let mut d = Decoder::new(Role::Client, 1000, 1500);
    let mut wire = raw(false, BINARY, &[1; 1000], None);
    wire.extend(raw(true, CONTINUATION, &[1; 501], None));
    let mut input = BytesMut::from(&wire[..]);
    let mut out = vec![0u8; 4096];
    let mut got = 0;
    let e = loop {
        match d.decode(&mut input, &mut ReadBuf::new(&mut out)) {
            Ok(Some(Item::Data(n))) => got += n,
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, 1000);
    assert_eq!(e, FrameError::MessageTooLong { max: 1500 });
    // Exactly at the limits is fine.
    let mut wire = raw(false, BINARY, &[1; 1000], None);
    wire.extend(raw(true, CONTINUATION, &[1; 500], None));
    let mut d = Decoder::new(Role::Client, 1000, 1500);
    let mut input = BytesMut::from(&wire[..]);
    let mut got = 0;
    while let Some(item) = d.decode(&mut input, &mut ReadBuf::new(&mut out)).unwrap() {
        let Item::Data(n) = item else { panic!() };
        got += n;
    }
    assert_eq!(got, 1500);
}

#[test]
fn headers_encode_in_their_shortest_form() {
    for (len, size) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
        assert_eq!(header(BINARY, len, None).1, size, "{len}");
        assert_eq!(header(BINARY, len, Some([1, 2, 3, 4])).1, size + 4, "{len}");
    }
}

#[test]
fn control_frames_we_send_are_cut_to_125_bytes() {
    let mut out = Vec::new();
    control(Role::Server, PING, &[9; 300], &mut out);
    assert_eq!(out.len(), 2 + 125);
    let (_, items, err) = decode_all(Role::Client, &out);
    assert_eq!((items, err), (vec![Item::Ping(vec![9; 125].into())], None));
    let p = close_frame_payload(1000, &"é".repeat(100));
    assert!(p.len() <= 125);
    assert!(std::str::from_utf8(&p[2..]).is_ok());
}

#[test]
fn client_frames_get_fresh_masks() {
    let mut a = Vec::new();
    let mut b = Vec::new();
    control(Role::Client, PING, b"same", &mut a);
    control(Role::Client, PING, b"same", &mut b);
    assert_eq!(a[1] & 0x80, 0x80);
    // Two random 32-bit keys collide once in 2^32.
    assert_ne!(a[2..6], b[2..6]);
    let (_, items, _) = decode_all(Role::Server, &a);
    assert_eq!(items, vec![Item::Ping(Bytes::from_static(b"same"))]);
}

fn naive_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(phase + i) % 4];
    }
}

proptest! {
    #[test]
    fn masking_matches_the_definition(
        data in proptest::collection::vec(any::<u8>(), 0..100),
        mask in any::<[u8; 4]>(),
        phase in 0usize..4,
    ) {
        let mut a = data.clone();
        let mut b = data;
        apply_mask(&mut a, mask, phase);
        naive_mask(&mut b, mask, phase);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn messages_survive_any_chunking(
        messages in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..3000), 1..6),
        chunks in proptest::collection::vec(1usize..700, 1..8),
        out_len in 1usize..5000,
        split in 1usize..4,
    ) {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for m in &messages {
            // Each message in `split` fragments, a Ping after the first.
            let parts: Vec<&[u8]> = m.chunks(m.len().div_ceil(split).max(1)).collect();
            let parts = if parts.is_empty() { vec![&m[..]] } else { parts };
            for (i, p) in parts.iter().enumerate() {
                let op = if i == 0 { BINARY } else { CONTINUATION };
                wire.extend(client(i + 1 == parts.len(), op, p));
                if i == 0 {
                    wire.extend(client(true, PING, b"p"));
                }
            }
            want.extend_from_slice(m);
        }
        let (data, items, err) = run(Role::Server, &wire, &chunks, out_len);
        prop_assert_eq!(err, None);
        prop_assert_eq!(data, want);
        prop_assert_eq!(items.len(), messages.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_pile_up(
        wire in proptest::collection::vec(any::<u8>(), 0..2000),
        chunks in proptest::collection::vec(1usize..300, 1..5),
        server in any::<bool>(),
    ) {
        let role = if server { Role::Server } else { Role::Client };
        // `run` asserts the undecoded input stays under a header and a control frame.
        let _ = run(role, &wire, &chunks, 100);
    }
}
