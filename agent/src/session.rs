//! One session with a relay: the hello and welcome, the streams the relay opens, heartbeats,
//! and how the session ends.
//!
//! A session ends in one of four ways (`Outcome`):
//! * it breaks (the relay went away, a heartbeat was missed, the relay closed it): the
//!   supervisor reconnects with backoff;
//! * the relay drains ([`Control::Drain`], it is shutting down): the supervisor opens the next
//!   session at once, while this one keeps serving the streams it carries until they end or the
//!   relay closes it (make before break);
//! * QUIC works again while this session is on WebSocket (`crate::takeover`): new streams move
//!   to the QUIC session, and this one finishes the streams it carries;
//! * the agent shuts down: it tells the relay (a drain of its own, so no new stream is routed
//!   here), lets the streams finish within the grace period, then closes.

use std::sync::Arc;
use std::time::Duration;

use postern_common::control::{self, ControlEnd};
use postern_common::protocol::{
    self, Code, Control, FEATURE_BACKENDS, FEATURE_DRAIN, FEATURE_MYSQL_E2E, FEATURE_PROBE,
    FEATURE_USERS, Rejected, ServiceState,
};
use postern_common::transport::addr::RelayUrl;
use postern_common::transport::{CloseReason, Session, Stream, TransportError, TransportKind};
use postern_common::wire::{self, WireError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::config::Config;
use crate::e2e::EndToEnd;
use crate::forward;
use crate::state::{AgentState, Status};
use crate::takeover;

/// How often the services' state goes to the relay even when nothing changed (fresh
/// connection counts).
const STATE_INTERVAL: Duration = Duration::from_secs(2);

/// Deadline for the relay's welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the agent's own shutdown lets streams finish, as the relay does.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The relay could not be reached.
    #[error(transparent)]
    Dial(#[from] crate::dial::DialError),
    /// The control stream could not be opened.
    #[error("open control stream: {0}")]
    Open(#[source] TransportError),
    /// The hello could not be sent.
    #[error("send hello: {0}")]
    Hello(#[source] WireError),
    /// No answer to the hello.
    #[error("relay did not answer the hello in time")]
    WelcomeTimeout,
    /// The relay refused the session.
    #[error("relay refused this agent ({code}): {message}")]
    Refused {
        /// Why, as a stable code.
        code: Code,
        /// Why, in words.
        message: String,
    },
    /// The relay answered with something that is not a welcome.
    #[error("unexpected answer to hello: {0}")]
    Unexpected(&'static str),
    /// The relay closed the session instead of answering (a refused certificate shows so).
    #[error("relay: {0}")]
    Closed(CloseReason),
    /// The answer could not be read.
    #[error("relay answer: {0}")]
    Answer(#[source] WireError),
}

/// What the relay said in its welcome.
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub(crate) version: u16,
    pub(crate) relay_instance: String,
    pub(crate) accepted: Vec<String>,
    pub(crate) rejected: Vec<Rejected>,
    /// The relay's heartbeat interval, bounded.
    pub(crate) heartbeat: Duration,
    pub(crate) app_guid: Option<String>,
    /// The relay understands [`Control::Drain`].
    pub(crate) drains: bool,
    /// The relay takes [`Control::State`] and may send [`Control::Command`].
    pub(crate) backends: bool,
    /// The relay answered a probe ([`FEATURE_PROBE`]): it did not register this session.
    pub(crate) probe: bool,
}

/// A session whose hello and welcome are done.
pub(crate) struct Ready {
    pub(crate) session: Session,
    pub(crate) control: Stream,
    pub(crate) welcome: Welcome,
}

/// How a served session ended.
pub(crate) enum Outcome {
    /// The session is over.
    Ended(ControlEnd),
    /// A better session (QUIC, found while on WebSocket) took over; the old one finishes its
    /// streams in the background.
    Moved(Box<Ready>),
    /// The relay is draining: open the next session now; the old one finishes its streams in
    /// the background.
    Drained,
}

/// Opens the control stream and exchanges hello and welcome. `take_over`: this session
/// replaces a live one of this agent at the same relay, which should finish its streams.
pub(crate) async fn handshake(
    state: &AgentState,
    session: &Session,
    take_over: bool,
) -> Result<Ready, SessionError> {
    hello(&state.config(), session, take_over, false).await
}

/// [`handshake`] for an agent with `config`. `probe`: only ask whether the relay would accept
/// this agent ([`FEATURE_PROBE`], `postern-agent diagnose`); the relay registers nothing.
pub(crate) async fn hello(
    config: &Config,
    session: &Session,
    take_over: bool,
    probe: bool,
) -> Result<Ready, SessionError> {
    let mut stream = session.open().await.map_err(SessionError::Open)?;
    let mut features = features(config);
    if probe {
        features.push(FEATURE_PROBE.to_owned());
    }
    let hello = Control::Hello {
        versions: protocol::VERSIONS.to_vec(),
        services: config.services.keys().cloned().collect(),
        software: env!("CARGO_PKG_VERSION").to_owned(),
        take_over,
        features,
    };
    wire::write_first(&mut stream, &hello)
        .await
        .map_err(SessionError::Hello)?;
    let answer = tokio::time::timeout(WELCOME_TIMEOUT, wire::read_frame::<_, Control>(&mut stream))
        .await
        .map_err(|_| SessionError::WelcomeTimeout)?;
    let welcome = match answer {
        Ok(Control::Welcome {
            version,
            relay_instance,
            accepted,
            rejected,
            heartbeat_ms,
            app_guid,
            features,
            ..
        }) => Welcome {
            version,
            relay_instance,
            accepted,
            rejected,
            // The relay chooses the interval; a wrong one must not overflow our timers or make
            // them spin.
            heartbeat: control::clamp_interval(Duration::from_millis(heartbeat_ms)),
            app_guid,
            drains: features.iter().any(|f| f == FEATURE_DRAIN),
            backends: features.iter().any(|f| f == FEATURE_BACKENDS),
            probe: features.iter().any(|f| f == FEATURE_PROBE),
        },
        Ok(Control::Refused { code, message }) => {
            return Err(SessionError::Refused { code, message });
        }
        Ok(_) => return Err(SessionError::Unexpected("not a welcome")),
        Err(e) => {
            // A refused identity shows as a closed connection; say why if the relay said.
            return Err(
                match tokio::time::timeout(Duration::from_secs(1), session.closed()).await {
                    Ok(why) => SessionError::Closed(why),
                    Err(_) => SessionError::Answer(e),
                },
            );
        }
    };
    Ok(Ready {
        session: session.clone(),
        control: stream,
        welcome,
    })
}

/// The features this agent announces in its hello: [`FEATURE_USERS`] only when some service
/// makes per-binding users, so the relay sends admin streams only where they can be served.
pub(crate) fn features(config: &Config) -> Vec<String> {
    let mut features = vec![
        FEATURE_MYSQL_E2E.to_owned(),
        FEATURE_DRAIN.to_owned(),
        FEATURE_BACKENDS.to_owned(),
    ];
    if config.services.values().any(|s| s.users.is_some()) {
        features.push(FEATURE_USERS.to_owned());
    }
    features
}

/// Serves one session until it ends (see [`Outcome`]). With `quic_probe`, a WebSocket session
/// also tries QUIC every `quic_reprobe` and moves to it once it works.
pub(crate) async fn serve(
    state: &Arc<AgentState>,
    ready: Ready,
    quic_probe: Option<&RelayUrl>,
    shutdown: &CancellationToken,
) -> Outcome {
    let Ready {
        session,
        control,
        welcome,
    } = ready;
    for r in &welcome.rejected {
        error!(service = %r.service, reason = %r.reason, "relay refused a service this agent offers");
    }
    info!(relay_instance = %welcome.relay_instance, transport = %session.kind(), key_exchange = session.key_exchange(), version = welcome.version, services = ?welcome.accepted, "connected to relay");
    state.status.send_replace(Status::Connected {
        relay_instance: welcome.relay_instance.clone(),
        transport: session.kind(),
        accepted: welcome.accepted.clone(),
    });

    // This session's streams are tracked so that it can finish them before it closes; all
    // streams of all sessions are tracked by the agent, for its own shutdown.
    let tracker = TaskTracker::new();
    let policy = Arc::new(EndToEnd::new(&state.config()));
    let streams = {
        let (session, tracker, state) = (session.clone(), tracker.clone(), state.clone());
        let policy = policy.clone();
        tokio::spawn(async move {
            while let Ok(stream) = session.accept().await {
                let serve = forward::serve(state.clone(), policy.clone(), stream);
                tracker.spawn(state.forwards.track_future(serve));
            }
        })
    };
    let (outgoing, outgoing_rx) = mpsc::channel(4);
    let (drained_tx, drained) = oneshot::channel::<String>();
    let mut drained_tx = Some(drained_tx);
    let stop = CancellationToken::new();
    let reports = welcome.backends.then(|| {
        tokio::spawn(report_state(
            state.clone(),
            welcome.accepted.clone(),
            outgoing.clone(),
        ))
    });
    let commands = state.clone();
    let mut keepalive = tokio::spawn(control::run(
        control,
        welcome.heartbeat,
        stop.clone(),
        outgoing_rx,
        move |msg| match msg {
            Control::Policy { services, crl_pem } => {
                policy.apply(services, crl_pem);
                Ok(())
            }
            Control::Drain { reason, .. } => {
                if let Some(tx) = drained_tx.take() {
                    let _ = tx.send(reason);
                }
                Ok(())
            }
            Control::Command { command } => {
                info!(?command, "operator command from the relay");
                commands.backends.command(command);
                Ok(())
            }
            other => Err(Box::new(other)),
        },
    ));
    // The reports end with the control stream (their channel closes), or here.
    let _reports = reports.map(AbortOnDrop);
    let probe = async {
        match quic_probe {
            Some(url) if session.kind() == TransportKind::Websocket => {
                takeover::probe_quic(state, url).await
            }
            _ => std::future::pending().await,
        }
    };
    let linger = Linger {
        session: session.clone(),
        tracker,
        streams,
        stop,
    };
    // A reload that changed the hello renews the session (it began with the config in force).
    let mut rehello = state.rehello.subscribe();
    tokio::select! {
        end = &mut keepalive => {
            let end = end.unwrap_or_else(|e| ControlEnd::Broken(format!("heartbeat task failed: {e}")));
            linger.streams.abort();
            session.close(&end.to_string());
            Outcome::Ended(end)
        }
        why = session.closed() => {
            linger.streams.abort();
            linger.stop.cancel();
            Outcome::Ended(ControlEnd::Broken(why.to_string()))
        }
        next = probe => {
            info!(transport = %next.session.kind(), "quic works again: new streams move to it; the websocket session finishes its streams");
            tokio::spawn(linger.finish(keepalive, state.abort.clone(), "moved to quic"));
            Outcome::Moved(Box::new(next))
        }
        Ok(()) = rehello.changed() => {
            info!(relay_instance = %welcome.relay_instance, "configuration reloaded: opening a new session with it; this one finishes its streams");
            tokio::spawn(linger.finish(keepalive, state.abort.clone(), "agent configuration reloaded"));
            Outcome::Drained
        }
        Ok(reason) = drained => {
            info!(relay_instance = %welcome.relay_instance, %reason, "relay is draining: opening the next session now; this one finishes its streams");
            tokio::spawn(linger.finish(keepalive, state.abort.clone(), "relay drained"));
            Outcome::Drained
        }
        _ = shutdown.cancelled() => {
            if welcome.drains {
                let drain = Control::Drain {
                    reason: "agent shutting down".into(),
                    grace_ms: u64::try_from(SHUTDOWN_GRACE.as_millis()).unwrap_or(u64::MAX),
                };
                let _ = outgoing.send(drain).await;
            }
            // The relay routes nothing new here now; what is open may finish.
            linger.finish(keepalive, state.abort.clone(), "agent shutting down").await;
            Outcome::Ended(ControlEnd::Shutdown)
        }
    }
}

/// Sends the state of the `accepted` services to the relay: now, whenever it changes, and every
/// [`STATE_INTERVAL`]; until the control stream ends.
async fn report_state(
    state: Arc<AgentState>,
    accepted: Vec<String>,
    outgoing: mpsc::Sender<Control>,
) {
    let mut changed = state.backends.subscribe();
    let mut tick = tokio::time::interval(STATE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = fit_frame(state.backends.states(&accepted));
        if outgoing.send(message).await.is_err() {
            return;
        }
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {}
        }
    }
}

/// A [`Control::State`] that fits in one frame: with many nodes and long reasons, the words
/// go first, then whole services from the end (counts and health matter more than prose).
fn fit_frame(mut services: Vec<ServiceState>) -> Control {
    let fits = |s: &Vec<ServiceState>| {
        let c = Control::State {
            services: s.clone(),
        };
        serde_json::to_vec(&c).is_ok_and(|b| b.len() + 64 <= protocol::MAX_FRAME)
    };
    if fits(&services) {
        return Control::State { services };
    }
    for s in &mut services {
        s.reason = s.reason.chars().take(200).collect();
        for n in &mut s.nodes {
            n.last_transition.clear();
            if let Some(c) = &mut n.last_check {
                c.detail = c.detail.chars().take(20).collect();
            }
        }
    }
    while !fits(&services) && services.pop().is_some() {}
    // Once per process: it repeats every report, and the cause is the config.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            services = services.len(),
            "service state too large for one frame: reasons trimmed, and services left out"
        );
    }
    Control::State { services }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A session that takes no new streams and closes once the ones it carries are done.
struct Linger {
    session: Session,
    tracker: TaskTracker,
    streams: JoinHandle<()>,
    stop: CancellationToken,
}

impl Linger {
    /// Waits for the session's streams to end (or the session to close, or `abort`), keeping
    /// its heartbeats going meanwhile, then closes it with `reason`.
    async fn finish(
        self,
        keepalive: JoinHandle<ControlEnd>,
        abort: CancellationToken,
        reason: &'static str,
    ) {
        // Nothing new is routed here once the relay has read our drain (or routed new streams
        // to the session that took over); a stream that raced it is still served, and waited
        // for like the others.
        self.tracker.close();
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = self.session.closed() => {}
            _ = abort.cancelled() => {}
        }
        self.streams.abort();
        self.stop.cancel();
        let _ = keepalive.await;
        self.session.close(reason);
    }
}
