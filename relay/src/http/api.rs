//! The JSON API, behind basic auth ([`super::auth`]):
//!
//! * `GET /v0/agents`: the agents connected to this relay instance.
//! * `GET /v0/backends`: the service's nodes with Switchboard's fields (`host`, `port`,
//!   `healthy`, `name`, `currentSessionCount`, `active`, `trafficEnabled`) and ours (`service`,
//!   `term`, `draining`, `check`, `lastCheck`, `consecutiveFailures`, `lastTransition`,
//!   `wsrepLocalIndex`). `currentSessionCount` counts this relay's connections to the node.
//! * `GET /v0/cluster`, `PATCH /v0/cluster` (`trafficEnabled`, `message`; Switchboard's status
//!   codes and messages); other methods 405.
//! * `PATCH /v0/backends/{name}`: `draining=true|false`, or `active=true` (an operator's
//!   failback).
//! * `GET /v0/cluster/events`: the recent decisions, newest first.
//! * `GET /v0/status`: everything the dashboard shows.
//!
//! With several services, `?service=` chooses one (required, and a 400 names them, when there
//! is more than one). PATCH parameters come from the query or a form body (the body wins), as
//! Switchboard reads them. Commands go to every agent serving the service over its control
//! stream; the agents apply them and report back, and their next report is what the API shows.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use postern_common::protocol::{Command, Control, NodeState};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::cluster::{ServiceSnapshot, rfc3339};
use crate::registry::AgentInfo;

/// The largest PATCH body read (a form with two short fields).
pub(super) const MAX_BODY: usize = 16 * 1024;

/// How many recent decisions `/v0/status` includes per service.
const STATUS_EVENTS: usize = 20;

/// The connected agents.
pub(super) async fn agents(State(shared): State<Arc<Shared>>) -> Json<Vec<AgentInfo>> {
    Json(shared.registry.agents())
}

/// `GET /v0/backends`.
pub(super) async fn backends(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let params = parse_form(q.as_deref().unwrap_or(""));
    match service(&shared, &params) {
        Ok((name, snap)) => json_ok(&backends_of(&name, &snap)),
        Err(e) => e,
    }
}

/// `GET /v0/cluster`.
pub(super) async fn cluster(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let params = parse_form(q.as_deref().unwrap_or(""));
    match service(&shared, &params) {
        Ok((name, snap)) => json_ok(&cluster_of(&name, &snap)),
        Err(e) => e,
    }
}

/// `PATCH /v0/cluster`: `trafficEnabled=true|false`, `message` (required to disable).
pub(super) async fn patch_cluster(
    State(shared): State<Arc<Shared>>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let params = merged(q.as_deref(), &body);
    let (name, _) = match service(&shared, &params) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let Some(enabled) = param(&params, "trafficEnabled").and_then(parse_bool) else {
        return text(StatusCode::BAD_REQUEST, "Failed to parse trafficEnabled");
    };
    let message = param(&params, "message").unwrap_or_default().to_owned();
    if !enabled && message.trim().is_empty() {
        return text(StatusCode::BAD_REQUEST, "message must not be empty");
    }
    let command = Command::Traffic {
        service: name.clone(),
        enabled,
        message: message.clone(),
    };
    if let Err(e) = send(&shared, &name, command) {
        return e;
    }
    shared.cluster.set_traffic(&name, enabled, &message);
    tracing::info!(service = %name, enabled, %message, "operator switched traffic");
    let snap = shared.cluster.snapshot(&name).unwrap_or_default();
    json_ok(&cluster_of(&name, &snap))
}

