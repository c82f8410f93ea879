//! The hybrid post-quantum key exchange X25519MLKEM768 (`draft-ietf-tls-ecdhe-mlkem`, code
//! point 0x11ec), on ring's X25519 and the formally verified ML-KEM-768 of `libcrux-ml-kem`.
//!
//! A session's traffic recorded today must not be readable by whoever breaks X25519 later: the
//! shared secret is ML-KEM-768's concatenated with X25519's, so the session stays secret while
//! either holds. rustls ships this group only with the aws-lc-rs provider. Which provider seals
//! bytes faster depends on the CPU (`bench/RESULTS.md`, "crypto providers": ring 1.6–2.25× on an
//! AMD EPYC, aws-lc-rs up to 1.5× on a Xeon with AVX-512); this module adds the group to ring's
//! provider, so Postern keeps one provider and no CPU pays double per byte, and the
//! post-quantum part is paid once per handshake.
//!
//! The wire layout is the draft's, ML-KEM first:
//!
//! * the client's share: the ML-KEM-768 encapsulation key (1,184 bytes), then its X25519 public
//!   key (32 bytes);
//! * the server's share: the ML-KEM-768 ciphertext (1,088 bytes), then its X25519 public key;
//! * the shared secret: the ML-KEM shared secret (32 bytes), then the X25519 one (32 bytes).
//!
//! A client also offers its X25519 half on its own ([`ActiveKeyExchange::hybrid_component`]), so
//! a server without the hybrid group completes the handshake with X25519 and no extra round
//! trip. TLS 1.3 only: the group does not exist in TLS 1.2.

use libcrux_ml_kem::mlkem768::{self, MlKem768Ciphertext, MlKem768PrivateKey, MlKem768PublicKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};

/// X25519MLKEM768 with ring's X25519: the group Postern prefers on every TLS link.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &Hybrid;

/// The classical half, which is also offered on its own.
const CLASSICAL: &dyn SupportedKxGroup = rustls::crypto::ring::kx_group::X25519;

const X25519_LEN: usize = 32;
const ENCAPSULATION_KEY_LEN: usize = 1184;
const CIPHERTEXT_LEN: usize = 1088;
const KEYGEN_SEED_LEN: usize = 64;
const ENCAPSULATION_SEED_LEN: usize = 32;

const INVALID_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

/// The name by which logs, records and metrics show a key exchange group: the IANA name of the
/// TLS group (`X25519MLKEM768`, `X25519`, `secp256r1`, ...).
pub fn group_name(group: NamedGroup) -> &'static str {
    match group {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "secp256r1",
        NamedGroup::secp384r1 => "secp384r1",
        NamedGroup::secp521r1 => "secp521r1",
        NamedGroup::X448 => "X448",
        NamedGroup::secp256r1MLKEM768 => "SecP256r1MLKEM768",
        NamedGroup::MLKEM768 => "MLKEM768",
        _ => "other",
    }
}

/// Whether a group resists a quantum computer (a hybrid with ML-KEM, or ML-KEM alone).
pub fn is_post_quantum(group: NamedGroup) -> bool {
    matches!(
        group,
        NamedGroup::X25519MLKEM768
            | NamedGroup::secp256r1MLKEM768
            | NamedGroup::MLKEM768
            | NamedGroup::MLKEM1024
    )
}

#[derive(Debug)]
struct Hybrid;

fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut seed = [0u8; N];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| Error::FailedToGetRandomBytes)?;
    Ok(seed)
}

impl SupportedKxGroup for Hybrid {
    /// The client's side: a fresh ML-KEM key pair and a fresh X25519 key.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let (decapsulation_key, encapsulation_key) =
            mlkem768::generate_key_pair(random::<KEYGEN_SEED_LEN>()?).into_parts();
        let classical = CLASSICAL.start()?;
        let mut share = Vec::with_capacity(ENCAPSULATION_KEY_LEN + X25519_LEN);
        share.extend_from_slice(encapsulation_key.as_slice());
        share.extend_from_slice(classical.pub_key());
        Ok(Box::new(Active {
            decapsulation_key: Box::new(decapsulation_key),
            classical,
            share,
        }))
    }

    /// The server's side: encapsulate to the client's key (checked first, as FIPS 203 requires
    /// of the encapsulating side) and answer its X25519 key.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != ENCAPSULATION_KEY_LEN + X25519_LEN {
            return Err(INVALID_SHARE);
        }
        let (key, theirs) = client_share.split_at(ENCAPSULATION_KEY_LEN);
        let key = MlKem768PublicKey::try_from(key).map_err(|_| INVALID_SHARE)?;
        if !mlkem768::validate_public_key(&key) {
            return Err(INVALID_SHARE);
        }
        let classical = CLASSICAL.start_and_complete(theirs)?;
        let (ciphertext, pq_secret) =
            mlkem768::encapsulate(&key, random::<ENCAPSULATION_SEED_LEN>()?);
        let mut share = Vec::with_capacity(CIPHERTEXT_LEN + X25519_LEN);
        share.extend_from_slice(ciphertext.as_slice());
        share.extend_from_slice(&classical.pub_key);
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key: share,
            secret: combine(&pq_secret, classical.secret.secret_bytes()),
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The ML-KEM secret, then the X25519 one.
fn combine(pq: &[u8], classical: &[u8]) -> SharedSecret {
    let mut secret = Vec::with_capacity(pq.len() + classical.len());
    secret.extend_from_slice(pq);
    secret.extend_from_slice(classical);
    SharedSecret::from(secret)
}

