//! Liveness and readiness for the platform and load balancers.
//!
//! `/healthz` answers 200 while the process serves and never depends on agents (a platform that
//! restarts unhealthy apps must not restart the relay because a database is down). `/readyz`
//! answers 200 only when an agent is connected, a service has an active node that an agent
//! reports healthy (or an agent too old to report nodes serves it), and the relay is not
//! draining; with details either way.
//!
//! `health_listen` is Switchboard's health port (1936): a separate listener that answers 200
//! with an empty body on any path, without auth, for load balancers that only probe a port.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};

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
    services: Vec<ServiceReady>,
}

/// One service's readiness.
#[derive(Serialize)]
pub(super) struct ServiceReady {
    name: String,
    /// Agents serving it through this relay.
    agents: Vec<String>,
    /// The best decision's term and node.
    term: u64,
    active: Option<String>,
    /// Whether a connected agent reports the active node healthy (and traffic is enabled).
    healthy: bool,
    ready: bool,
}

pub(super) async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Ready>) {
    let agents = shared.registry.agents();
    let services: Vec<ServiceReady> = shared
        .config()
        .services
        .keys()
        .map(|name| {
            let serving: Vec<&AgentInfo> = agents
                .iter()
                .filter(|a| a.services.iter().any(|s| s == name))
                .collect();
            let snap = shared.cluster.snapshot(name).unwrap_or_default();
            let healthy = snap.active_healthy();
            // An agent that does not report nodes routes by itself: its service is as ready as
            // it was before nodes were reported.
            let legacy = serving.iter().any(|a| !a.backends);
            ServiceReady {
                name: name.clone(),
                agents: serving.iter().map(|a| a.name.clone()).collect(),
                term: snap.best.as_ref().map_or(0, |b| b.term),
                active: snap.best.as_ref().and_then(|b| b.active.clone()),
                healthy,
                ready: !serving.is_empty() && (healthy || legacy),
            }
        })
        .collect();
    let services_without_agent = services
        .iter()
        .filter(|s| s.agents.is_empty())
        .map(|s| s.name.clone())
        .collect();
    // A draining relay is not ready: load balancers should send nothing new.
    let draining = shared.stop.is_cancelled();
    let ready = !agents.is_empty() && services.iter().any(|s| s.ready) && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Ready {
            ready,
            draining,
            instance: shared.config().instance.clone(),
            agents,
            services_without_agent,
            services,
        }),
    )
}

/// Serves `health_listen` until the relay starts to drain (then the port closes, which is what
/// a load balancer probing it should see).
pub(crate) async fn serve_port(shared: Arc<Shared>, listener: TcpListener) {
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "health listener ready");
    let stop = shared.stop.clone();
    let router = Router::new().fallback(|| async { StatusCode::OK });
    let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
        stop.cancelled().await;
    });
    if let Err(e) = serve.await {
        warn!(error = %e, "health listener failed");
    }
}
