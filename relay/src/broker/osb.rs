//! The broker's HTTP surface: Open Service Broker API v2 under `/v2/`, as Cloud Foundry calls
//! it.
//!
//! Every request needs basic auth (`broker.username` and its password: 401 otherwise) and
//! `X-Broker-API-Version: 2.x` with x ≥ [`MIN_MINOR`] (412 otherwise); the platform's
//! `X-Broker-API-Request-Identity` is echoed and logged. Bodies are JSON; errors are
//! `{"description": …}` (plus `error` for the spec's fixed codes). Status codes follow the
//! spec: provision 201 / 200 (identical) / 409 (different); bind 201 / 200 / 409, 422 for an
//! unknown instance; unbind and deprovision 200, or 410 for what does not exist; 400 for a
//! malformed body, unknown ids or parameters.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::store::{Binding, Instance};
use super::{BindParams, Broker, USER_TIMEOUT, identity_of};
use crate::Shared;

/// The oldest OSB minor version accepted (2.11 brought `bindings_retrievable`; Cloud Foundry
/// sends 2.15 or later).
pub(crate) const MIN_MINOR: u32 = 11;
/// The largest request body read.
pub(crate) const MAX_BODY: usize = 64 * 1024;

const VERSION_HEADER: &str = "x-broker-api-version";
const REQUEST_IDENTITY: &str = "x-broker-api-request-identity";

/// The `/v2/` routes.
pub(crate) fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/v2/catalog", get(catalog))
        .route(
            "/v2/service_instances/{instance}",
            get(get_instance)
                .put(provision)
                .patch(update)
                .delete(deprovision),
        )
        .route(
            "/v2/service_instances/{instance}/last_operation",
            get(instance_last_operation),
        )
        .route(
            "/v2/service_instances/{instance}/service_bindings/{binding}",
            get(get_binding).put(bind).delete(unbind),
        )
        .route(
            "/v2/service_instances/{instance}/service_bindings/{binding}/last_operation",
            get(binding_last_operation),
        )
        .route("/v2/{*rest}", axum::routing::any(unknown))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .route_layer(axum::middleware::from_fn_with_state(shared, guard))
}

/// Basic auth, the API version, the request identity.
async fn guard(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(broker) = &shared.broker else {
        return (
            StatusCode::NOT_FOUND,
            "the relay's service broker is off: set broker in relay.yaml\n",
        )
            .into_response();
    };
    let s = &broker.settings;
    if !crate::http::authorised(req.headers(), &s.username, &s.password) {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"description": "Not Authorized"})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Authorization Required\""),
        );
        return r;
    }
    let version = req
        .headers()
        .get(VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let supported = version.as_deref().and_then(|v| {
        let (major, minor) = v.trim().split_once('.')?;
        Some(major == "2" && minor.parse::<u32>().ok()? >= MIN_MINOR)
    });
    if supported != Some(true) {
        return error(
            StatusCode::PRECONDITION_FAILED,
            &format!(
                "this broker speaks Open Service Broker API 2.{MIN_MINOR} or later; the request \
                 says {} (header X-Broker-API-Version)",
                version.as_deref().unwrap_or("nothing")
            ),
        );
    }
    let identity = req.headers().get(REQUEST_IDENTITY).cloned();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let mut response = next.run(req).await;
    info!(
        %method,
        path,
        status = response.status().as_u16(),
        request = identity.as_ref().and_then(|i| i.to_str().ok()).unwrap_or(""),
        "broker request"
    );
    if let Some(id) = identity {
        response.headers_mut().insert(REQUEST_IDENTITY, id);
    }
    response
}

struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

fn error(status: StatusCode, description: &str) -> Response {
    (status, Json(json!({ "description": description }))).into_response()
}

fn empty(status: StatusCode) -> Response {
    (status, Json(json!({}))).into_response()
}

fn store_failed(e: &super::store::StoreError) -> Response {
    warn!(error = %e, "broker store failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("the broker cannot use its store: {e}"),
    )
}

fn broker(shared: &Shared) -> &Broker {
    // The guard lets requests through only when the broker is on.
    shared
        .broker
        .as_deref()
        .unwrap_or_else(|| unreachable!("guarded"))
}

async fn unknown() -> Response {
    error(StatusCode::NOT_FOUND, "no such broker endpoint")
}