/// A client's key exchange between its ClientHello and the server's answer.
struct Active {
    /// Boxed: 2,400 bytes that rustls moves around with the handshake state otherwise.
    decapsulation_key: Box<MlKem768PrivateKey>,
    classical: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for Active {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != CIPHERTEXT_LEN + X25519_LEN {
            return Err(INVALID_SHARE);
        }
        let (ciphertext, theirs) = server_share.split_at(CIPHERTEXT_LEN);
        let ciphertext = MlKem768Ciphertext::try_from(ciphertext).map_err(|_| INVALID_SHARE)?;
        let classical = self.classical.complete(theirs)?;
        let pq_secret = mlkem768::decapsulate(&self.decapsulation_key, &ciphertext);
        Ok(combine(&pq_secret, classical.secret_bytes()))
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((CLASSICAL.name(), self.classical.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_secret_of_both_halves() {
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), ENCAPSULATION_KEY_LEN + X25519_LEN);
        let (group, classical) = client.hybrid_component().unwrap();
        assert_eq!(group, NamedGroup::X25519);
        assert_eq!(classical, &client.pub_key()[ENCAPSULATION_KEY_LEN..]);

        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        assert_eq!(server.group, NamedGroup::X25519MLKEM768);
        assert_eq!(server.pub_key.len(), CIPHERTEXT_LEN + X25519_LEN);
        let theirs = client.complete(&server.pub_key).unwrap();
        assert_eq!(theirs.secret_bytes(), server.secret.secret_bytes());
        assert_eq!(theirs.secret_bytes().len(), 64);
    }

    #[test]
    fn the_x25519_half_alone_completes_with_a_classic_server() {
        let client = X25519MLKEM768.start().unwrap();
        let share = client.hybrid_component().unwrap().1.to_vec();
        let server = CLASSICAL.start_and_complete(&share).unwrap();
        let theirs = client.complete_hybrid_component(&server.pub_key).unwrap();
        assert_eq!(theirs.secret_bytes(), server.secret.secret_bytes());
        assert_eq!(theirs.secret_bytes().len(), 32);
    }

    #[test]
    fn a_share_of_the_wrong_length_or_an_invalid_key_is_refused() {
        let client = X25519MLKEM768.start().unwrap();
        let share = client.pub_key().to_vec();
        for bad in [&share[..share.len() - 1], &[], &share[..X25519_LEN]] {
            assert_eq!(
                X25519MLKEM768.start_and_complete(bad).err(),
                Some(INVALID_SHARE)
            );
        }
        // Coefficients of an encapsulation key are below q = 3329; all-ones bytes are not.
        let mut invalid = share.clone();
        invalid[..ENCAPSULATION_KEY_LEN - 32].fill(0xff);
        assert_eq!(
            X25519MLKEM768.start_and_complete(&invalid).err(),
            Some(INVALID_SHARE)
        );
        let server = X25519MLKEM768.start_and_complete(&share).unwrap();
        assert_eq!(
            client.complete(&server.pub_key[1..]).err(),
            Some(INVALID_SHARE)
        );
    }

    #[test]
    fn a_tampered_ciphertext_gives_a_different_secret() {
        // ML-KEM's implicit rejection: no error, a secret the server does not have, so the
        // handshake fails at Finished.
        let client = X25519MLKEM768.start().unwrap();
        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        let mut tampered = server.pub_key.clone();
        tampered[0] ^= 1;
        let theirs = client.complete(&tampered).unwrap();
        assert_ne!(theirs.secret_bytes(), server.secret.secret_bytes());
        assert_eq!(
            theirs.secret_bytes()[32..],
            server.secret.secret_bytes()[32..]
        );
    }
}
