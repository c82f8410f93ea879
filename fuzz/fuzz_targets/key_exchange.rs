//! The hybrid post-quantum key exchange (X25519MLKEM768) reads key shares from the network:
//! a client's share at the server, a server's share at the client. Whatever they hold: no panic,
//! a share of the wrong length is refused, an accepted one gives
//! shares and secrets of the lengths the draft fixes, and a genuine exchange that a peer
//! tampered with never gives both sides the same secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::tls::kx::X25519MLKEM768;

const CLIENT_SHARE: usize = 1184 + 32;
const SERVER_SHARE: usize = 1088 + 32;

/// The input: a byte whose low bits choose the checks (a key pair and an encapsulation cost far
/// more than reading a share, so each input runs only some) and whose high bits count `n`
/// changes (offset u16 little endian, xor mask u8) to a genuine server share, then the changes,
/// then the bytes taken as a peer's share.
fn input(data: &[u8]) -> (u8, Vec<(u16, u8)>, &[u8]) {
    let mode = data.first().copied().unwrap_or(0);
    let n = usize::from(mode >> 4);
    let flips_end = (1 + 3 * n).min(data.len());
    let flips = data[1.min(data.len())..flips_end]
        .chunks_exact(3)
        .map(|c| (u16::from_le_bytes([c[0], c[1]]), c[2]))
        .collect();
    (mode, flips, &data[flips_end..])
}

fuzz_target!(|data: &[u8]| {
    let (mode, flips, share) = input(data);
    // Arbitrary bytes as a client's share, at the server.
    match X25519MLKEM768.start_and_complete(share) {
        Ok(done) => {
            assert_eq!(share.len(), CLIENT_SHARE);
            assert_eq!(done.pub_key.len(), SERVER_SHARE);
            assert_eq!(done.secret.secret_bytes().len(), 64);
        }
        Err(_) => {}
    }
    // Arbitrary bytes as a server's share, at a client.
    if mode & 1 == 0 {
        return;
    }
    let client = X25519MLKEM768.start().expect("a key share");
    match client.complete(share) {
        Ok(secret) => {
            assert_eq!(share.len(), SERVER_SHARE);
            assert_eq!(secret.secret_bytes().len(), 64);
        }
        // A share of the right length is refused only for an X25519 half that gives the
        // all-zero secret (a low-order point).
        Err(_) => {}
    }
    // A genuine exchange whose server share is changed on the way.
    if mode & 2 == 0 {
        return;
    }
    let client = X25519MLKEM768.start().expect("a key share");
    let server = X25519MLKEM768
        .start_and_complete(client.pub_key())
        .expect("a genuine share");
    let mut answer = server.pub_key.clone();
    let len = answer.len();
    for (at, mask) in &flips {
        answer[usize::from(*at) % len] ^= mask;
    }
    let changed = answer != server.pub_key;
    match client.complete(&answer) {
        Ok(secret) => assert_eq!(
            secret.secret_bytes() == server.secret.secret_bytes(),
            !changed,
            "the secrets agree exactly when nothing was changed"
        ),
        // Only an X25519 half that gives the all-zero secret is refused.
        Err(_) => assert!(changed),
    }
});
