//! The relay's HTTP surface: the WebSocket endpoint for agents and `connect` clients
//! (`/v1/tunnel`), liveness, readiness and the list of connected agents.
//!
//! `/v1/tunnel` upgrades to a WebSocket and runs mutual TLS *inside* it, so the identity of the
//! peer never depends on the router in front of the relay (which terminates the outer TLS and
//! may pass on forged client-certificate headers: they are ignored).
//!
//! `/healthz` answers 200 while the process serves and never depends on agents (a platform that
//! restarts unhealthy apps must not restart the relay because a database is down). `/readyz`
//! answers 200 only when at least one agent is connected and the relay is not draining, with
//! details either way.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, Response, header};
use postern_common::transport::ws;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, info_span, warn};

use crate::Shared;
use crate::registry::AgentInfo;

/// The routes of the HTTP listener.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v0/agents", get(agents))
        .route(ws::DEFAULT_PATH, get(tunnel))
        .with_state(shared)
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Ready {
    ready: bool,
    draining: bool,
    instance: String,
    agents: Vec<AgentInfo>,
    services_without_agent: Vec<String>,
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Ready>) {
    let agents = shared.registry.agents();
    let services_without_agent = shared
        .config
        .services
        .keys()
        .filter(|s| shared.registry.route(s).is_none())
        .cloned()
        .collect();
    // A draining relay is not ready: load balancers should send nothing new.
    let ready = !agents.is_empty() && !shared.stop.is_cancelled();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Ready {
            ready,
            draining: shared.stop.is_cancelled(),
            instance: shared.config.instance.clone(),
            agents,
            services_without_agent,
        }),
    )
}

async fn agents(State(shared): State<Arc<Shared>>) -> Json<Vec<AgentInfo>> {
    Json(shared.registry.agents())
}

/// Upgrades to a WebSocket and runs an agent or client session on it.
async fn tunnel(
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
    let span = info_span!("websocket", %remote);
    let material = shared.config.tls.clone();
    let accept = ws::AcceptOptions {
        handshake_timeout: shared.config.handshake_timeout,
        ..ws::AcceptOptions::default()
    };
    let shared2 = shared.clone();
    shared.tasks.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    warn!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(upgraded);
            let socket =
                WebSocketStream::from_raw_socket(io, Role::Server, Some(ws::websocket_config()))
                    .await;
            match ws::accept_with(socket, remote, &material, &accept).await {
                Ok(session) => crate::serve_session(shared2, session).await,
                Err(e) => warn!(reason = %e, "refused connection"),
            }
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