async fn catalog(State(shared): State<Arc<Shared>>) -> Response {
    let b = broker(&shared);
    let plans: Vec<Value> = b
        .settings
        .plans
        .values()
        .map(|p| {
            json!({
                "id": b.plan_ids[&p.service],
                "name": p.service,
                "description": p.description,
                "free": true,
                "bindable": true,
                "plan_updateable": false,
                "metadata": {
                    "displayName": p.service,
                    "bullets": [match &p.credentials {
                        super::PlanCredentials::PerBinding => "a MySQL user of its own for every binding",
                        super::PlanCredentials::Fixed { .. } => "the service's MySQL user",
                    }, "a client certificate of its own for every binding"],
                },
                "schemas": {
                    "service_binding": {
                        "create": {
                            "parameters": {
                                "$schema": "http://json-schema.org/draft-04/schema#",
                                "type": "object",
                                "additionalProperties": false,
                                "properties": {
                                    "local_port": {
                                        "type": "integer", "minimum": 1, "maximum": 65535,
                                        "description": "Point the credentials at a sidecar (postern-agent connect --binding) listening on 127.0.0.1:local_port in the app's container"
                                    },
                                    "jdbc_url": {
                                        "type": "boolean",
                                        "description": "Include jdbcUrl (default true)"
                                    }
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    Json(json!({
        "services": [{
            "name": b.settings.offering,
            "id": b.offering_id,
            "description": "MySQL databases in private networks, reached through Postern relays with mutual TLS",
            "bindable": true,
            "instances_retrievable": true,
            "bindings_retrievable": false,
            "plan_updateable": false,
            "tags": ["mysql", "relational", "postern"],
            "metadata": {
                "displayName": "Postern",
                "longDescription": "Each binding gets a client certificate of its own; unbinding revokes it at every relay instance.",
            },
            "plans": plans,
        }]
    }))
    .into_response()
}

/// The parts of provision and bind bodies the broker reads.
#[derive(Debug, Deserialize)]
struct Body {
    service_id: Option<String>,
    plan_id: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    bind_resource: Option<Value>,
}

fn parse(body: &Bytes) -> Result<Body, Box<Response>> {
    let text = if body.is_empty() {
        &b"{}"[..]
    } else {
        &body[..]
    };
    serde_json::from_slice(text).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("the request body is not the JSON object expected: {e}"),
        ))
    })
}

/// The body's `service_id` and `plan_id`, checked against the catalog.
fn ids<'a>(b: &'a Broker, body: &Body) -> Result<(&'a super::Plan, String), Box<Response>> {
    let Some(service_id) = &body.service_id else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "service_id is required",
        )));
    };
    if *service_id != b.offering_id {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("unknown service_id {service_id:?} (see /v2/catalog)"),
        )));
    }
    let Some(plan_id) = &body.plan_id else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "plan_id is required",
        )));
    };
    let plan = b.plan_by_id(plan_id).ok_or_else(|| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("unknown plan_id {plan_id:?} (see /v2/catalog)"),
        ))
    })?;
    Ok((plan, plan_id.clone()))
}

fn parameters(body: &Body) -> Value {
    match &body.parameters {
        None | Some(Value::Null) => json!({}),
        Some(v) => v.clone(),
    }
}

async fn provision(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    body: Bytes,
) -> Response {
    let b = broker(&shared);
    let body = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (plan, plan_id) = match ids(b, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let params = parameters(&body);
    if params.as_object().is_none_or(|o| !o.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "service instances take no parameters (bindings do: local_port, jdbc_url)",
        );
    }
    let record = Instance {
        id: instance.clone(),
        service_id: b.offering_id.clone(),
        plan_id,
        service: plan.service.clone(),
        params: params.to_string(),
    };
    match b.provision(&record).await {
        Ok(None) => (StatusCode::CREATED, Json(json!({}))).into_response(),
        Ok(Some(existing)) if existing.plan_id == record.plan_id => empty(StatusCode::OK),
        Ok(Some(_)) => error(
            StatusCode::CONFLICT,
            &format!("service instance {instance} exists with another plan"),
        ),
        Err(e) => store_failed(&e),
    }
}

