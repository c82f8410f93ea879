//! ring against aws-lc-rs on this machine: AEAD seal throughput on TLS-record and
//! QUIC-packet sized buffers, and full TLS 1.3 handshakes (in memory) with each provider's
//! key exchange groups, X25519 and the hybrid X25519MLKEM768, and Postern's own X25519MLKEM768
//! on ring (`common/src/tls/kx.rs`, compiled in here as it is). Rounds are interleaved so that
//! machine noise hits every variant alike; the median of the rounds is printed.
//!
//! First, and alone with `cargo run --release -- interop`: Postern's X25519MLKEM768 against
//! aws-lc-rs' (an independent implementation of ML-KEM and of the hybrid's layout), each as
//! client and as server. Each handshake must choose the hybrid group and carry data both ways.
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../../common/src/tls/kx.rs"]
#[allow(dead_code)]
mod kx;

const ROUNDS: usize = 7;
const SLICE: Duration = Duration::from_millis(300);

fn rate(mut f: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let mut bytes = 0usize;
    while start.elapsed() < SLICE {
        for _ in 0..64 {
            bytes += f();
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

type Case = (String, Box<dyn FnMut() -> usize>);

fn ring_aead(alg: &'static ring::aead::Algorithm, size: usize) -> Box<dyn FnMut() -> usize> {
    use ring::aead::*;
    let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
    let mut buf = vec![1u8; size];
    let mut n = 0u64;
    Box::new(move || {
        n += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&[0u8; 13]),
                &mut buf,
            )
            .unwrap();
        let _ = black_box(tag);
        size
    })
}

fn awslc_aead(alg: &'static aws_lc_rs::aead::Algorithm, size: usize) -> Box<dyn FnMut() -> usize> {
    use aws_lc_rs::aead::*;
    let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
    let mut buf = vec![1u8; size];
    let mut n = 0u64;
    Box::new(move || {
        n += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&[0u8; 13]),
                &mut buf,
            )
            .unwrap();
        let _ = black_box(tag);
        size
    })
}

