//! Client front ends: per-service listeners, and `connect` clients over QUIC.
//!
//! A service listener is either MySQL-native (served by [`crate::listen::mysql`]) or TLS-first.
//! The TLS-first listeners and `connect` streams end in `forward::reach` and then splice bytes,
//! or, when a MySQL service has a user policy, go through the relay's MySQL login
//! (`listen::mysql::serve_inspected`). A refusal is put in the client's own terms: a MySQL ERR
//! packet for MySQL services (so `mariadb` prints why), a refusal frame for `connect` clients
//! (which turn it into an ERR packet locally).
//!
//! A TLS-first connection's deadlines count from accept, as the MySQL-native listener's do: the
//! first bytes of its ClientHello must arrive within `first_packet_timeout`, and the TLS
//! handshake must be done within `handshake_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_common::events::Origin;
use postern_common::mysql::server::Deadlines;
use postern_common::pki::Identity;
use postern_common::protocol::{Answer, Code, Open};
use postern_common::transport::{Session, Stream};
use postern_common::{mysql, net, splice, tls, wire};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Shared;
use crate::config::Protocol;
use crate::forward::{self, Refusal};
use crate::listen::mysql as mysql_listener;

/// What a service listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// MySQL with TLS negotiated in-band (the `listen` address of a MySQL service).
    Mysql,
    /// TLS first, then the service's protocol (`tls_listen`, or `listen` of a TCP service).
    Tls,
}

impl ListenerKind {
    /// The name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mysql => "mysql",
            Self::Tls => "tls",
        }
    }
}

/// Accepts connections on one service listener until shutdown.
pub(crate) async fn listen(
    shared: Arc<Shared>,
    service: String,
    kind: ListenerKind,
    listener: TcpListener,
    acceptor: TlsAcceptor,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(service = %service, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        net::tune(&tcp);
        let span = info_span!(
            "client",
            service = %service,
            peer = %peer,
            listener = kind.as_str(),
            conn_id = tracing::field::Empty,
            agent = tracing::field::Empty,
            client = tracing::field::Empty,
        );
        let (shared2, service2, acceptor2) = (shared.clone(), service.clone(), acceptor.clone());
        match kind {
            ListenerKind::Mysql => shared.connections.spawn(
                mysql_listener::serve(shared2, service2, tcp, peer, acceptor2).instrument(span),
            ),
            ListenerKind::Tls => shared
                .connections
                .spawn(serve_tls(shared2, service2, tcp, peer, acceptor2).instrument(span)),
        };
    }
}

async fn serve_tls(
    shared: Arc<Shared>,
    service: String,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
) {
    let deadlines = Deadlines::from_accept(
        Instant::now(),
        shared.config.first_packet_timeout,
        shared.config.handshake_timeout,
    );
    let protocol = shared
        .config
        .services
        .get(&service)
        .map(|s| s.protocol)
        .unwrap_or_default();
    let refused = |identity: Option<&Identity>, r: &Refusal| {
        let identity = identity.map(Identity::uri);
        shared.events.refused(
            Origin::TlsListener,
            Some(peer),
            Some(&service),
            identity.as_deref(),
            r,
        );
    };
    let timed_out =
        |step: &str| Refusal::new(Code::BadRequest, format!("timed out waiting for {step}"));
    // A silent socket is dropped soon: the ClientHello's first bytes come at once from a real
    // client.
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadlines.first_packet, tcp.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => {
            debug!("client went away before its TLS handshake");
            return;
        }
        Err(_) => {
            refused(None, &timed_out("the TLS ClientHello"));
            net::reset_on_close(&tcp);
            return;
        }
    }
    let handshake = tokio::time::timeout_at(deadlines.handshake, tls::accept(&acceptor, tcp)).await;
    let mut conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let r = Refusal::new(
                Code::NotAuthorized,
                format!(
                    "tls handshake failed: {}",
                    tls::describe_handshake_error(&e)
                ),
            );
            refused(None, &r);
            return;
        }
        Err(_) => {
            refused(None, &timed_out("the TLS handshake"));
            return;
        }
    };
    let identity = match tls::peer_identity(conn.get_ref().1.peer_certificates()) {
        Ok(Identity::Client(n)) => Identity::Client(n),
        Ok(other) => {
            let r = Refusal::new(
                Code::NotAuthorized,
                format!("{other} is not a client identity"),
            );
            refused(None, &r);
            refuse(&mut conn, protocol, &r).await;
            return;
        }
        Err(e) => {
            let r = Refusal::new(Code::NotAuthorized, e.to_string());
            refused(None, &r);
            refuse(&mut conn, protocol, &r).await;
            return;
        }
    };
    let mut reached = match forward::reach(&shared, &service, &identity, peer).await {
        Ok(r) => r,
        Err(r) => {
            refused(Some(&identity), &r);
            refuse(&mut conn, protocol, &r).await;
            return;
        }
    };
    info!(client = %identity, conn_id = reached.conn_id, agent = %reached.agent, backend = %reached.backend, "client connected");
    if let Some(svc) = shared.config.services.get(&service)
        && mysql_listener::needs_inspection(svc, &identity)
    {
        // Boxed: the login state is large, and most connections never need it.
        return Box::pin(mysql_listener::serve_inspected(
            &shared,
            svc,
            Origin::TlsListener,
            Some(peer),
            &identity,
            conn,
            reached,
        ))
        .await;
    }
    match splice::splice(&mut conn, &mut reached.stream).await {
        Ok(t) => debug!(
            conn_id = reached.conn_id,
            up = t.a_to_b,
            down = t.b_to_a,
            "client disconnected"
        ),
        Err(e) => {
            debug!(conn_id = reached.conn_id, error = %e, "connection failed");
            reached.stream.abort();
            net::reset_on_close(conn.get_ref().0);
        }
    }
}

