//! One data stream from the relay: read its open frame, connect to the backend, pipe bytes.
//!
//! A stream in [`StreamMode::MysqlE2e`] carries a MySQL client's raw connection (the relay only
//! splices it): the agent runs the MySQL front end itself ([`front::serve_tls`]) with the
//! service's certificate and the policy the relay sent, so TLS ends here and the relay never
//! sees queries, results or passwords.

use std::sync::Arc;
use std::time::Duration;

use postern_common::events::{Event, Origin};
use postern_common::front::{self, Meta, Policy};
use postern_common::protocol::{Answer, Code, Open, Refusal, StreamMode};
use postern_common::transport::Stream;
use postern_common::{net, splice, wire};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use crate::policy::SessionPolicy;
use crate::state::AgentState;

/// How long the relay has to send the open frame of a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one stream the relay opened.
pub(crate) async fn serve(state: Arc<AgentState>, policy: Arc<SessionPolicy>, mut stream: Stream) {
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
    // In end-to-end mode the client is known only after TLS; the front end records it.
    let span = info_span!("stream", service = %open.service, client = tracing::field::Empty, pre_auth = open.pre_auth, e2e = open.mode == StreamMode::MysqlE2e, conn_id = open.conn_id);
    if !open.client.is_empty() {
        span.record("client", &open.client);
    }
    forward(state, policy, stream, open).instrument(span).await
}

async fn forward(
    state: Arc<AgentState>,
    policy: Arc<SessionPolicy>,
    mut stream: Stream,
    open: Open,
) {
    let config = &state.config;
    let Some(svc) = config.services.get(&open.service) else {
        let r = Refusal::new(
            Code::UnknownService,
            format!(
                "agent {} does not offer service {:?}",
                config.name, open.service
            ),
        );
        refuse(&state, &mut stream, &open, r).await;
        return;
    };
    let e2e = match open.mode {
        StreamMode::Plain => None,
        StreamMode::MysqlE2e => match policy.for_service(&config.name, &svc.name).await {
            Ok((rules, acceptor)) => {
                // A burst waits for a handshake slot, for up to half the deadline: the relay
                // waits for this stream's answer for the whole deadline, and the refusal must
                // reach it first.
                let timeout = rules.policy.handshake_timeout();
                let slots = rules.handshakes.clone();
                match tokio::time::timeout(timeout / 2, slots.acquire_owned()).await {
                    Ok(Ok(slot)) => Some((rules.policy, acceptor, slot)),
                    _ => {
                        let message = format!(
                            "too many connections to service {:?} in their handshake (limit {})",
                            svc.name, rules.policy.max_handshakes
                        );
                        let r = Refusal::new(Code::TooManyConnections, message);
                        refuse(&state, &mut stream, &open, r).await;
                        return;
                    }
                }
            }
            Err(message) => {
                refuse(
                    &state,
                    &mut stream,
                    &open,
                    Refusal::new(Code::NotAuthorized, message),
                )
                .await;
                return;
            }
        },
    };
    // The handshake deadline runs from here, as it runs at the relay from the accepted client.
    let started = Instant::now();
    let (backend, mut tcp) = match state.backends.connect(&svc.name).await {
        Ok(b) => b,
        Err(r) => {
            refuse(&state, &mut stream, &open, r).await;
            return;
        }
    };
    let ok = Answer::Ok {
        backend: backend.addr.clone(),
    };
    if let Err(e) = wire::write_first(&mut stream, &ok).await {
        debug!(error = %e, "relay went away before the stream started");
        return;
    }
    if let Some((rules, acceptor, handshake)) = e2e {
        let timeout = rules.handshake_timeout();
        let policy = Policy {
            service: &rules.name,
            clients: &rules.clients,
            allowed_users: &rules.allowed_users,
            client_attribute: rules.client_attribute,
            handshake_timeout: timeout,
        };
        let meta = Meta {
            conn_id: open.conn_id,
            backend: &backend.addr,
        };
        debug!(client_addr = %open.client_addr, backend = %backend.addr, "connected to backend; tls ends here");
        // Boxed: the TLS front end's state is large, and plain streams (most of them, and every
        // idle one) must not carry its size.
        Box::pin(front::serve_tls(
            &policy,
            meta,
            stream,
            tcp,
            &acceptor,
            started + timeout,
            handshake,
        ))
        .await;
        return;
    }
    state.events.emit(Event::Opened {
        origin: Origin::AgentStream,
        conn_id: open.conn_id,
        service: svc.name.clone(),
        identity: (!open.client.is_empty()).then(|| open.client.clone()),
        via: backend.addr.clone(),
    });
    let spliced = tokio::select! {
        r = splice::splice(&mut stream, &mut tcp) => r,
        // The backend was taken out of service: its connections end (loudly).
        _ = backend.severed.cancelled() => Err(std::io::Error::other("backend taken out of service")),
    };
    let (up, down, failure) = match spliced {
        Ok(t) => (t.a_to_b, t.b_to_a, None),
        Err(e) => {
            stream.abort();
            net::reset_on_close(&tcp);
            (0, 0, Some(e.to_string()))
        }
    };
    state.events.emit(Event::Closed {
        origin: Origin::AgentStream,
        conn_id: open.conn_id,
        service: svc.name.clone(),
        up,
        down,
        failure,
    });
}

/// Answers the relay with a refusal (which it shows the client), and tells the events sink.
async fn refuse(state: &AgentState, stream: &mut Stream, open: &Open, r: Refusal) {
    let service = (!open.service.is_empty()).then_some(open.service.as_str());
    let identity = (!open.client.is_empty()).then_some(open.client.as_str());
    state
        .events
        .refused(Origin::AgentStream, None, service, identity, &r);
    let _ = wire::write_first(stream, &r.answer()).await;
    let _ = stream.shutdown().await;
}
