//! What Postern reads from certificate, key and revocation-list files and from the certificates
//! peers present: PEM text and DER, from bytes that may be anything. No panic and no unbounded
//! allocation; an identity read from a certificate is one that reads back from its URI; the
//! expiry read from a certificate is the one its validity says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::pki::{
    self, Ca, crl_issuer_name, identity_of, issuer_name, parse_identity, subject_name,
};
use postern_common::tls::Material;
use postern_common::tls::expiry::Expiry;
use rustls_pki_types::CertificateDer;

/// Splits the input after its first byte (the mode) at NUL bytes into up to three texts, so that
/// seeds can be real PEM files joined by NULs; the whole rest is also taken as DER.
fn parts(rest: &[u8]) -> [String; 3] {
    let mut it = rest.split(|b| *b == 0).filter(|p| !p.is_empty());
    let mut next = || String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
    [next(), next(), next()]
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, der)) = data.split_first() else {
        return;
    };
    let [a, b, c] = parts(der);
    let (a, b, c) = (a.as_str(), b.as_str(), c.as_str());
    match which % 4 {
        // Certificate, key and CA files, as the relay and agent load them.
        0 => {
            if let Ok(m) = Material::from_pem(a, b, c) {
                let _ = m.identity();
                let _ = postern_common::tls::expiry::of_material(&m, "relay");
            }
        }
        // A CA (for `certs issue`) and a revocation list.
        1 => {
            let _ = Ca::from_pem(a, b);
            let _ = crl_issuer_name(c);
        }
        // DER as a peer presents it.
        _ => {
            let cert = CertificateDer::from(der);
            if let Ok(id) = identity_of(&cert) {
                assert_eq!(parse_identity(&id.uri()), Some(id.clone()), "{id:?}");
            }
            let _ = issuer_name(&cert);
            let _ = subject_name(&cert);
            if let Some(e) = Expiry::of("client", &cert) {
                let _ = e.days_left(std::time::SystemTime::now());
                assert!(e.unix() >= 0);
            }
            let _ = pki::name_of(der);
        }
    }
});
