//! Proxy settings as they come from the environment (`HTTPS_PROXY`, `NO_PROXY`) or a config
//! file: parsing never panics, and what is shown of a setting (a parsed proxy's `Debug` and
//! `Display`, or the error for one that does not parse) never depends on its password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::transport::proxy::{Proxy, bypasses};

/// What a user or a log sees of the setting `user:password@rest`.
fn shown(scheme: bool, user: &str, password: &str, rest: &str) -> String {
    let value = if scheme {
        format!("http://{user}:{password}@{rest}")
    } else {
        format!("{user}:{password}@{rest}")
    };
    match Proxy::parse("HTTPS_PROXY", &value) {
        Ok(proxy) => format!("{proxy} {proxy:?}"),
        Err(e) => e.to_string(),
    }
}

fuzz_target!(|input: (bool, &str, &str, &str, &str, u16)| {
    let (scheme, user, password, rest, no_proxy, port) = input;
    let _ = bypasses(no_proxy, rest, port);
    let _ = Proxy::parse("HTTPS_PROXY", rest);
    let first = shown(scheme, user, password, rest);
    // Another password of the same length and kind (letters and digits, so the setting's
    // structure is the same): if anything shown differs, the password leaks into it.
    if !password.is_empty() && password.chars().all(|c| c.is_ascii_alphanumeric()) {
        let other: String = password
            .chars()
            .map(|c| match c {
                'a'..='y' | 'A'..='Y' | '0'..='8' => char::from(c as u8 + 1),
                'z' => 'a',
                'Z' => 'A',
                _ => '0',
            })
            .collect();
        assert_eq!(
            first,
            shown(scheme, user, &other, rest),
            "what is shown depends on the password"
        );
    }
});