/// Tells a refused client why, in its protocol's terms, and closes. The caller records the
/// refusal.
async fn refuse<W: AsyncWrite + Unpin>(conn: &mut W, protocol: Protocol, r: &Refusal) {
    if protocol == Protocol::Mysql {
        let _ = conn.write_all(&mysql::refusal(r.code, &r.message)).await;
    }
    let _ = conn.shutdown().await;
}

/// Serves a `connect` client session: every stream it opens is one client connection. While
/// the relay drains, the streams it has go on and new ones are refused as `shutting_down`
/// (`connect` then opens them on a new session, to another instance); at the end of the grace
/// period the session closes.
pub(crate) async fn serve_session(shared: Arc<Shared>, session: Session, name: String) {
    info!(client = %name, remote = %session.remote(), transport = %session.kind(), "client session connected");
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
                stream,
            )
            .instrument(span),
        );
    }
}

/// Answers a stream opened while the relay drains: `shutting_down`.
async fn refuse_draining(shared: Arc<Shared>, mut stream: Stream) {
    let open = tokio::time::timeout(
        shared.config.handshake_timeout,
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
            shared.config.instance
        ),
    );
    debug!(reason = %refusal.message, "stream refused while draining");
    let _ = wire::write_first(&mut stream, &refusal.answer()).await;
    let _ = stream.shutdown().await;
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: SocketAddr,
    identity: Identity,
    mut stream: Stream,
) {
    let open = tokio::time::timeout(
        shared.config.handshake_timeout,
        wire::read_first::<_, Open>(&mut stream),
    )
    .await;
    let open = match open {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            warn!(error = %e, "refused client stream: bad open frame");
            stream.abort();
            return;
        }
        Err(_) => {
            warn!("refused client stream: no open frame within the handshake timeout");
            stream.abort();
            return;
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
        return;
    }
    let span = info_span!("stream", service = %open.service);
    async move {
        let mut reached = match forward::reach(&shared, &open.service, &identity, peer).await {
            Ok(r) => r,
            Err(r) => {
                warn!(code = %r.code, reason = %r.message, "refused client");
                let answer = Answer::Refused { code: r.code, message: r.message };
                let _ = wire::write_first(&mut stream, &answer).await;
                let _ = stream.shutdown().await;
                return;
            }
        };
        let ok = Answer::Ok { backend: reached.backend.clone() };
        if wire::write_first(&mut stream, &ok).await.is_err() {
            reached.stream.abort();
            return;
        }
        info!(conn_id = reached.conn_id, agent = %reached.agent, backend = %reached.backend, "client connected");
        if let Some(svc) = shared.config.services.get(&open.service)
            && mysql_listener::needs_inspection(svc, &identity)
        {
            // Boxed: the login state is large, and most connections never need it.
            return Box::pin(mysql_listener::serve_inspected(
                &shared,
                svc,
                Origin::ClientStream,
                Some(peer),
                &identity,
                stream,
                reached,
            ))
            .await;
        }
        match splice::splice(&mut stream, &mut reached.stream).await {
            Ok(t) => debug!(conn_id = reached.conn_id, up = t.a_to_b, down = t.b_to_a, "client disconnected"),
            Err(e) => {
                debug!(conn_id = reached.conn_id, error = %e, "connection failed");
                reached.stream.abort();
                stream.abort();
            }
        }
    }
    .instrument(span)
    .await
}
