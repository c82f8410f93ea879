//! `postern-agent connect SERVICE`: a local port that leads to a service through the relay.
//!
//! Like the old `cf tunnel`: it listens on `127.0.0.1:10000` (or `--listen`), and carries every
//! local connection to the relay as one stream of a single session (QUIC or WebSocket, as for
//! agents) authenticated with the user's client certificate. The session is dialled before the
//! first connection is accepted (so a wrong certificate or an unreachable relay is reported at
//! once); the port itself is bound just before, so that a client connecting meanwhile (an app
//! starting next to its sidecar, `--binding`) waits in the backlog rather than being refused.
//!
//! When the session drops (the relay died, restarted or went away), connections on it fail at
//! once with an error, never a clean end, and a new session is dialled in the background with
//! backoff, so the next local connection finds one ready. A relay that is draining (shutting
//! down) refuses new streams with `shutting_down`: the connection is then opened on a fresh
//! session (to another relay instance behind the same address) instead of failing.
//! A refusal becomes a MySQL ERR packet on the local connection, so `mariadb` prints why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postern_common::events::{self, Events, Origin};
use postern_common::protocol::{Answer, Code, Open, Refusal};
use postern_common::transport::{Liveness, Session};
use postern_common::{mysql, net, splice, wire};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::RelayTarget;
use crate::dial::Dialer;

/// Deadline for the relay to answer an open.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// What `connect` needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How to reach relays (certificate, transport choice, WebSocket settings).
    pub dialer: Dialer,
    /// The relay.
    pub relay: RelayTarget,
    /// The service to reach.
    pub service: String,
    /// The local address to listen on.
    pub listen: SocketAddr,
    /// Whether refusals are written as MySQL ERR packets.
    pub mysql: bool,
}

/// A bound `connect` listener with its relay session.
pub struct Connect {
    opts: Arc<Options>,
    listener: TcpListener,
    session: Arc<Mutex<Option<Session>>>,
    /// Refusals and tunnels opened and closed.
    events: Events,
}

impl Connect {
    /// Binds the local port, then dials the relay (nothing is accepted until it answers).
    pub async fn bind(mut opts: Options) -> anyhow::Result<Self> {
        // `connect` has no heartbeat of its own: its sessions notice a dead relay within about
        // three seconds through the transport's keep-alives.
        opts.dialer = opts.dialer.with_liveness(Liveness::CONNECT);
        // The port is bound first: a client that connects while the relay is dialled (an app
        // starting next to its sidecar) waits in the backlog instead of being refused.
        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (choose another address with --listen)",
                opts.listen
            )
        })?;
        let session = dial(&opts).await?;
        Ok(Self {
            events: Events::new(),
            opts: Arc::new(opts),
            listener,
            session: Arc::new(Mutex::new(Some(session))),
        })
    }

    /// This `connect`'s events sink: refusals, tunnels opened and closed.
    pub fn events(&self) -> Events {
        self.events.clone()
    }

    /// The local address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.opts.listen)
    }

    /// Serves local connections until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let redial = tokio::spawn(keep_session(
            self.opts.clone(),
            self.session.clone(),
            shutdown.clone(),
        ));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            net::tune(&tcp);
            let opts = self.opts.clone();
            let session = self.session.clone();
            let events = self.events.clone();
            tokio::spawn(async move { serve(opts, session, events, tcp, peer).await });
        }
        redial.abort();
        if let Some(s) = self.session.lock().await.take() {
            s.close("connect shutting down");
        }
    }
}

/// Re-dials the relay whenever the session drops, with backoff, so that a dead or restarted
/// relay is noticed (by the transport's liveness checks) and replaced before the next local
/// connection needs it.
async fn keep_session(
    opts: Arc<Options>,
    session: Arc<Mutex<Option<Session>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let current = session.lock().await.clone();
        let started = Instant::now();
        if let Some(s) = current {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                why = s.closed() => warn!(relay = %opts.relay, reason = %why, "relay session lost; dialling again"),
            }
        }
        loop {
            let delay = backoff.after(started);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            // A connection that arrived meanwhile may have dialled already.
            if session
                .lock()
                .await
                .as_ref()
                .is_some_and(|s| !s.is_closed())
            {
                break;
            }
            match Box::pin(dial(&opts)).await {
                Ok(fresh) => {
                    *session.lock().await = Some(fresh);
                    backoff.reset();
                    break;
                }
                Err(e) => debug!(error = %e, "relay still unreachable"),
            }
        }
    }
}

