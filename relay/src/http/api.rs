//! The JSON API: `/v0/agents`, the agents connected to this relay instance.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use crate::Shared;
use crate::registry::AgentInfo;

/// The connected agents.
pub(super) async fn agents(State(shared): State<Arc<Shared>>) -> Json<Vec<AgentInfo>> {
    Json(shared.registry.agents())
}
