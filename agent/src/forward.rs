//! One data stream from the relay: read its open frame, connect to the backend, pipe bytes.

use std::sync::Arc;
use std::time::Duration;

use postern_common::protocol::{Answer, Code, Open};
use postern_common::transport::Stream;
use postern_common::{net, splice, wire};
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;

/// How long the relay has to send the open frame of a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one stream the relay opened.
pub(crate) async fn serve(config: Arc<Config>, mut stream: Stream) {
    let open =
        match tokio::time::timeout(OPEN_TIMEOUT, wire::read_first::<_, Open>(&mut stream)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                warn!(error = %e, "refused stream: bad open frame");
                stream.abort();
                return;
            }
            Err(_) => {
                warn!("refused stream: no open frame in time");
                stream.abort();
                return;
            }
        };
    let span = info_span!("stream", service = %open.service, client = %open.client, pre_auth = open.pre_auth, conn_id = open.conn_id);
    forward(config, stream, open).instrument(span).await
}

async fn forward(config: Arc<Config>, mut stream: Stream, open: Open) {
    let Some(svc) = config.services.get(&open.service) else {
        refuse(
            &mut stream,
            Code::UnknownService,
            format!(
                "agent {} does not offer service {:?}",
                config.name, open.service
            ),
        )
        .await;
        return;
    };
    let mut tcp = match net::connect(&svc.backend, svc.connect_timeout).await {
        Ok(t) => t,
        Err(e) => {
            let message = format!(
                "service {:?} is unavailable: cannot connect to backend {}: {e}",
                svc.name, svc.backend
            );
            refuse(&mut stream, Code::BackendUnavailable, message).await;
            return;
        }
    };
    let ok = Answer::Ok {
        backend: svc.backend.clone(),
    };
    if let Err(e) = wire::write_first(&mut stream, &ok).await {
        debug!(error = %e, "relay went away before the stream started");
        return;
    }
    info!(client_addr = %open.client_addr, backend = %svc.backend, "connected to backend");
    match splice::splice(&mut stream, &mut tcp).await {
        Ok(t) => debug!(up = t.a_to_b, down = t.b_to_a, "stream closed"),
        Err(e) => {
            debug!(error = %e, "stream failed");
            stream.abort();
            net::reset_on_close(&tcp);
        }
    }
}

async fn refuse(stream: &mut Stream, code: Code, message: String) {
    warn!(%code, reason = %message, "refused stream");
    let _ = wire::write_first(stream, &Answer::Refused { code, message }).await;
    let _ = stream.shutdown().await;
}
