//! Basic auth for the operator's surface (`/v0/*`, the dashboard at `/`, `/metrics`), as
//! Switchboard answers it: 401 with body `Not Authorized` and
//! `WWW-Authenticate: Basic realm="Authorization Required"`. Without `api` in `relay.yaml` the
//! surface is off and answers 404 with a hint, so a relay never serves its state to anyone by
//! default.
//!
//! The credentials are compared as SHA-256 digests with a comparison whose time does not
//! depend on where they differ, so neither the password nor its length leak through timing.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::Shared;

/// The 404 body when `api` is not configured.
pub(super) const OFF: &str = "the relay's API, dashboard and metrics are off: set api \
     (username, and password_file or password_env) in relay.yaml\n";

/// Lets a request through when it carries the configured credentials.
pub(super) async fn require(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(api) = &shared.config().api else {
        return (StatusCode::NOT_FOUND, OFF).into_response();
    };
    if authorised(req.headers(), &api.username, &api.password) {
        next.run(req).await
    } else {
        let mut r = (StatusCode::UNAUTHORIZED, "Not Authorized").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Authorization Required\""),
        );
        r
    }
}

/// Whether `headers` carry `Authorization: Basic` with this user name and password.
pub(crate) fn authorised(headers: &HeaderMap, username: &str, password: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
    else {
        return false;
    };
    let mut expected = username.as_bytes().to_vec();
    expected.push(b':');
    expected.extend_from_slice(password.as_bytes());
    same(&Sha256::digest(&given), &Sha256::digest(&expected))
}

/// Compares two digests in time independent of their contents.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn only_the_exact_credentials_pass() {
        let authorised = |h: &HeaderMap| authorised(h, "admin", "pw:with:colons");
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(authorised(&headers(&basic("admin:pw:with:colons"))));
        assert!(authorised(&headers(
            &basic("admin:pw:with:colons").replace("Basic", "basic")
        )));
        for bad in [
            "admin:pw",
            "admin:pw:with:colons ",
            "Admin:pw:with:colons",
            "",
        ] {
            assert!(!authorised(&headers(&basic(bad))), "{bad}");
        }
        assert!(!authorised(&headers("Basic !!!")));
        assert!(!authorised(&headers("Bearer abc")));
        assert!(!authorised(&HeaderMap::new()));
    }
}