async fn get_instance(State(shared): State<Arc<Shared>>, Path(instance): Path<String>) -> Response {
    match broker(&shared).store.instance(&instance).await {
        Ok(Some(i)) => Json(json!({
            "service_id": i.service_id,
            "plan_id": i.plan_id,
            "parameters": serde_json::from_str::<Value>(&i.params).unwrap_or(json!({})),
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such service instance"),
        Err(e) => store_failed(&e),
    }
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    body: Bytes,
) -> Response {
    let b = broker(&shared);
    let body = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let existing = match b.store.instance(&instance).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("service instance {instance} does not exist"),
            );
        }
        Err(e) => return store_failed(&e),
    };
    if body
        .plan_id
        .as_ref()
        .is_some_and(|p| *p != existing.plan_id)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "plans cannot be changed: a plan is a service; create an instance of the other plan",
        );
    }
    if parameters(&body).as_object().is_none_or(|o| !o.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "service instances take no parameters",
        );
    }
    empty(StatusCode::OK)
}

#[derive(Debug, Deserialize)]
struct Ids {
    service_id: Option<String>,
    plan_id: Option<String>,
}

fn ids_given(q: &Ids) -> Result<(), Box<Response>> {
    if q.service_id.is_none() || q.plan_id.is_none() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "service_id and plan_id are required query parameters",
        )));
    }
    Ok(())
}

async fn deprovision(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    Query(q): Query<Ids>,
) -> Response {
    if let Err(r) = ids_given(&q) {
        return *r;
    }
    let b = broker(&shared);
    match b.store.instance(&instance).await {
        Ok(Some(_)) => {}
        Ok(None) => return empty(StatusCode::GONE),
        Err(e) => return store_failed(&e),
    }
    // The platform unbinds first; whatever is left is revoked now.
    let left = match b.store.bindings_of(&instance).await {
        Ok(l) => l,
        Err(e) => return store_failed(&e),
    };
    for binding in left {
        if let Err(r) = remove_binding(&shared, &binding).await {
            return r;
        }
    }
    match b.store.delete_instance(&instance).await {
        Ok(_) => {
            info!(instance, "service instance deprovisioned");
            empty(StatusCode::OK)
        }
        Err(e) => store_failed(&e),
    }
}

async fn instance_last_operation(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
) -> Response {
    // Every operation completes within its call: what exists has succeeded.
    match broker(&shared).store.instance(&instance).await {
        Ok(Some(_)) => Json(json!({"state": "succeeded"})).into_response(),
        Ok(None) => empty(StatusCode::GONE),
        Err(e) => store_failed(&e),
    }
}

async fn binding_last_operation(
    State(shared): State<Arc<Shared>>,
    Path((_, binding)): Path<(String, String)>,
) -> Response {
    match broker(&shared).store.binding(&binding).await {
        Ok(Some(b)) if b.revoked_ms.is_none() => {
            Json(json!({"state": "succeeded"})).into_response()
        }
        Ok(_) => empty(StatusCode::GONE),
        Err(e) => store_failed(&e),
    }
}

async fn get_binding() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "bindings are not retrievable: their private keys and passwords are not kept",
    )
}

