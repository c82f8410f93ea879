//! The QUIC endpoint: agents and `connect` clients dial it over UDP (TLS 1.3 with their client
//! certificate, ALPN `postern/1`). Each accepted connection is one session
//! ([`crate::sessions`]). While the relay drains, new connections are refused at once (not left
//! to time out), so a client moves to another instance without delay.

use std::sync::Arc;

use postern_common::events::Origin;
use postern_common::transport::quic::Server;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{inbound_refusal, take_slots};
use crate::Shared;

/// Accepts QUIC connections until `until` fires (the relay starts to drain).
pub(crate) async fn serve(shared: Arc<Shared>, server: Server, until: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = until.cancelled() => break,
            i = server.endpoint().accept() => i,
        };
        let Some(incoming) = incoming else { return };
        let remote = incoming.remote_address();
        let slots = match take_slots(&shared, None) {
            Ok(s) => s,
            Err(r) => {
                shared
                    .events
                    .refused(Origin::Quic, Some(remote), None, None, &r);
                incoming.refuse();
                continue;
            }
        };
        let (shared2, server2) = (shared.clone(), server.clone());
        let span = tracing::info_span!("quic", %remote);
        shared.tasks.spawn(
            async move {
                let accepted = tokio::time::timeout(
                    shared2.config().handshake_timeout,
                    server2.accept(incoming),
                )
                .await;
                let session = match accepted {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let r = inbound_refusal(&e);
                        shared2
                            .events
                            .refused(Origin::Quic, Some(remote), None, None, &r);
                        return;
                    }
                    Err(_) => {
                        let r = super::timed_out("the TLS handshake");
                        shared2
                            .events
                            .refused(Origin::Quic, Some(remote), None, None, &r);
                        return;
                    }
                };
                crate::sessions::serve(shared2, session, Origin::Quic).await;
                drop(slots);
            }
            .instrument(span),
        );
    }
    // Draining: refuse new connections at once until the relay is gone.
    loop {
        tokio::select! {
            _ = shared.abort.cancelled() => return,
            i = server.endpoint().accept() => match i {
                Some(incoming) => incoming.refuse(),
                None => return,
            },
        }
    }
}