struct Pki {
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn with_groups(
    provider: rustls::crypto::CryptoProvider,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = provider;
    p.kx_groups = groups;
    Arc::new(p)
}

fn client_config(
    p: Arc<rustls::crypto::CryptoProvider>,
    pki: &Pki,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.cert.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn server_config(
    p: Arc<rustls::crypto::CryptoProvider>,
    pki: &Pki,
) -> Arc<rustls::ServerConfig> {
    let mut sc = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
        .unwrap();
    sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    sc.send_tls13_tickets = 0;
    Arc::new(sc)
}

/// Moves what each side writes to the other until neither has anything to say.
fn pump(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        let quiet = rd.is_empty();
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        if quiet && rd.is_empty() && !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
}

fn connect(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    pump(&mut c, &mut s);
    (c, s)
}

fn handshake_case(
    provider: rustls::crypto::CryptoProvider,
    group: &'static dyn rustls::crypto::SupportedKxGroup,
    pki: &Pki,
) -> Box<dyn FnMut() -> usize> {
    let p = with_groups(provider, vec![group]);
    let client = client_config(p.clone(), pki);
    let server = server_config(p, pki);
    Box::new(move || {
        let _ = black_box(connect(&client, &server));
        1
    })
}

/// Postern's hybrid group against aws-lc-rs', both ways round; panics on any difference.
fn interop(pki: &Pki) {
    use std::io::{Read, Write};
    let postern = with_groups(
        rustls::crypto::ring::default_provider(),
        vec![kx::X25519MLKEM768, rustls::crypto::ring::kx_group::X25519],
    );
    let awslc = with_groups(
        rustls::crypto::aws_lc_rs::default_provider(),
        vec![
            rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
            rustls::crypto::aws_lc_rs::kx_group::X25519,
        ],
    );
    let pairs = [
        ("Postern client, aws-lc-rs server", &postern, &awslc),
        ("aws-lc-rs client, Postern server", &awslc, &postern),
    ];
    for (what, cp, sp) in pairs {
        for round in 0..200 {
            let (mut c, mut s) = connect(
                &client_config((*cp).clone(), pki),
                &server_config((*sp).clone(), pki),
            );
            for (side, group) in [
                ("client", c.negotiated_key_exchange_group()),
                ("server", s.negotiated_key_exchange_group()),
            ] {
                let group = group.map(|g| g.name());
                assert_eq!(
                    group,
                    Some(rustls::NamedGroup::X25519MLKEM768),
                    "{what}, round {round}: the {side} negotiated {group:?}"
                );
            }
            let up = format!("up {round}");
            let down = format!("down {round}");
            c.writer().write_all(up.as_bytes()).unwrap();
            s.writer().write_all(down.as_bytes()).unwrap();
            pump(&mut c, &mut s);
            let (mut got_up, mut got_down) = (vec![0; up.len()], vec![0; down.len()]);
            s.reader().read_exact(&mut got_up).unwrap();
            c.reader().read_exact(&mut got_down).unwrap();
            assert_eq!((got_up, got_down), (up.into_bytes(), down.into_bytes()));
        }
        println!("interop {what}: 200 handshakes chose X25519MLKEM768 and carried data both ways");
    }
}

fn main() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let pki = Pki {
        cert: ck.cert.der().clone(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
    };
    interop(&pki);
    if std::env::args().nth(1).as_deref() == Some("interop") {
        return;
    }
    let mut cases: Vec<Case> = Vec::new();
    for size in [1200usize, 16384] {
        cases.push((
            format!("AES-128-GCM {size} B ring"),
            ring_aead(&ring::aead::AES_128_GCM, size),
        ));
        cases.push((
            format!("AES-128-GCM {size} B aws-lc-rs"),
            awslc_aead(&aws_lc_rs::aead::AES_128_GCM, size),
        ));
        cases.push((
            format!("AES-256-GCM {size} B ring"),
            ring_aead(&ring::aead::AES_256_GCM, size),
        ));
        cases.push((
            format!("AES-256-GCM {size} B aws-lc-rs"),
            awslc_aead(&aws_lc_rs::aead::AES_256_GCM, size),
        ));
        cases.push((
            format!("ChaCha20-Poly1305 {size} B ring"),
            ring_aead(&ring::aead::CHACHA20_POLY1305, size),
        ));
        cases.push((
            format!("ChaCha20-Poly1305 {size} B aws-lc-rs"),
            awslc_aead(&aws_lc_rs::aead::CHACHA20_POLY1305, size),
        ));
    }
    let hs: Vec<Case> = vec![
        (
            "TLS 1.3 handshake X25519 ring".into(),
            handshake_case(
                rustls::crypto::ring::default_provider(),
                rustls::crypto::ring::kx_group::X25519,
                &pki,
            ),
        ),
        (
            "TLS 1.3 handshake X25519 aws-lc-rs".into(),
            handshake_case(
                rustls::crypto::aws_lc_rs::default_provider(),
                rustls::crypto::aws_lc_rs::kx_group::X25519,
                &pki,
            ),
        ),
        (
            "TLS 1.3 handshake X25519MLKEM768 aws-lc-rs".into(),
            handshake_case(
                rustls::crypto::aws_lc_rs::default_provider(),
                rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
                &pki,
            ),
        ),
        (
            "TLS 1.3 handshake X25519MLKEM768 ring + libcrux-ml-kem (Postern)".into(),
            handshake_case(
                rustls::crypto::ring::default_provider(),
                kx::X25519MLKEM768,
                &pki,
            ),
        ),
    ];
    cases.extend(hs);
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in cases.iter_mut().enumerate() {
            results[i].push(rate(f));
        }
    }
    for ((name, _), r) in cases.iter().zip(results) {
        let m = median(r);
        if name.contains("handshake") {
            println!(
                "{name}: {:.0} handshakes/s ({:.1} µs each, client and server)",
                m,
                1e6 / m
            );
        } else {
            println!("{name}: {:.0} MiB/s", m / 1048576.0);
        }
    }
}
