//! Agent sessions: the hello, the welcome, heartbeats, and registration in the [`Registry`].
//!
//! [`Registry`]: crate::registry::Registry

use std::sync::Arc;

use postern_common::control::{self, ControlEnd};
use postern_common::events::Origin;
use postern_common::protocol::{
    self, Code, Control, FEATURE_BACKENDS, FEATURE_DRAIN, FEATURE_MYSQL_E2E, FEATURE_PROBE,
    FEATURE_USERS, MAX_FRAME, Refusal, Rejected,
};
use postern_common::transport::Session;
use postern_common::wire;
use tracing::{debug, info, warn};

use crate::Shared;

/// Why an agent's control stream did not start with a hello.
#[derive(Debug, thiserror::Error)]
enum HelloError {
    /// No control stream.
    #[error("{0}")]
    Stream(#[source] postern_common::transport::TransportError),
    /// Not a frame.
    #[error("{0}")]
    Frame(#[source] wire::WireError),
    /// Nothing in time.
    #[error("no hello within the handshake timeout")]
    Timeout,
}

/// How many messages (commands, policies, a drain) may wait for an agent's control stream;
/// past that, operators' commands are refused rather than queued without bound.
const COMMANDS_QUEUED: usize = 16;

/// Serves one agent session until it ends.
pub(crate) async fn serve(shared: Arc<Shared>, session: Session, name: String) {
    // Refusals a peer with a valid certificate can cause go to the events sink (counted, and
    // logged within a budget), as every refusal does.
    let refused = |code: Code, message: &str| {
        let identity = postern_common::pki::Identity::Agent(name.clone()).uri();
        shared.events.refused(
            Origin::AgentSession,
            Some(session.remote()),
            None,
            Some(&identity),
            &Refusal::new(code, message),
        );
    };
    // The config in force when the agent came: a reload that changes what it may offer asks it
    // for a new session ([`crate::registry::Registry::realign`]).
    let config = shared.config();
    let Some(allowed) = config.agents.get(&name) else {
        refused(
            Code::NotAuthorized,
            "agent identity is not listed under agents in the relay config",
        );
        session.close("agent identity is not known to this relay");
        return;
    };

    // The first stream the agent opens is its control stream, and it starts with a hello.
    let deadline = config.handshake_timeout;
    let hello = tokio::time::timeout(deadline, async {
        let mut stream = session.accept().await.map_err(HelloError::Stream)?;
        let hello = wire::read_first::<_, Control>(&mut stream)
            .await
            .map_err(HelloError::Frame)?;
        Ok((stream, hello))
    })
    .await
    .unwrap_or(Err(HelloError::Timeout));
    let (mut stream, hello) = match hello {
        Ok(h) => h,
        Err(e) => {
            refused(Code::BadRequest, &format!("bad control stream: {e}"));
            session.close(&format!("bad control stream: {e}"));
            return;
        }
    };
    let Control::Hello {
        versions,
        services,
        software,
        take_over,
        features,
    } = hello
    else {
        refused(Code::BadRequest, "first control message is not a hello");
        session.close("first control message must be a hello");
        return;
    };
    let Some(version) = protocol::negotiate(&versions) else {
        let message = format!(
            "no common protocol version: agent speaks {versions:?}, relay speaks {:?}",
            protocol::VERSIONS
        );
        refused(Code::UnsupportedVersion, &message);
        let answer = Control::Refused {
            code: Code::UnsupportedVersion,
            message: message.clone(),
        };
        let _ = wire::write_frame(&mut stream, &answer).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        // Give the refusal time to arrive: the agent closes the session once it has read it.
        let _ = tokio::time::timeout(deadline, session.closed()).await;
        session.close(&message);
        return;
    };

    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    let offered = services.clone();
    for s in services {
        if allowed.contains(&s) && config.services.contains_key(&s) {
            accepted.push(s);
        } else {
            let reason = if config.services.contains_key(&s) {
                format!("agent {name} may not offer service {s:?} (see agents.{name}.services)")
            } else {
                format!("service {s:?} is not defined on this relay")
            };
            warn!(agent = %name, service = %s, %reason, "rejected service offered by agent");
            rejected.push(Rejected { service: s, reason });
        }
    }
    let welcome = Control::Welcome {
        version,
        relay_instance: config.instance.clone(),
        accepted: accepted.clone(),
        rejected,
        heartbeat_ms: config.heartbeat.as_millis() as u64,
        app_guid: config.platform.as_ref().map(|p| p.app_guid.clone()),
        instance_index: config.platform.as_ref().map(|p| p.instance_index),
        features: vec![FEATURE_DRAIN.to_owned(), FEATURE_BACKENDS.to_owned()],
    };
    if features.iter().any(|f| f == FEATURE_PROBE) {
        answer_probe(&session, stream, welcome, deadline).await;
        info!(agent = %name, remote = %session.remote(), transport = %session.kind(), services = ?accepted, %software, "agent checked that it would be accepted (probe, not registered)");
        return;
    }
    // Register before the welcome: the agent reports itself connected as soon as it reads the
    // welcome, and a client routed to it from then on must find it. An agent that ends TLS
    // waits for its first policy (sent next) before serving such a stream.
    let mysql_e2e = features.iter().any(|f| f == FEATURE_MYSQL_E2E);
    let generation = shared.registry.insert(
        &name,
        session.clone(),
        accepted.clone(),
        take_over,
        mysql_e2e,
    );
    if features.iter().any(|f| f == FEATURE_USERS) {
        shared.registry.set_users(&name, generation);
    }
    let mut changes = shared.access.changes();
    let greeted = async {
        wire::write_frame(&mut stream, &welcome).await?;
        if mysql_e2e {
            wire::write_frame(&mut stream, &policy_for(&shared, &name, &accepted)).await?;
        }
        Ok::<_, wire::WireError>(())
    };
    if let Err(e) = greeted.await {
        debug!(agent = %name, error = %e, "agent left during welcome");
        shared.registry.remove(&name, generation);
        session.close("agent left during welcome");
        return;
    }
    info!(agent = %name, remote = %session.remote(), transport = %session.kind(), key_exchange = session.key_exchange(), services = ?accepted, %software, "agent connected");
    crate::listen::mysql::prefetch_greetings(&shared, &accepted);

    // Agents do not open further streams; refuse any that appear so they cannot pile up.
    let extra = {
        let session = session.clone();
        let name = name.clone();
        tokio::spawn(async move {
            while let Ok(mut s) = session.accept().await {
                debug!(agent = %name, "agent opened an unexpected stream: reset");
                s.abort();
            }
        })
    };

    // Agents that end TLS get the policy again whenever the revocation lists change; agents
    // that report their nodes take operators' commands on the same stream.
    let (policy_tx, outgoing) = tokio::sync::mpsc::channel(COMMANDS_QUEUED);
    let backends = features.iter().any(|f| f == FEATURE_BACKENDS);
    if backends {
        shared
            .registry
            .set_commands(&name, generation, policy_tx.clone());
    }
    // When the relay drains, agents that understand it are told at once, so they open their
    // next session (to another instance) while this one finishes its streams. A reload that
    // changes what the agent may offer tells it the same way.
    let drains = features.iter().any(|f| f == FEATURE_DRAIN);
    shared.registry.set_hello(
        &name,
        generation,
        offered,
        drains.then(|| policy_tx.clone()),
    );
    let drain = drains.then(|| {
        let (shared, tx) = (shared.clone(), policy_tx.clone());
        tokio::spawn(async move {
            shared.stop.cancelled().await;
            let grace_ms = u64::try_from(crate::SHUTDOWN_GRACE.as_millis()).unwrap_or(u64::MAX);
            let _ = tx
                .send(Control::Drain {
                    reason: format!("relay {} shutting down", shared.config().instance),
                    grace_ms,
                })
                .await;
        })
    });
    let policies = mysql_e2e.then(|| {
        let shared = shared.clone();
        let accepted = accepted.clone();
        let name = name.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if policy_tx
                    .send(policy_for(&shared, &name, &accepted))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    });
    let keepalive = control::run(
        stream,
        config.heartbeat,
        // Heartbeats go on while the relay drains: the agent's open streams still need the
        // session. Only the end of the grace period ends it.
        shared.abort.clone(),
        outgoing,
        |msg| match msg {
            // The agent is shutting down: route nothing new to it; its streams finish.
            Control::Drain { reason, .. } => {
                info!(agent = %name, %reason, "agent draining: no new connections go to it");
                shared.registry.drain(&name, generation);
                Ok(())
            }
            // Its view of its services: replaces the previous one whole.
            Control::State { services } if backends => {
                shared
                    .cluster
                    .report(&name, generation, &accepted, services);
                Ok(())
            }
            other => Err(Box::new(other)),
        },
    );
    let end = tokio::select! {
        end = keepalive => end,
        why = session.closed() => ControlEnd::Broken(why.to_string()),
    };
    extra.abort();
    for task in [policies, drain].into_iter().flatten() {
        task.abort();
    }
    shared.registry.remove(&name, generation);
    shared.cluster.forget(&name, generation);
    // A session that is already closed (by the peer, by a failure, or by the registry when a
    // new session of this agent replaced it) keeps the reason it closed with.
    match &end {
        _ if session.is_closed() => {}
        ControlEnd::Shutdown => session.close("relay shutting down"),
        other => session.close(&other.to_string()),
    }
    info!(agent = %name, reason = %end, "agent disconnected");
}

/// Answers a probe (`postern-agent diagnose`) with the welcome the agent would get, listing
/// [`FEATURE_PROBE`], and registers nothing: a running agent of the same identity keeps its
/// session. The agent closes the session once it has read the welcome (or `deadline` passes).
async fn answer_probe(
    session: &Session,
    mut stream: postern_common::transport::Stream,
    mut welcome: Control,
    deadline: std::time::Duration,
) {
    if let Control::Welcome { features, .. } = &mut welcome {
        features.push(FEATURE_PROBE.to_owned());
    }
    if wire::write_frame(&mut stream, &welcome).await.is_ok() {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        let _ = tokio::time::timeout(deadline, session.closed()).await;
    }
    session.close("probe answered");
}

/// The policy for agent `name`: its end-to-end services' rules, and this relay's revocation
/// lists, both from [`crate::access`].
///
/// The lists travel in the same frame, within [`MAX_FRAME`] (a Postern list with a thousand
/// entries is about 40 KiB). Lists that do not fit, or cannot be read, are not cut: the agent
/// gets no services, refuses end-to-end clients, and the operator is told, since admitting a
/// revoked certificate would be worse than refusing everyone.
fn policy_for(shared: &Shared, name: &str, accepted: &[String]) -> Control {
    let config = shared.config();
    let services: Vec<&crate::config::Service> = accepted
        .iter()
        .filter_map(|s| config.services.get(s))
        .filter(|s| s.tls_termination == crate::config::TlsTermination::Agent)
        .collect();
    let none = Control::Policy {
        services: Vec::new(),
        crl_pem: None,
    };
    let (services, crl_pem) = match shared.access.agent_policy(
        &services,
        config.handshake_timeout,
        config.first_packet_timeout,
    ) {
        Ok(p) => p,
        Err(why) => {
            warn!(agent = %name, reason = %why, "revocation list unusable: end-to-end services refused at the agent");
            return none;
        }
    };
    let policy = Control::Policy {
        services,
        crl_pem: crl_pem.map(|p| p.to_string()),
    };
    let size = serde_json::to_vec(&policy).map_or(usize::MAX, |v| v.len());
    if size > MAX_FRAME {
        warn!(agent = %name, size, limit = MAX_FRAME, "revocation list too large to send to agents: end-to-end services refused at the agent until it is smaller");
        return none;
    }
    debug!(agent = %name, "policy sent");
    policy
}