/// `PATCH /v0/backends/{name}`: `draining=true|false` or `active=true`.
pub(super) async fn patch_backend(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let params = merged(q.as_deref(), &body);
    let (name, snap) = match service(&shared, &params) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if snap.node(&node).is_none() {
        return text(
            StatusCode::NOT_FOUND,
            &format!("service {name:?} has no node {node:?}"),
        );
    }
    let draining = param(&params, "draining").map(parse_bool);
    let active = param(&params, "active").map(parse_bool);
    let command = match (draining, active) {
        (Some(Some(drain)), None) => Command::Drain {
            service: name.clone(),
            node: node.clone(),
            drain,
        },
        (None, Some(Some(true))) => Command::Activate {
            service: name.clone(),
            node: node.clone(),
        },
        (Some(None), _) => return text(StatusCode::BAD_REQUEST, "Failed to parse draining"),
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "give draining=true|false, or active=true",
            );
        }
    };
    if let Err(e) = send(&shared, &name, command.clone()) {
        return e;
    }
    tracing::info!(service = %name, node = %node, ?command, "operator command sent to agents");
    let backend = backends_of(&name, &snap)
        .into_iter()
        .find(|b| b["name"] == node.as_str())
        .unwrap_or(Value::Null);
    json_ok(&backend)
}

/// `GET /v0/cluster/events`: recent decisions, newest first.
pub(super) async fn events(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let params = parse_form(q.as_deref().unwrap_or(""));
    match service(&shared, &params) {
        Ok((_, snap)) => {
            let events: Vec<_> = snap.events.iter().rev().collect();
            json_ok(&events)
        }
        Err(e) => e,
    }
}

/// `GET /v0/status`: every service, agent and node, for the dashboard.
pub(super) async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let agents = shared.registry.agents();
    let services: Vec<Value> = shared
        .config()
        .services
        .keys()
        .map(|name| {
            let snap = shared.cluster.snapshot(name).unwrap_or_default();
            let mut cluster = cluster_of(name, &snap);
            let serving: Vec<&str> = agents
                .iter()
                .filter(|a| a.services.iter().any(|s| s == name))
                .map(|a| a.name.as_str())
                .collect();
            let events: Vec<_> = snap.events.iter().rev().take(STATUS_EVENTS).collect();
            if let Value::Object(map) = &mut cluster {
                map.insert("name".into(), json!(name));
                map.insert(
                    "active".into(),
                    json!(snap.best.as_ref().and_then(|b| b.active.clone())),
                );
                map.insert("agents".into(), json!(serving));
                map.insert("connections".into(), json!(snap.open.values().sum::<u64>()));
                map.insert("failovers".into(), json!(snap.failovers));
                map.insert("severed".into(), json!(snap.severed));
                map.insert("conflicts".into(), json!(snap.conflicts));
                map.insert("backends".into(), json!(backends_of(name, &snap)));
                map.insert("events".into(), json!(events));
            }
            cluster
        })
        .collect();
    json_ok(&json!({
        "instance": shared.config().instance,
        "draining": shared.stop.is_cancelled(),
        "time": rfc3339(crate::cluster::unix_ms(std::time::SystemTime::now())),
        "agents": agents,
        "services": services,
    }))
}

/// Switchboard's backend objects, with ours added, for every node of `service`.
fn backends_of(service: &str, snap: &ServiceSnapshot) -> Vec<Value> {
    let best = snap.best.as_ref();
    let active = best.and_then(|b| b.active.as_deref());
    let traffic = best.is_none_or(|b| b.traffic_enabled);
    snap.node_names()
        .iter()
        .filter_map(|name| snap.node(name))
        .map(|n: &NodeState| {
            let (host, port) = host_port(&n.address);
            let sessions = snap.open.get(&Some(n.name.clone())).copied().unwrap_or(0);
            json!({
                "host": host,
                "port": port,
                "healthy": n.healthy,
                "name": n.name,
                "currentSessionCount": sessions,
                "active": active == Some(n.name.as_str()),
                "trafficEnabled": traffic,
                "service": service,
                "term": best.map_or(0, |b| b.term),
                "draining": n.draining,
                "check": n.check,
                "lastCheck": n.last_check.as_ref().map(|c| json!({
                    "ok": c.ok,
                    "detail": c.detail,
                    "latencyMs": c.latency_ms,
                    "at": rfc3339(c.at_ms),
                })),
                "consecutiveFailures": n.consecutive_failures,
                "lastTransition": (n.last_transition_ms > 0).then(|| json!({
                    "at": rfc3339(n.last_transition_ms),
                    "why": n.last_transition,
                })),
                "wsrepLocalIndex": n.wsrep_local_index,
            })
        })
        .collect()
}