async fn serve(
    opts: Arc<Options>,
    session: Arc<Mutex<Option<Session>>>,
    events: Events,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    // Boxed: opening (and maybe dialling) takes far more state than carrying bytes, which is
    // all an idle connection does.
    let mut stream = match Box::pin(open(&opts, &session)).await {
        Ok(s) => s,
        Err(r) => {
            events.refused(Origin::Connect, Some(peer), Some(&opts.service), None, &r);
            if opts.mysql {
                let _ = tcp.write_all(&mysql::refusal(r.code, &r.message)).await;
            }
            let _ = tcp.shutdown().await;
            return;
        }
    };
    let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let mut record = events::Tunnel::new(
        Origin::Connect,
        conn_id,
        &opts.service,
        &opts.relay.to_string(),
    );
    record.client_addr = Some(peer);
    record.transport = Some(stream.kind().as_str());
    let tunnel = record.open(&events);
    let (up, down, failure) = match splice::splice(&mut tcp, &mut stream).await {
        Ok(t) => (t.a_to_b, t.b_to_a, None),
        Err(e) => {
            stream.abort();
            net::reset_on_close(&tcp);
            (
                e.transferred.a_to_b,
                e.transferred.b_to_a,
                Some(e.to_string()),
            )
        }
    };
    tunnel.closed(&events, up, down, failure);
}

/// Numbers local connections, for the events of this process.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

async fn open(
    opts: &Options,
    session: &Mutex<Option<Session>>,
) -> Result<postern_common::transport::Stream, Refusal> {
    match open_on(opts, session, false).await {
        // The relay is draining: this connection goes to a fresh session (another instance).
        Err(r) if r.code == Code::ShuttingDown => {
            debug!(reason = %r.message, "relay draining: opening on a new session");
            open_on(opts, session, true).await
        }
        other => other,
    }
}

/// Opens a stream for the service on the live session (or a new one when it has dropped, or
/// when `fresh`), and waits for the relay's answer.
async fn open_on(
    opts: &Options,
    session: &Mutex<Option<Session>>,
    fresh: bool,
) -> Result<postern_common::transport::Stream, Refusal> {
    let current = {
        let mut guard = session.lock().await;
        match guard.as_ref() {
            Some(s) if !s.is_closed() && !fresh => s.clone(),
            _ => {
                // Boxed: dialling carries a whole handshake's state; idle connections must not.
                let new = Box::pin(dial(opts)).await.map_err(|e| {
                    Refusal::new(Code::NoAgent, format!("cannot reach the relay: {e:#}"))
                })?;
                // The draining session keeps the connections it carries until they end.
                *guard = Some(new.clone());
                new
            }
        }
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        Refusal::new(Code::NoAgent, format!("relay connection failed: {e}"))
    };
    let mut stream = current.open().await.map_err(|e| unreachable(&e))?;
    let open = Open::for_service(opts.service.clone());
    wire::write_first(&mut stream, &open)
        .await
        .map_err(|e| unreachable(&e))?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, wire::read_first::<_, Answer>(&mut stream))
        .await
        .map_err(|_| unreachable(&"no answer from the relay in time"))?
        .map_err(|e| unreachable(&e))?;
    match answer {
        Answer::Ok { .. } => Ok(stream),
        Answer::Refused { code, message } => Err(Refusal::new(code, message)),
    }
}

/// Why the relay did not confirm our certificate.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{0}")]
    Open(#[source] postern_common::transport::TransportError),
    #[error("{0}")]
    Frame(#[source] wire::WireError),
}

async fn dial(opts: &Options) -> anyhow::Result<Session> {
    let session = opts
        .dialer
        .dial(&opts.relay)
        .await
        .map_err(|e| anyhow::anyhow!("relay {}: {e}", opts.relay))?;
    // In TLS 1.3 our handshake completes before the relay has checked our certificate: ask it
    // once (an open for no service) so a refused certificate is reported now, not per connection.
    let probe = async {
        let mut stream = session.open().await.map_err(ProbeError::Open)?;
        let open = Open::for_service("");
        wire::write_first(&mut stream, &open)
            .await
            .map_err(ProbeError::Frame)?;
        wire::read_first::<_, Answer>(&mut stream)
            .await
            .map_err(ProbeError::Frame)
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, probe).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let why = match tokio::time::timeout(Duration::from_secs(1), session.closed()).await {
                Ok(why) => why.to_string(),
                Err(_) => e.to_string(),
            };
            anyhow::bail!("relay {} refused the session: {why}", opts.relay);
        }
        Err(_) => anyhow::bail!("relay {} did not answer", opts.relay),
    }
    info!(relay = %opts.relay, transport = %session.kind(), key_exchange = session.key_exchange(), "connected to relay");
    Ok(session)
}
