//! The relay's HTTP listener (`$PORT` on Cloud Foundry): the WebSocket tunnel for agents and
//! `connect` clients ([`crate::listen::tunnel`]), health ([`health`]: `/healthz`, `/readyz`)
//! and the API ([`api`]: `/v0/agents`).

mod api;
mod health;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use postern_common::net;
use postern_common::transport::ws;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::Shared;
use crate::listen::tunnel;

/// The routes of the HTTP listener.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v0/agents", get(api::agents))
        .route(ws::DEFAULT_PATH, get(tunnel::upgrade))
        .with_state(shared)
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
