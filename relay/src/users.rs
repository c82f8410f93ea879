//! Per-binding database users, asked of the agents: the service broker calls `create_user`
//! on bind and `drop_user` on unbind.
//!
//! The relay holds no database credential. It opens an admin stream (an [`Open`] with
//! [`Open::admin`], see [`postern_common::protocol`]) to an agent of the service that announced
//! [`FEATURE_USERS`](postern_common::protocol::FEATURE_USERS), preferring one that reports the
//! active node healthy, and names only the binding; the agent logs in to the active node with
//! its own admin credential and gives the user the grants of its own config. The answer is read
//! within [`ADMIN_DEADLINE`] (a little over the agent's own limit).
//!
//! Both calls are idempotent, as the platform retries: creating again gives the same user a new
//! password, dropping a user that is gone succeeds.

use std::time::Duration;

use postern_common::protocol::{Admin, AdminDone, Answer, Code, Open, Refusal};
use postern_common::wire;
use tracing::debug;

use crate::state::Shared;

/// How long the relay waits for an agent's answer to an admin stream.
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(15);

/// A binding's database user, as the agent created it. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BindingUser {
    /// The MySQL user name ([`binding_username`](postern_common::protocol::binding_username)
    /// of the binding id).
    pub username: String,
    /// Its password (new with every create).
    pub password: String,
}

impl std::fmt::Debug for BindingUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingUser")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Asks an agent of `service` to create (or renew) the database user of `binding`.
pub(crate) async fn create_user(
    shared: &Shared,
    service: &str,
    binding: &str,
) -> Result<BindingUser, Refusal> {
    let admin = Admin::CreateUser {
        binding: binding.to_owned(),
    };
    match ask(shared, service, admin).await? {
        AdminDone::User { username, password } => Ok(BindingUser { username, password }),
        AdminDone::Dropped { .. } => Err(Refusal::new(
            Code::BadRequest,
            "the agent answered a create with a drop",
        )),
    }
}

/// Asks an agent of `service` to drop the database user of `binding` (gone already is fine).
pub(crate) async fn drop_user(
    shared: &Shared,
    service: &str,
    binding: &str,
) -> Result<(), Refusal> {
    let admin = Admin::DropUser {
        binding: binding.to_owned(),
    };
    match ask(shared, service, admin).await? {
        AdminDone::Dropped { .. } => Ok(()),
        AdminDone::User { .. } => Err(Refusal::new(
            Code::BadRequest,
            "the agent answered a drop with a user",
        )),
    }
}

/// Opens an admin stream for `admin` to an agent of `service` and reads what it did.
async fn ask(shared: &Shared, service: &str, admin: Admin) -> Result<AdminDone, Refusal> {
    if !shared.config().services.contains_key(service) {
        return Err(Refusal::new(
            Code::UnknownService,
            format!("unknown service {service:?}"),
        ));
    }
    let (term, node) = shared.cluster.route(service);
    let route = shared.registry.route_users(service, |agent| {
        node.as_deref()
            .is_some_and(|n| shared.cluster.healthy_at(service, agent, n))
    });
    let Some(route) = route else {
        return Err(Refusal::new(
            Code::NoAgent,
            format!(
                "no agent connected for service {service:?} makes database users (give the \
                 agent services.{service}.users in agent.yaml)"
            ),
        ));
    };
    let agent = route.agent;
    let lost = |e: &dyn std::fmt::Display| {
        Refusal::new(
            Code::NoAgent,
            format!("service {service:?}: agent {agent} did not answer ({e})"),
        )
    };
    let exchange = async {
        let mut stream = route.session.open().await.map_err(|e| lost(&e))?;
        let open = Open {
            node,
            term,
            admin: Some(admin),
            ..Open::for_service(service)
        };
        wire::write_first(&mut stream, &open)
            .await
            .map_err(|e| lost(&e))?;
        match wire::read_first::<_, Answer>(&mut stream)
            .await
            .map_err(|e| lost(&e))?
        {
            Answer::Ok { backend } => {
                let done = wire::read_frame::<_, AdminDone>(&mut stream)
                    .await
                    .map_err(|e| lost(&e))?;
                debug!(service, agent, backend, ?done, "admin action done");
                Ok(done)
            }
            Answer::Refused { code, message } => Err(Refusal::new(code, message)),
        }
    };
    tokio::time::timeout(ADMIN_DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| Err(lost(&"timed out")))
}
