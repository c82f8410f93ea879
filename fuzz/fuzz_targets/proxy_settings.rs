//! Proxy settings as they come from the environment (`HTTPS_PROXY`, `NO_PROXY`) or a config
//! file: parsing never panics, a parsed proxy's `Debug` and `Display` never show the password,
//! and neither does the error for a setting that does not parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_common::transport::proxy::{Proxy, bypasses};

/// A password the rest of the message cannot contain by accident: letters of both cases and a
/// digit, at least 8 characters.
fn distinctive(pw: &str) -> bool {
    pw.len() >= 8
        && pw.chars().all(|c| c.is_ascii_alphanumeric())
        && pw.chars().any(|c| c.is_ascii_digit())
        && pw.chars().any(|c| c.is_ascii_uppercase())
        && pw.chars().any(|c| c.is_ascii_lowercase())
}

fuzz_target!(|input: (bool, &str, &str, &str, &str, u16)| {
    let (scheme, user, pw, rest, no_proxy, port) = input;
    let _ = bypasses(no_proxy, rest, port);
    let _ = Proxy::parse("HTTPS_PROXY", rest);
    let value = if scheme {
        format!("http://{user}:{pw}@{rest}")
    } else {
        format!("{user}:{pw}@{rest}")
    };
    let shown = match Proxy::parse("HTTPS_PROXY", &value) {
        Ok(proxy) => format!("{proxy} {proxy:?}"),
        Err(e) => e.to_string(),
    };
    if distinctive(pw) && !user.contains(pw) && !rest.contains(pw) {
        assert!(!shown.contains(pw), "the password shows in {shown:?}");
    }
});
