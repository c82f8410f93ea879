//! Liveness and readiness for the platform and load balancers.
//!
//! `/healthz` answers 200 while the process serves and never depends on agents (a platform that
//! restarts unhealthy apps must not restart the relay because a database is down). `/readyz`
//! answers 200 only when at least one agent is connected and the relay is not draining, with
//! details either way.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use crate::Shared;
use crate::registry::AgentInfo;

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
pub(super) struct Ready {
    ready: bool,
    draining: bool,
    instance: String,
    agents: Vec<AgentInfo>,
    services_without_agent: Vec<String>,
}

pub(super) async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Ready>) {
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
