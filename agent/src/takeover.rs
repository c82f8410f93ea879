//! Moving a session from WebSocket back to QUIC once UDP gets through again.
//!
//! With `transport: auto`, a session that had to fall back to WebSocket tries QUIC every
//! `quic_reprobe`. Once a QUIC session is up and welcomed, its hello says `take_over`: the relay
//! routes new streams to it and lets the WebSocket session finish the streams it carries
//! ([`crate::session`] then closes it), so no client connection is cut by the move.

use postern_common::transport::addr::RelayUrl;
use tracing::debug;

use crate::session::{self, Ready};
use crate::state::AgentState;

/// Tries QUIC every `quic_reprobe` until a session is up and welcomed as a take-over.
pub(crate) async fn probe_quic(state: &AgentState, url: &RelayUrl) -> Ready {
    loop {
        tokio::time::sleep(state.config().quic_reprobe).await;
        let session = match state.dialer().quic(url).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "quic still unavailable");
                continue;
            }
        };
        match session::handshake(state, &session, true).await {
            Ok(ready) => return ready,
            Err(e) => {
                debug!(error = %e, "quic session refused");
                session.close("handshake failed");
            }
        }
    }
}
