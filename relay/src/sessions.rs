//! Authenticated sessions (over QUIC or a WebSocket tunnel): agents and `connect` clients are
//! told apart by the identity in their certificate.
//!
//! An agent's session is served by [`crate::agents`]. A `connect` client's session carries one
//! stream per client connection: each starts with an [`Open`] naming the service, is authorised
//! and reached like a TLS-first connection, and then carries the client's bytes. While the
//! relay drains, the streams a session has go on and new ones are refused as `shutting_down`
//! (`connect` then opens them on a new session, to another instance); at the end of the grace
//! period the session closes.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_common::events::Origin;
use postern_common::pki::Identity;
use postern_common::protocol::{Answer, Code, Open};
use postern_common::transport::{Session, Stream};
use postern_common::wire;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info, info_span};

use crate::Shared;
use crate::forward::{self, Refusal};
use crate::listen::mysql;

/// Serves an authenticated session until it ends, whatever its transport. `origin` says which
/// listener accepted it (for refusals).
pub(crate) async fn serve(shared: Arc<Shared>, session: Session, origin: Origin) {
    match session.peer().cloned() {
        Some(Identity::Agent(name)) => {
            let span = info_span!("agent", agent = %name);
            crate::agents::serve(shared, session, name)
                .instrument(span)
                .await;
        }
        Some(Identity::Client(name)) => serve_client(shared, session, name).await,
        None => {
            let r = Refusal::new(
                Code::NotAuthorized,
                "certificate carries no postern identity",
            );
            shared
                .events
                .refused(origin, Some(session.remote()), None, None, &r);
            session.close("no identity");
        }
    }
}

/// Serves a `connect` client session: every stream it opens is one client connection.
async fn serve_client(shared: Arc<Shared>, session: Session, name: String) {
    info!(client = %name, remote = %session.remote(), transport = %session.kind(), key_exchange = session.key_exchange(), "client session connected");
    loop {
        let stream = tokio::select! {
            _ = shared.abort.cancelled() => { session.close("relay shutting down"); break; }
            s = session.accept() => s,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                info!(client = %name, reason = %e, "client session ended");
                break;
            }
        };
        let span = info_span!("client", client = %name, peer = %session.remote());
        if shared.stop.is_cancelled() {
            shared
                .tasks
                .spawn(refuse_draining(shared.clone(), stream).instrument(span));
            continue;
        }
        shared.connections.spawn(
            serve_stream(
                shared.clone(),
                session.remote(),
                Identity::Client(name.clone()),
                session.key_exchange(),
                stream,
            )
            .instrument(span),
        );
    }
}

/// Answers a stream opened while the relay drains: `shutting_down`.
async fn refuse_draining(shared: Arc<Shared>, mut stream: Stream) {
    let open = tokio::time::timeout(
        shared.config().handshake_timeout,
        wire::read_first::<_, Open>(&mut stream),
    )
    .await;
    if !matches!(open, Ok(Ok(_))) {
        stream.abort();
        return;
    }
    let refusal = Refusal::new(
        Code::ShuttingDown,
        format!(
            "relay {} is shutting down: open the connection on another instance",
            shared.config().instance
        ),
    );
    debug!(reason = %refusal.message, "stream refused while draining");
    let _ = wire::write_first(&mut stream, &refusal.answer()).await;
    let _ = stream.shutdown().await;
}

/// Serves one stream of a `connect` client: a client connection.
/// `client_tls`: the key exchange group of the client's session.
async fn serve_stream(
    shared: Arc<Shared>,
    peer: SocketAddr,
    identity: Identity,
    client_tls: &'static str,
    stream: Stream,
) {
    // Boxed: reading the open frame and reaching the agent need far more state than carrying
    // bytes, which is all an idle connection does; only the carrying part stays.
    let Some((stream, reached, service, span)) =
        Box::pin(start_stream(&shared, peer, &identity, client_tls, stream)).await
    else {
        return;
    };
    forward::carry(
        &shared,
        Origin::ClientStream,
        &service,
        &identity,
        Some(client_tls),
        stream,
        reached,
    )
    .instrument(span)
    .await;
}

/// Reads the open frame, authorises and reaches the service: what to carry, or `None` when the
/// stream was refused, a probe, or served whole (with the relay's MySQL login).
async fn start_stream(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    identity: &Identity,
    client_tls: &'static str,
    mut stream: Stream,
) -> Option<(Stream, forward::Reached, String, tracing::Span)> {
    let open = tokio::time::timeout(
        shared.config().handshake_timeout,
        wire::read_first::<_, Open>(&mut stream),
    )
    .await;
    let refused = |r: &Refusal, service: Option<&str>| {
        shared.events.refused(
            Origin::ClientStream,
            Some(peer),
            service,
            Some(&identity.uri()),
            r,
        );
    };
    let open = match open {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            refused(
                &Refusal::new(Code::BadRequest, format!("bad open frame: {e}")),
                None,
            );
            stream.abort();
            return None;
        }
        Err(_) => {
            refused(
                &Refusal::new(
                    Code::BadRequest,
                    "no open frame within the handshake timeout",
                ),
                None,
            );
            stream.abort();
            return None;
        }
    };
    if open.service.is_empty() {
        // A probe: the client checks that the relay accepted its certificate (in TLS 1.3 the
        // client's handshake completes before the server has verified it).
        let _ = wire::write_first(
            &mut stream,
            &Answer::Ok {
                backend: String::new(),
            },
        )
        .await;
        let _ = stream.shutdown().await;
        return None;
    }
    let span = info_span!("stream", service = %open.service);
    let started = async {
        let mut reached = match forward::reach(shared, &open.service, identity, peer).await {
            Ok(r) => r,
            Err(r) => {
                refused(&r, Some(&open.service));
                let _ = wire::write_first(&mut stream, &r.answer()).await;
                let _ = stream.shutdown().await;
                return None;
            }
        };
        let ok = Answer::Ok {
            backend: reached.backend.clone(),
        };
        if wire::write_first(&mut stream, &ok).await.is_err() {
            reached.stream.abort();
            return None;
        }
        if let Some(svc) = shared.config().services.get(&open.service)
            && mysql::needs_inspection(shared, svc, identity)
        {
            // Boxed: the login state is large, and most connections never need it.
            Box::pin(mysql::serve_inspected(
                shared,
                svc,
                Origin::ClientStream,
                identity,
                Some(client_tls),
                stream,
                reached,
            ))
            .await;
            return None;
        }
        Some((stream, reached))
    }
    .instrument(span.clone())
    .await;
    started.map(|(stream, reached)| (stream, reached, open.service, span))
}
