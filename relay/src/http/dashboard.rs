//! The dashboard at `GET /` (behind basic auth): one static HTML page with its CSS and
//! JavaScript inline, embedded in the binary (no build step, nothing from a CDN). It polls
//! `/v0/status` every second with the browser's remembered credentials and shows services,
//! agents, nodes (health, the active marker, connection counts, the last check), the term and
//! the recent decisions with their reasons. Elements carry stable ids, classes and `data-`
//! attributes for tests in a headless browser and other tools: each service's section
//! `data-active-node="NAME"` (empty when no node is active) and `data-term`, each node's
//! `data-node`, `data-active`, `data-healthy` and `data-draining`.
//!
//! The page fetches `location.origin + "/v0/status"`, an absolute URL: a page opened as
//! `http://user:password@host/` may not fetch a relative one (it would inherit the
//! credentials, which `fetch` refuses).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// `GET /`.
pub(super) async fn page() -> Response {
    let mut r = PAGE.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:",
        ),
    );
    r
}
