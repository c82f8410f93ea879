//! The front end's login relay: after the client's handshake response, the database and the
//! client take turns (auth switch, more data, OK or ERR) while the front end forwards each
//! packet with sequence ids shifted for the leg that carried an SSLRequest. Whatever either
//! side sends: no panic; everything forwarded is whole MySQL packets; the turn always names who
//! speaks next, and once the exchange is over it stays over.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use postern_common::mysql::{
    AuthRelay, Greeting, Handover, HandshakeResponse, Legs, Packet, PacketReader, Turn,
};

/// Splits `bytes` into packets the way the wire carries them (3-byte length, sequence id).
fn packets(mut bytes: &[u8]) -> Vec<Packet> {
    let mut out = Vec::new();
    while let Some(&[a, b, c, seq]) = bytes.first_chunk::<4>() {
        let len = (u32::from_le_bytes([a, b, c, 0]) as usize).min(bytes.len() - 4);
        out.push(Packet {
            seq,
            payload: Bytes::copy_from_slice(&bytes[4..4 + len]),
        });
        bytes = &bytes[4 + len..];
    }
    out
}

/// Everything forwarded must be whole packets, nothing left over.
fn whole_packets(out: &BytesMut) {
    let mut buf = out.clone();
    let mut reader = PacketReader::new(usize::MAX);
    while !buf.is_empty() {
        match reader.decode(&mut buf) {
            Ok(Some(_)) => {}
            other => panic!("forwarded bytes are not whole packets: {other:?} ({out:?})"),
        }
    }
}

fn run(mut relay: AuthRelay, turns: Vec<Packet>) {
    let mut done = false;
    for p in &turns {
        let out = match relay.turn() {
            Turn::Backend => relay.from_backend(p),
            Turn::Client => relay.from_client(p),
            Turn::Done(_) => {
                done = true;
                break;
            }
        };
        match out {
            Ok(out) => whole_packets(&out),
            Err(_) => return,
        }
    }
    if done {
        assert!(matches!(relay.turn(), Turn::Done(_)));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let legs = Legs {
        client_tls: flags & 1 == 1,
        backend_tls: flags & 2 == 2,
    };
    let seq = flags >> 4;
    let mut pieces = packets(rest).into_iter();
    let Some(response) = pieces.next() else {
        return;
    };
    let Ok(response) = HandshakeResponse::parse(&response.payload) else {
        return;
    };
    if flags & 4 == 0 {
        let (relay, first) = AuthRelay::start(legs, seq, &response);
        whole_packets(&first);
        run(relay, pieces.collect());
    } else {
        // The handover: the client answered another front end's scramble; the database's own
        // greeting comes next, then its answer.
        let Some(greeting) = pieces.next() else {
            return;
        };
        let Ok(greeting) = Greeting::parse(greeting.payload) else {
            return;
        };
        let Ok((handover, first)) = Handover::start(legs, seq, response, &greeting) else {
            return;
        };
        whole_packets(&first);
        let Some(answer) = pieces.next() else {
            return;
        };
        if let Ok((relay, out)) = handover.finish(&answer) {
            whole_packets(&out);
            run(relay, pieces.collect());
        }
    }
});
