//! The relay's HTTP listener (`$PORT` on Cloud Foundry): the WebSocket tunnel for agents and
//! `connect` clients ([`crate::listen::tunnel`]), health ([`health`]: `/healthz`, `/readyz`,
//! open to all), and the operator's surface behind basic auth ([`auth`]): the API ([`api`]:
//! `/v0/*`), the dashboard at `/` ([`dashboard`]) and `/metrics` ([`metrics`]). Without `api` in
//! `relay.yaml` the operator's surface answers 404 with a hint.

mod api;
mod auth;
mod dashboard;
mod health;
pub(crate) mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, patch};
use postern_common::net;
use postern_common::transport::ws;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::Shared;
use crate::listen::tunnel;

pub(crate) use auth::authorised;
pub(crate) use health::serve_port as serve_health;

/// The routes of the HTTP listener.
fn router(shared: Arc<Shared>) -> Router {
    let operator = Router::new()
        .route("/", get(dashboard::page))
        .route("/metrics", get(metrics::metrics))
        .route("/v0/agents", get(api::agents))
        .route("/v0/backends", get(api::backends))
        .route("/v0/backends/{name}", patch(api::patch_backend))
        .route("/v0/cluster", get(api::cluster).patch(api::patch_cluster))
        .route("/v0/cluster/events", get(api::events))
        .route("/v0/status", get(api::status))
        // Anything else under /v0 is behind auth too, so it reveals nothing to strangers.
        .route("/v0/{*rest}", axum::routing::any(not_found))
        .layer(DefaultBodyLimit::max(api::MAX_BODY))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth::require,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(ws::DEFAULT_PATH, get(tunnel::upgrade))
        .merge(operator)
        .merge(crate::broker::osb::routes(shared.clone()))
        .with_state(shared)
}

async fn not_found() -> axum::http::StatusCode {
    axum::http::StatusCode::NOT_FOUND
}

/// Serves HTTP on `listener` until the relay starts to drain (WebSocket tunnels already open
/// go on: they are sessions of their own).
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "http listener ready");
    let stop = shared.stop.clone();
    // WebSocket sessions carry small frames back and forth: without TCP_NODELAY, Nagle's
    // algorithm and delayed ACKs add tens of milliseconds to stream opens.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| net::tune(tcp));
    let serve = axum::serve(
        listener,
        router(shared).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await });
    if let Err(e) = serve.await {
        warn!(error = %e, "http listener failed");
    }
}

#[cfg(test)]
mod tests;