/// Switchboard's cluster object, with ours added.
fn cluster_of(service: &str, snap: &ServiceSnapshot) -> Value {
    let best = snap.best.as_ref();
    let active = best.and_then(|b| b.active.as_deref()).map(|name| {
        let (host, port) = snap
            .node(name)
            .map(|n| host_port(&n.address))
            .unwrap_or_default();
        json!({"host": host, "port": port, "name": name})
    });
    json!({
        "activeBackend": active,
        "trafficEnabled": best.is_none_or(|b| b.traffic_enabled),
        "message": best.map(|b| b.message.clone()).unwrap_or_default(),
        "lastUpdated": rfc3339(best.map_or(0, |b| b.updated_at_ms)),
        "service": service,
        "term": best.map_or(0, |b| b.term),
        "reason": best.map(|b| b.reason.clone()).unwrap_or_default(),
    })
}

/// The service a request is about: `?service=`, or the only one.
#[allow(clippy::result_large_err)]
fn service(
    shared: &Shared,
    params: &[(String, String)],
) -> Result<(String, ServiceSnapshot), Response> {
    let config = shared.config();
    let names: Vec<&String> = config.services.keys().collect();
    let name = match param(params, "service") {
        Some(s) => s.to_owned(),
        None if names.len() == 1 => names[0].clone(),
        None => {
            let list: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            return Err(text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "choose a service with ?service=NAME (this relay has: {})",
                    list.join(", ")
                ),
            ));
        }
    };
    match shared.cluster.snapshot(&name) {
        Some(s) => Ok((name, s)),
        None => Err(text(
            StatusCode::NOT_FOUND,
            &format!("unknown service {name:?}"),
        )),
    }
}

/// Sends `command` to the agents serving `service`; a 503 when none takes it.
#[allow(clippy::result_large_err)]
fn send(shared: &Shared, service: &str, command: Command) -> Result<Vec<String>, Response> {
    let sent = shared
        .registry
        .command(service, &Control::Command { command });
    if sent.is_empty() {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "no agent that takes commands is connected for service {service:?} (agents need \
                 the backends feature)"
            ),
        ));
    }
    Ok(sent)
}

fn json_ok<T: Serialize>(value: &T) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

fn text(status: StatusCode, body: &str) -> Response {
    (status, body.to_owned()).into_response()
}

/// The first value of `key`.
fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The query's parameters, then the form body's (a key in the body wins).
fn merged(query: Option<&str>, body: &[u8]) -> Vec<(String, String)> {
    let mut params = parse_form(&String::from_utf8_lossy(body));
    params.extend(parse_form(query.unwrap_or("")));
    params
}

/// Go's `strconv.ParseBool`, which Switchboard uses.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `host:port` (or `[v6]:port`) as Switchboard's separate fields; port 0 when there is none.
fn host_port(address: &str) -> (String, u16) {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => (
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port.parse().unwrap_or(0),
        ),
        _ => (address.to_owned(), 0),
    }
}

/// `application/x-www-form-urlencoded` text as key-value pairs (`+` is a space, `%XX` a byte;
/// invalid escapes are kept as they are).
pub(super) fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_as_browsers_and_curl_send_them() {
        assert_eq!(
            parse_form("trafficEnabled=false&message=down+for%20maintenance%21&x"),
            vec![
                ("trafficEnabled".into(), "false".into()),
                ("message".into(), "down for maintenance!".into()),
                ("x".into(), String::new()),
            ]
        );
        assert_eq!(
            parse_form("a=%zz&b=%4"),
            vec![("a".into(), "%zz".into()), ("b".into(), "%4".into())]
        );
        assert_eq!(parse_form("a=%41"), vec![("a".into(), "A".into())]);
        assert!(parse_form("").is_empty());
    }

    #[test]
    fn the_body_wins_over_the_query() {
        let p = merged(Some("trafficEnabled=true"), b"trafficEnabled=false");
        assert_eq!(param(&p, "trafficEnabled"), Some("false"));
    }

    #[test]
    fn addresses_split_into_host_and_port() {
        assert_eq!(host_port("10.0.0.1:3306"), ("10.0.0.1".into(), 3306));
        assert_eq!(host_port("[::1]:3306"), ("::1".into(), 3306));
        assert_eq!(host_port("db.example"), ("db.example".into(), 0));
    }
}
