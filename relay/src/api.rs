//! The relay's HTTP surface: liveness, readiness and the list of connected agents.
//!
//! `/healthz` answers 200 while the process serves and never depends on agents (a platform that
//! restarts unhealthy apps must not restart the relay because a database is down). `/readyz`
//! answers 200 only when at least one agent is connected, with details either way.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::Shared;
use crate::registry::AgentInfo;

/// The routes of the HTTP listener.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v0/agents", get(agents))
        .with_state(shared)
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Ready {
    ready: bool,
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
    let ready = !agents.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Ready {
            ready,
            instance: shared.config.instance.clone(),
            agents,
            services_without_agent,
        }),
    )
}

async fn agents(State(shared): State<Arc<Shared>>) -> Json<Vec<AgentInfo>> {
    Json(shared.registry.agents())
}
