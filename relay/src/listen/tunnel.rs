//! `/v1/tunnel` on the HTTP listener: agents and `connect` clients that cannot use UDP reach the
//! relay with a WebSocket (through Cloud Foundry's router, corporate proxies, nginx).
//!
//! Mutual TLS runs *inside* the WebSocket, so the identity of the peer never depends on the
//! router in front of the relay (which terminates the outer TLS and may pass on forged
//! client-certificate headers: they are ignored). Each tunnel is one session
//! ([`crate::sessions`]) and holds one of the relay's connection slots; with none free the
//! upgrade is answered 503.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Response, StatusCode, header};
use postern_common::events::Origin;
use postern_common::transport::ws;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{Instrument, debug, info_span};

use super::{inbound_refusal, take_slots};
use crate::Shared;

/// Upgrades to a WebSocket and runs an agent or client session on it.
pub(crate) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response<Body> {
    let headers = req.headers();
    let upgrade = header_has(headers, header::UPGRADE, "websocket");
    let connection = header_has(headers, header::CONNECTION, "upgrade");
    let version = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let (true, true, true, Some(key)) = (upgrade, connection, version, key) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "this endpoint takes a WebSocket upgrade (version 13)\n",
        );
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(StatusCode::BAD_REQUEST, "connection cannot be upgraded\n");
    };
    // Behind a router the TCP peer is the router; say who the router says the client is.
    let remote = forwarded_for(req.headers()).unwrap_or(peer);
    let slots = match take_slots(&shared, None) {
        Ok(s) => s,
        Err(r) => {
            shared
                .events
                .refused(Origin::Tunnel, Some(remote), None, None, &r);
            return plain(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
        }
    };
    let span = info_span!("websocket", %remote);
    let material = shared.config().tls.clone();
    let accept = ws::AcceptOptions {
        handshake_timeout: shared.config().handshake_timeout,
        ..ws::AcceptOptions::default()
    };
    let shared2 = shared.clone();
    shared.tasks.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(upgraded);
            let socket = ws::Upgraded::server(io);
            match ws::accept_with(socket, remote, &material, &accept).await {
                Ok(session) => crate::sessions::serve(shared2, session, Origin::Tunnel).await,
                Err(e) => {
                    let r = inbound_refusal(&e);
                    shared2
                        .events
                        .refused(Origin::Tunnel, Some(remote), None, None, &r);
                }
            }
            drop(slots);
        }
        .instrument(span),
    );
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Body::empty())
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response\n"))
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddr> {
    let first = headers
        .get("x-forwarded-for")?
        .to_str()
        .ok()?
        .split(',')
        .next()?
        .trim();
    let ip: std::net::IpAddr = first.parse().ok()?;
    Some(SocketAddr::new(ip, 0))
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r
}
