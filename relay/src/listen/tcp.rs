//! The TLS-first listener of a service: mutual TLS first, then the service's own protocol
//! (sidecars, and any TCP service). Once the certificate is checked the connection goes through
//! [`forward::reach`] and bytes are spliced, or, when a MySQL service has a user policy, through
//! the relay's MySQL login ([`mysql::serve_inspected`]). A refusal is put in the client's own
//! terms: a MySQL ERR packet for MySQL services (so `mariadb` prints why), a closed connection
//! otherwise.
//!
//! Deadlines count from accept, as the MySQL-native listener's do: the first bytes of the
//! ClientHello must arrive within `first_packet_timeout`, and the TLS handshake must be done
//! within `handshake_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_common::events::Origin;
use postern_common::mysql::server::Deadlines;
use postern_common::pki::Identity;
use postern_common::protocol::Code;
use postern_common::{mysql as codec, net, tls};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::mysql;
use crate::Shared;
use crate::config::Protocol;
use crate::forward::{self, Refusal};

/// Serves one connection accepted on a TLS-first listener.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    service: String,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
) {
    let deadlines = Deadlines::from_accept(
        Instant::now(),
        shared.config().first_packet_timeout,
        shared.config().handshake_timeout,
    );
    let protocol = shared
        .config()
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
    let client_tls = conn
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| tls::kx::group_name(g.name()));
    let reached = match forward::reach(&shared, &service, &identity, peer).await {
        Ok(r) => r,
        Err(r) => {
            refused(Some(&identity), &r);
            refuse(&mut conn, protocol, &r).await;
            return;
        }
    };
    if let Some(svc) = shared.config().services.get(&service)
        && mysql::needs_inspection(&shared, svc, &identity)
    {
        // Boxed: the login state is large, and most connections never need it.
        return Box::pin(mysql::serve_inspected(
            &shared,
            svc,
            Origin::TlsListener,
            &identity,
            client_tls,
            conn,
            reached,
        ))
        .await;
    }
    forward::carry(
        &shared,
        Origin::TlsListener,
        &service,
        &identity,
        client_tls,
        conn,
        reached,
    )
    .await;
}

/// Tells a refused client why, in its protocol's terms, and closes. The caller records the
/// refusal.
async fn refuse<W: AsyncWrite + Unpin>(conn: &mut W, protocol: Protocol, r: &Refusal) {
    if protocol == Protocol::Mysql {
        let _ = conn.write_all(&codec::refusal(r.code, &r.message)).await;
    }
    let _ = conn.shutdown().await;
}
