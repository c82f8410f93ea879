//! The connection-phase messages Postern parses and rewrites (the server's greeting, the
//! client's SSLRequest and handshake response), from payloads that may be anything: no panic,
//! rewrites keep every other byte, and what is parsed re-encodes to something that parses back
//! to the same fields.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use postern_common::mysql::{
    CLIENT_COMPRESS, CLIENT_SSL, CLIENT_ZSTD, Greeting, HandshakeResponse, SslRequest,
};

fn greeting(payload: &[u8]) {
    let Ok(g) = Greeting::parse(Bytes::copy_from_slice(payload)) else {
        return;
    };
    assert_eq!(&g.payload()[..], payload);
    // Rewriting the flags Postern rewrites (TLS, compression) changes them and nothing else.
    let rewritten = CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD;
    for mask in [CLIENT_SSL, CLIENT_COMPRESS, CLIENT_ZSTD, rewritten] {
        let caps = g.capabilities() ^ mask;
        let raw = g.with_capabilities(caps);
        assert_eq!(raw.len(), payload.len());
        let again = Greeting::parse(raw).expect("a greeting with other flags parses");
        assert_eq!(again.capabilities(), caps);
        assert_eq!(again.server_version(), g.server_version());
        assert_eq!(again.connection_id(), g.connection_id());
        assert_eq!(again.scramble(), g.scramble());
    }
    for tls in [false, true] {
        let raw = g.for_client(tls);
        let again = Greeting::parse(raw).expect("a greeting for a client parses");
        assert_eq!(again.capabilities() & CLIENT_SSL != 0, tls);
        assert_eq!(again.capabilities() & (CLIENT_COMPRESS | CLIENT_ZSTD), 0);
        assert_eq!(again.scramble(), g.scramble());
    }
    // A new connection id and scramble of the same length (no NUL) replace the old ones.
    let scramble: Vec<u8> = g
        .scramble()
        .iter()
        .map(|b| b.wrapping_add(1).max(1))
        .collect();
    if let Some(r) = g.reissue(0xdead_beef, &scramble) {
        assert_eq!(r.connection_id(), 0xdead_beef);
        assert_eq!(r.scramble(), &scramble[..]);
        assert_eq!(r.payload().len(), payload.len());
        assert_eq!(r.server_version(), g.server_version());
        assert_eq!(r.capabilities(), g.capabilities());
    }
}

fn ssl_request(payload: &[u8]) {
    if let Ok(r) = SslRequest::parse(payload) {
        assert_eq!(r.encode(), payload);
    }
}

fn response(payload: &[u8]) {
    let Ok(r) = HandshakeResponse::parse(payload) else {
        return;
    };
    let encoded = r.encode();
    let again = HandshakeResponse::parse(&encoded).expect("a re-encoded response parses");
    assert_eq!(again, r);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => greeting(rest),
        1 => ssl_request(rest),
        _ => response(rest),
    }
});
