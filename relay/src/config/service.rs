//! Validating one entry of `services`: its listeners, who may connect, its limits and, for MySQL
//! services, where TLS ends and which MySQL users each client may log in as.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use postern_common::config::{self, Check, Env, Spanned};
use postern_common::pki;

use super::file::{ServiceFile, UsersFile};
use super::{
    Acl, AllowedUsers, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HANDSHAKES, Protocol, Service,
    TlsTermination, Users, parse_addr,
};

/// Validates `services.NAME`, recording every problem in `check`.
pub(super) fn validate(
    check: &mut Check<'_>,
    name: &Spanned<String>,
    svc: &ServiceFile,
    env: &dyn Env,
) -> Service {
    let key = format!("services.{}", name.value);
    if let Err(e) = pki::check_name(&name.value) {
        check.at(name, &key, e.to_string());
    }
    let (listen, tls_listen) = listeners(check, &key, svc, env);
    let clients = clients(check, &key, &svc.clients);
    let max_connections = limit(
        check,
        svc.max_connections.as_ref(),
        &format!("{key}.max_connections"),
        DEFAULT_MAX_CONNECTIONS,
    );
    let max_handshakes = limit(
        check,
        svc.max_handshakes.as_ref(),
        &format!("{key}.max_handshakes"),
        DEFAULT_MAX_HANDSHAKES,
    );
    let protocol = svc.protocol.as_ref().map(|p| p.value).unwrap_or_default();
    if protocol == Protocol::Tcp {
        mysql_only(check, &key, svc);
    }
    let tls_termination = tls_termination(check, &key, svc);
    let allowed_users = svc.allowed_users.as_ref().map_or(AllowedUsers::Any, |u| {
        allowed_users(check, &key, &u.value, &clients)
    });
    Service {
        name: name.value.clone(),
        listen,
        tls_listen,
        clients,
        protocol,
        max_connections,
        max_handshakes,
        tls_termination,
        allowed_users,
        client_attribute: svc.client_attribute.as_ref().is_some_and(|c| c.value),
    }
}

fn listeners(
    check: &mut Check<'_>,
    key: &str,
    svc: &ServiceFile,
    env: &dyn Env,
) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let listen = svc
        .listen
        .as_ref()
        .and_then(|l| parse_addr(check, l, &format!("{key}.listen"), env));
    let tls_listen = svc
        .tls_listen
        .as_ref()
        .and_then(|l| parse_addr(check, l, &format!("{key}.tls_listen"), env));
    (listen, tls_listen)
}

/// `clients`: identity names, or `"*"` for any client certificate of the CA.
fn clients(check: &mut Check<'_>, key: &str, list: &[Spanned<String>]) -> Acl {
    let mut names = BTreeSet::new();
    let mut any = false;
    for c in list {
        if c.value == "*" {
            any = true;
        } else if let Err(e) = pki::check_name(&c.value) {
            check.at(c, &format!("{key}.clients"), e.to_string());
        } else if postern_common::policy::is_binding(&c.value) {
            check.at(
                c,
                &format!("{key}.clients"),
                format!(
                    "names starting with {:?} belong to the service broker's bindings",
                    postern_common::policy::BINDING_PREFIX
                ),
            );
        } else {
            names.insert(c.value.clone());
        }
    }
    if any { Acl::Any } else { Acl::Only(names) }
}

/// A connection limit: at least 1.
fn limit(
    check: &mut Check<'_>,
    value: Option<&Spanned<usize>>,
    key: &str,
    default: usize,
) -> usize {
    match value {
        None => default,
        Some(v) if v.value == 0 => {
            check.at(v, key, "must be at least 1");
            default
        }
        Some(v) => v.value,
    }
}

/// Settings that only MySQL services take, given to a `tcp` service.
fn mysql_only(check: &mut Check<'_>, key: &str, svc: &ServiceFile) {
    let given = [
        ("tls_listen", svc.tls_listen.as_ref().map(config::line_of)),
        (
            "tls_termination",
            svc.tls_termination.as_ref().map(config::line_of),
        ),
        (
            "allowed_users",
            svc.allowed_users.as_ref().map(config::line_of),
        ),
        (
            "client_attribute",
            svc.client_attribute.as_ref().map(config::line_of),
        ),
    ];
    for (field, line) in given {
        let Some(line) = line else { continue };
        let why = if field == "tls_listen" {
            "a tcp service's `listen` is already TLS-first: use `listen`"
        } else {
            "applies only to services with protocol: mysql"
        };
        check.error(line, &format!("{key}.{field}"), why);
    }
}

/// `tls_termination`: `agent` needs the MySQL-native listener and excludes the TLS-first one.
fn tls_termination(check: &mut Check<'_>, key: &str, svc: &ServiceFile) -> TlsTermination {
    let Some(t) = &svc.tls_termination else {
        return TlsTermination::default();
    };
    if t.value == TlsTermination::Agent {
        if svc.listen.is_none() {
            check.at(
                t,
                &format!("{key}.tls_termination"),
                "`agent` applies to the MySQL-native `listen` listener, and this service has none",
            );
        }
        if let Some(l) = &svc.tls_listen {
            check.at(
                l,
                &format!("{key}.tls_listen"),
                "a TLS-first listener ends TLS at the relay, and this service ends TLS at the \
                 agent (tls_termination: agent): remove tls_listen",
            );
        }
    }
    t.value
}

/// `allowed_users`: a list for every client, or a mapping from client name (or `"*"`) to a list.
fn allowed_users(check: &mut Check<'_>, key: &str, file: &UsersFile, acl: &Acl) -> AllowedUsers {
    let key = format!("{key}.allowed_users");
    let list = |check: &mut Check<'_>, users: &[Spanned<String>]| {
        let mut names = BTreeSet::new();
        for u in users {
            if u.value == "*" {
                return Users::Any;
            }
            if u.value.is_empty() {
                check.at(u, &key, "a MySQL user name cannot be empty");
            }
            names.insert(u.value.clone());
        }
        Users::Only(names)
    };
    match file {
        UsersFile::List(users) => AllowedUsers::Policy {
            clients: BTreeMap::new(),
            others: Some(list(check, users)),
        },
        UsersFile::Map(entries) => {
            let mut clients = BTreeMap::new();
            let mut others = None;
            for (client, users) in entries.iter() {
                let users = list(check, users);
                if client.value == "*" {
                    others = Some(users);
                    continue;
                }
                if let Err(e) = pki::check_name(&client.value) {
                    check.at(client, &key, e.to_string());
                } else if let Acl::Only(names) = acl
                    && !names.contains(&client.value)
                {
                    check.at(
                        client,
                        &key,
                        format!(
                            "client {:?} is not in this service's `clients`, so it can never connect",
                            client.value
                        ),
                    );
                }
                clients.insert(client.value.clone(), users);
            }
            AllowedUsers::Policy { clients, others }
        }
    }
}
