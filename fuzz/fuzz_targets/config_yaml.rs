//! The YAML loaders of `relay.yaml` and `agent.yaml`, from text that may be anything: no panic,
//! and every error names the file it was given and a line that exists in it (or none), with a
//! message. The files a config names resolve next to it, in a directory that holds a real CA and
//! certificates, so that a mutated config gets past them to the checks behind; `/` and `\`
//! become `_`, so that no path leaves that directory.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postern_common::config::ConfigErrors;
use postern_common::pki::{Ca, Kind, LeafSpec};

/// A directory with `ca.pem`, `ca-key.pem`, `relay.pem`, `relay-key.pem`, `agent.pem`,
/// `agent-key.pem` and `api-password`.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("postern-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (ca, key) = Ca::generate("fuzz ca", 3650).unwrap();
        std::fs::write(d.join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(d.join("ca-key.pem"), key).unwrap();
        let mut relay = LeafSpec::new(Kind::Server, "relay", 3650);
        relay.dns.push("localhost".into());
        for (base, spec) in [
            ("relay", relay),
            ("agent", LeafSpec::new(Kind::Agent, "db1", 3650)),
        ] {
            let issued = ca.issue(&spec).unwrap();
            std::fs::write(d.join(format!("{base}.pem")), issued.cert_pem).unwrap();
            std::fs::write(d.join(format!("{base}-key.pem")), issued.key_pem).unwrap();
        }
        std::fs::write(d.join("api-password"), "s3cret\n").unwrap();
        d
    })
}

fn check(path: &Path, text: &str, errors: ConfigErrors) {
    // Lines as YAML counts them: a line break is CR LF, LF or a lone CR.
    let lines = text.replace("\r\n", "\n").matches(['\n', '\r']).count() as u32 + 1;
    assert!(!errors.0.is_empty(), "a refusal with no error");
    for e in &errors.0 {
        assert_eq!(e.file, path);
        assert!(!e.message.is_empty(), "{e:?}");
        if let Some(line) = e.line {
            assert!((1..=lines).contains(&line), "line {line} of {lines}: {e:?}");
        }
    }
    let _ = errors.to_string();
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let text = text.replace(['/', '\\'], "_");
    let env = BTreeMap::from([("PORT", "8080"), ("NAME", "orders"), ("INDEX", "0")]);
    if which % 2 == 0 {
        let path = dir().join("relay.yaml");
        if let Err(e) = postern_relay::config::Config::parse(&path, &text, &env) {
            check(&path, &text, e);
        }
    } else {
        let path = dir().join("agent.yaml");
        if let Err(e) = postern_agent::config::Config::parse(&path, &text, &env) {
            check(&path, &text, e);
        }
    }
});