async fn bind(
    State(shared): State<Arc<Shared>>,
    Path((instance, binding)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let b = broker(&shared);
    let body = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (plan, plan_id) = match ids(b, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let si = match b.store.instance(&instance).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("service instance {instance} does not exist"),
            );
        }
        Err(e) => return store_failed(&e),
    };
    if si.plan_id != plan_id {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("plan_id {plan_id:?} is not the plan of service instance {instance}"),
        );
    }
    let params_value = parameters(&body);
    let params: BindParams = match serde_json::from_value(params_value.clone()) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("bind parameters: {e} (known: local_port, jdbc_url)"),
            );
        }
    };
    if params.local_port == Some(0) {
        return error(
            StatusCode::BAD_REQUEST,
            "bind parameters: local_port must be 1-65535",
        );
    }
    let bound_to = body
        .bind_resource
        .as_ref()
        .and_then(|r| {
            r.get("app_guid")
                .or_else(|| r.get("credential_client_id"))
                .and_then(Value::as_str)
        })
        .unwrap_or_default()
        .to_owned();
    let existing = match b.store.binding(&binding).await {
        Ok(e) => e,
        Err(e) => return store_failed(&e),
    };
    let status = match &existing {
        None => StatusCode::CREATED,
        Some(e) if e.revoked_ms.is_some() => {
            return error(
                StatusCode::CONFLICT,
                &format!("binding {binding} was deleted; bindings are not reused"),
            );
        }
        Some(e)
            if e.instance_id != instance
                || serde_json::from_str::<Value>(&e.params).ok() != Some(params_value.clone()) =>
        {
            return error(
                StatusCode::CONFLICT,
                &format!("binding {binding} exists with other attributes"),
            );
        }
        // The same request again (the platform retries when it lost the answer): the binding
        // stands, with a fresh certificate (keys are not kept).
        Some(_) => StatusCode::OK,
    };
    let identity = identity_of(&binding);
    let cert = match b.issue(&identity) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot issue a binding certificate");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot issue the binding's certificate: {e}"),
            );
        }
    };
    let (username, password, per_binding) = match Broker::fixed_user(plan) {
        Some((u, p)) => (u.to_owned(), p.to_owned(), false),
        None => {
            let made = tokio::time::timeout(
                USER_TIMEOUT,
                crate::users::create_user(&shared, &plan.service, &binding),
            )
            .await;
            match made {
                Ok(Ok(user)) => (user.username, user.password, true),
                Ok(Err(refusal)) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                            "the agent of service {} could not make the binding's MySQL user: {}",
                            plan.service, refusal.message
                        ),
                    );
                }
                Err(_) => {
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "the agent of service {} did not make the binding's MySQL user within {} s",
                            plan.service,
                            USER_TIMEOUT.as_secs()
                        ),
                    );
                }
            }
        }
    };
    let record = Binding {
        id: binding.clone(),
        instance_id: instance.clone(),
        service: plan.service.clone(),
        identity: identity.clone(),
        username: if per_binding {
            username.clone()
        } else {
            String::new()
        },
        per_binding,
        params: params_value.to_string(),
        bound_to,
        expires_ms: cert.expires_ms,
        revoked_ms: None,
        user_dropped: false,
    };
    if existing.is_none() {
        if let Err(e) = b.record(&record, &shared.access).await {
            if per_binding {
                let _ = crate::users::drop_user(&shared, &plan.service, &binding).await;
            }
            return store_failed(&e);
        }
        info!(binding, instance, service = %plan.service, client = %identity, "bound");
    }
    let credentials = b.credentials(plan, &identity, &cert, (&username, &password), &params);
    let endpoint_host = credentials.host.clone();
    (
        status,
        Json(json!({
            "credentials": credentials.to_value(),
            "endpoints": [{
                "host": endpoint_host,
                "ports": [credentials.port.to_string()],
                "protocol": "tcp",
            }],
            "metadata": { "expires_at": cert.expires_at },
        })),
    )
        .into_response()
}

async fn unbind(
    State(shared): State<Arc<Shared>>,
    Path((instance, binding)): Path<(String, String)>,
    Query(q): Query<Ids>,
) -> Response {
    if let Err(r) = ids_given(&q) {
        return *r;
    }
    let b = broker(&shared);
    let found = match b.store.binding(&binding).await {
        Ok(Some(f)) if f.instance_id == instance => f,
        Ok(_) => return empty(StatusCode::GONE),
        Err(e) => return store_failed(&e),
    };
    if found.revoked_ms.is_some() && (!found.per_binding || found.user_dropped) {
        return empty(StatusCode::GONE);
    }
    match remove_binding(&shared, &found).await {
        Ok(()) => {
            info!(binding, instance, client = %found.identity, "unbound: certificate revoked at every relay");
            empty(StatusCode::OK)
        }
        Err(r) => r,
    }
}

/// Revokes a binding (first: its certificate stops working at once) and drops its own MySQL
/// user. A user that cannot be dropped now is dropped when the platform retries.
async fn remove_binding(shared: &Arc<Shared>, found: &Binding) -> Result<(), Response> {
    let b = broker(shared);
    if found.revoked_ms.is_none() {
        b.revoke(&found.id, &shared.access)
            .await
            .map_err(|e| store_failed(&e))?;
    }
    if found.per_binding && !found.user_dropped {
        let dropped = tokio::time::timeout(
            USER_TIMEOUT,
            crate::users::drop_user(shared, &found.service, &found.id),
        )
        .await;
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                return Err(error(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "the binding is revoked, but its MySQL user could not be dropped ({}); \
                         unbind again to retry",
                        refusal.message
                    ),
                ));
            }
            Err(_) => {
                return Err(error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the binding is revoked, but the agent did not drop its MySQL user in time; \
                     unbind again to retry",
                ));
            }
        }
        b.store
            .user_dropped(&found.id)
            .await
            .map_err(|e| store_failed(&e))?;
    }
    Ok(())
}
