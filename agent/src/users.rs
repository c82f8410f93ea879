//! Per-binding database users: the relay's service broker asks, on an admin stream
//! ([`Open::admin`]), for a MySQL user for one binding on bind and for its removal on unbind.
//!
//! The agent holds everything that matters, in its own config (`services.NAME.users`): the
//! admin credential (which never leaves the private network), the users' host part and the
//! grants. The relay names only the binding; the user name is derived from it
//! ([`binding_username`]) and the password is 32 random alphanumerics from the thread's CSPRNG,
//! so a relay (or anyone who took it over) cannot ask for another user's password, another
//! account or more privileges than this file allows.
//!
//! Creating is idempotent, as a platform retries a bind: `CREATE USER IF NOT EXISTS … IDENTIFIED
//! BY` (never a moment without a password), `ALTER USER … IDENTIFIED BY` the new password,
//! `REVOKE ALL PRIVILEGES, GRANT OPTION` and then exactly the configured grants, so the user's
//! rights are the config's even when it changed since the first bind. Dropping is `DROP USER
//! IF EXISTS` and then, best effort, `KILL CONNECTION` of the user's open sessions (the admin
//! needs the privilege to see and kill them; without it the sessions live until they close).
//! The statements go to the service's active node, chosen as for clients
//! ([`Backends::lease`](crate::backends::Backends::lease)), and the whole action has
//! [`ADMIN_TIMEOUT`].
//!
//! # Grants
//!
//! Each entry of `grants` is `PRIVILEGE[, PRIVILEGE…] ON db.*` or `… ON db.table`, checked when
//! the config is read:
//! * privileges come from a list of those that act inside one database ([`PRIVILEGES`], `ALL
//!   [PRIVILEGES]` meaning all of them there); server-wide ones (`SUPER`, `FILE`, `PROCESS`,
//!   `CREATE USER`, `RELOAD`, …) and `GRANT OPTION` are refused, and so are column lists;
//! * the object names one database: not `*` (so no `*.*`), no `%` wildcard, not a system schema
//!   (`mysql`, `information_schema`, `performance_schema`, `sys`); names are plain
//!   (`[A-Za-z0-9_$]`) or in backticks;
//! * nothing else: no `;`, quotes other than backticks, `\`, comments, `WITH`, `IDENTIFIED`.
//!
//! An `_` in a database name is a one-character wildcard to MySQL in `ON db.*`, so `app_db.*`
//! would also grant `appXdb`; the agent writes it escaped (`` `app\_db`.* ``), which means the
//! one database `app_db`.

use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use postern_common::protocol::{
    Admin, AdminDone, Answer, Code, MAX_BINDING_ID, Open, Refusal, binding_username,
};
use postern_common::transport::Stream;
use postern_common::wire;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::config::{Service, Users};
use crate::forward;
use crate::state::AgentState;

/// How long one admin action may take, from the open frame to the answer (the relay waits a
/// little longer).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest MySQL user name (MariaDB's limit; MySQL 8's is 32, and binding users have 16).
pub const MAX_NAME: usize = 80;

/// The length of a binding user's password.
pub const PASSWORD_LEN: usize = 32;

/// The privileges a binding's user may be granted: those that act inside one database.
pub const PRIVILEGES: &[&str] = &[
    "ALL",
    "ALL PRIVILEGES",
    "ALTER",
    "ALTER ROUTINE",
    "CREATE",
    "CREATE ROUTINE",
    "CREATE TEMPORARY TABLES",
    "CREATE VIEW",
    "DELETE",
    "DELETE HISTORY",
    "DROP",
    "EVENT",
    "EXECUTE",
    "INDEX",
    "INSERT",
    "LOCK TABLES",
    "REFERENCES",
    "SELECT",
    "SHOW VIEW",
    "TRIGGER",
    "UPDATE",
];

/// Schemas no binding's user is granted anything in.
const SYSTEM_SCHEMAS: &[&str] = &["mysql", "information_schema", "performance_schema", "sys"];

/// The longest database or table name.
const MAX_IDENT: usize = 64;

/// One validated entry of `users.grants`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Upper-case privilege names, from [`PRIVILEGES`].
    privileges: Vec<String>,
    /// The database, literal (no wildcard).
    database: String,
    /// The table, or `None` for every table (`db.*`).
    table: Option<String>,
}

impl Grant {
    /// Parses `PRIVILEGE[, PRIVILEGE…] ON db.*` (or `db.table`); the error says what is wrong
    /// and what is allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(c) = text
            .chars()
            .find(|c| matches!(c, ';' | '\'' | '"' | '\\' | '#') || c.is_control())
        {
            return Err(format!(
                "{text:?}: {c:?} is not allowed (a grant is PRIVILEGE, ... ON db.* or db.table; \
                 names may be in backticks)"
            ));
        }
        if text.contains("/*") || text.contains("--") {
            return Err(format!("{text:?}: comments are not allowed"));
        }
        let Some((privileges, object)) = split_on(text) else {
            return Err(format!(
                "{text:?} is not PRIVILEGE, ... ON db.* (e.g. \"SELECT, INSERT ON appdb.*\")"
            ));
        };
        let mut privs = Vec::new();
        for p in privileges.split(',') {
            let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
            let upper = p.to_ascii_uppercase();
            if p.is_empty() {
                return Err(format!("{text:?}: an empty privilege in the list"));
            }
            if !PRIVILEGES.contains(&upper.as_str()) {
                return Err(format!(
                    "{text:?}: privilege {p:?} may not be granted to binding users (allowed: \
                     {}; server-wide privileges and GRANT OPTION are refused)",
                    PRIVILEGES.join(", ")
                ));
            }
            privs.push(upper);
        }
        let (database, rest) = ident(object.trim())
            .ok_or_else(|| format!("{text:?}: {:?} is not db.* or db.table", object.trim()))?;
        let table = match rest.strip_prefix('.') {
            Some("*") => None,
            Some(t) => match ident(t) {
                Some((t, "")) => Some(t),
                _ => return Err(format!("{text:?}: {t:?} is not a table name or *")),
            },
            None => {
                return Err(format!(
                    "{text:?}: name the database and the tables, as db.* or db.table"
                ));
            }
        };
        if database.contains('%') || table.as_ref().is_some_and(|t| t.contains('%')) {
            return Err(format!(
                "{text:?}: % is not allowed (a grant names one database)"
            ));
        }
        if SYSTEM_SCHEMAS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&database))
        {
            return Err(format!(
                "{text:?}: nothing in the system schema {database:?} may be granted"
            ));
        }
        Ok(Self {
            privileges: privs,
            database,
            table,
        })
    }

    /// The `GRANT` statement that gives this to `account` (`'user'@'host'`, already quoted).
    pub fn statement(&self, account: &str) -> String {
        format!("GRANT {self} TO {account}")
    }
}

/// The grant as the agent sends it: `SELECT, INSERT ON `app\_db`.*`.
impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let privileges = self.privileges.join(", ");
        match &self.table {
            // In `ON db.*`, `_` is a wildcard to MySQL: escape it so it means itself.
            None => write!(
                f,
                "{privileges} ON `{}`.*",
                self.database.replace('_', "\\_")
            ),
            Some(t) => write!(f, "{privileges} ON `{}`.`{t}`", self.database),
        }
    }
}

/// Splits `PRIVS ON OBJECT` at the first word `ON` (no privilege name contains it).
fn split_on(text: &str) -> Option<(&str, &str)> {
    let upper = text.to_ascii_uppercase();
    let mut from = 0;
    while let Some(i) = upper[from..].find("ON").map(|i| i + from) {
        let before = upper[..i].chars().next_back();
        let after = upper[i + 2..].chars().next();
        if before.is_some_and(char::is_whitespace) && after.is_some_and(char::is_whitespace) {
            return Some((&text[..i], &text[i + 2..]));
        }
        from = i + 2;
    }
    None
}

/// A database or table name at the start of `s`: plain (`[A-Za-z0-9_$]`) or in backticks.
/// Returns the name and what follows.
fn ident(s: &str) -> Option<(String, &str)> {
    let (name, rest) = if let Some(quoted) = s.strip_prefix('`') {
        let end = quoted.find('`')?;
        (&quoted[..end], &quoted[end + 1..])
    } else {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(s.len());
        (&s[..end], &s[end..])
    };
    (!name.is_empty() && name.len() <= MAX_IDENT && name.trim() == name)
        .then(|| (name.to_owned(), rest))
}

/// Checks `users.host`: a host name, an address, a netmask or a `%` pattern.
pub fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_%:/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a MySQL host pattern (letters, digits, . - _ % : /; e.g. % or 10.0.%)"
        ))
    }
}

/// A new random password: [`PASSWORD_LEN`] alphanumerics from the thread's CSPRNG.
pub fn new_password() -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(PASSWORD_LEN)
        .map(char::from)
        .collect()
}

/// Serves one admin stream of service `svc`: does the action, then answers ([`Answer::Ok`]
/// and one [`AdminDone`] frame, or [`Answer::Refused`]) and ends the stream.
pub(crate) async fn serve(
    state: &AgentState,
    svc: &Service,
    mut stream: Stream,
    open: &Open,
    admin: &Admin,
) {
    let done = tokio::time::timeout(ADMIN_TIMEOUT, act(state, svc, open, admin))
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                Code::AdminFailed,
                format!(
                    "service {:?}: the database did not finish within {} s",
                    svc.name,
                    ADMIN_TIMEOUT.as_secs()
                ),
            ))
        });
    let (backend, done) = match done {
        Ok(d) => d,
        Err(r) => return forward::refuse(state, &mut stream, open, r).await,
    };
    let sent = async {
        wire::write_first(&mut stream, &Answer::Ok { backend }).await?;
        wire::write_frame(&mut stream, &done).await?;
        stream.shutdown().await?;
        Ok::<_, wire::WireError>(())
    };
    if let Err(e) = sent.await {
        debug!(error = %e, "relay went away before the admin answer");
    }
}

/// Does `admin` on the service's active node; the node's address and what was done.
async fn act(
    state: &AgentState,
    svc: &Service,
    open: &Open,
    admin: &Admin,
) -> Result<(String, AdminDone), Refusal> {
    let Some(users) = &svc.users else {
        return Err(Refusal::new(
            Code::NotAuthorized,
            format!(
                "agent {} does not make database users for service {:?}: give it \
                 services.{}.users in agent.yaml",
                state.config().name,
                svc.name,
                svc.name
            ),
        ));
    };
    let binding = admin.binding();
    if binding.is_empty() || binding.len() > MAX_BINDING_ID || binding.contains(char::is_control) {
        return Err(Refusal::new(
            Code::BadRequest,
            format!("a binding id is 1 to {MAX_BINDING_ID} printable characters"),
        ));
    }
    let username = binding_username(binding);
    let backend = state
        .backends
        .lease(&svc.name, forward::relay_choice(open))
        .await?;
    let addr = backend.addr().to_owned();
    let opts = crate::health::mysql_opts(&addr, &users.admin, &users.password);
    let mut conn = tokio::time::timeout(backend.connect_timeout(), Conn::new(opts))
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            Refusal::new(
                Code::BackendUnavailable,
                format!(
                    "service {:?}: cannot log in to {addr} as {}: {e}",
                    svc.name, users.admin
                ),
            )
        })?;
    let account = format!("'{username}'@'{}'", users.host);
    let done = match admin {
        Admin::CreateUser { .. } => {
            let password = new_password();
            create(&mut conn, users, &account, &password)
                .await
                .map_err(|e| failed(svc, &account, &e.to_string().replace(&password, "***")))?;
            info!(service = %svc.name, user = %username, node = %backend.node(), "binding user created");
            AdminDone::User { username, password }
        }
        Admin::DropUser { .. } => {
            conn.query_drop(format!("DROP USER IF EXISTS {account}"))
                .await
                .map_err(|e| failed(svc, &account, &e))?;
            let killed = kill_sessions(&mut conn, &username).await;
            info!(service = %svc.name, user = %username, node = %backend.node(), killed, "binding user dropped");
            AdminDone::Dropped { username }
        }
    };
    let _ = conn.disconnect().await;
    Ok((addr, done))
}

/// Creates (or updates) `account` with `password` and exactly the configured grants.
async fn create(
    conn: &mut Conn,
    users: &Users,
    account: &str,
    password: &str,
) -> Result<(), mysql_async::Error> {
    conn.query_drop(format!(
        "CREATE USER IF NOT EXISTS {account} IDENTIFIED BY '{password}'"
    ))
    .await?;
    conn.query_drop(format!("ALTER USER {account} IDENTIFIED BY '{password}'"))
        .await?;
    conn.query_drop(format!(
        "REVOKE ALL PRIVILEGES, GRANT OPTION FROM {account}"
    ))
    .await?;
    for g in &users.grants {
        conn.query_drop(g.statement(account)).await?;
    }
    Ok(())
}

/// Ends the open sessions of `user`, as far as the admin may see and kill them; how many.
async fn kill_sessions(conn: &mut Conn, user: &str) -> usize {
    let ids: Vec<u64> = match conn
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
            (user,),
        )
        .await
    {
        Ok(ids) => ids,
        Err(e) => {
            debug!(error = %e, "cannot list the dropped user's sessions");
            return 0;
        }
    };
    let mut killed = 0;
    for id in ids {
        match conn.query_drop(format!("KILL CONNECTION {id}")).await {
            Ok(()) => killed += 1,
            Err(e) => debug!(error = %e, id, "cannot end a session of the dropped user"),
        }
    }
    killed
}

fn failed(svc: &Service, account: &str, e: &dyn std::fmt::Display) -> Refusal {
    Refusal::new(
        Code::AdminFailed,
        format!(
            "service {:?}: the database refused {account}: {e}",
            svc.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(text: &str) -> String {
        Grant::parse(text).unwrap().to_string()
    }

    #[test]
    fn grants_are_normalised_and_underscores_escaped() {
        assert_eq!(
            shown("select, Insert ,UPDATE,delete on appdb.*"),
            "SELECT, INSERT, UPDATE, DELETE ON `appdb`.*"
        );
        assert_eq!(
            shown("ALL PRIVILEGES ON app_db.*"),
            "ALL PRIVILEGES ON `app\\_db`.*"
        );
        assert_eq!(
            shown("SELECT ON `my app`.orders"),
            "SELECT ON `my app`.`orders`"
        );
        assert_eq!(
            shown("create  temporary   tables ON db1.*"),
            "CREATE TEMPORARY TABLES ON `db1`.*"
        );
        // The table-level form takes names literally: no escaping.
        assert_eq!(shown("SELECT ON app_db.t_1"), "SELECT ON `app_db`.`t_1`");
        assert_eq!(
            Grant::parse("SELECT ON appdb.*")
                .unwrap()
                .statement("'pb_x'@'%'"),
            "GRANT SELECT ON `appdb`.* TO 'pb_x'@'%'"
        );
    }

    #[test]
    fn unsafe_grants_are_refused_with_the_reason() {
        let cases = [
            ("SELECT ON *.*", "is not db.*"),
            ("ALL ON *.*", "is not db.*"),
            ("SELECT ON `%`.*", "% is not allowed"),
            ("SELECT ON app%.*", "name the database"),
            ("SUPER ON appdb.*", "may not be granted"),
            ("FILE ON appdb.*", "may not be granted"),
            ("CREATE USER ON appdb.*", "may not be granted"),
            ("GRANT OPTION ON appdb.*", "may not be granted"),
            ("SELECT ON appdb.* WITH GRANT OPTION", "is not a table name"),
            ("SELECT ON appdb.*; DROP DATABASE x", "';' is not allowed"),
            ("SELECT ON 'appdb'.*", "is not allowed"),
            ("SELECT ON \"appdb\".*", "is not allowed"),
            ("SELECT ON appdb.* -- x", "comments"),
            ("SELECT ON appdb.* /* x */", "comments"),
            ("SELECT ON mysql.*", "system schema"),
            ("SELECT ON `MySQL`.user", "system schema"),
            ("SELECT ON information_schema.*", "system schema"),
            ("SELECT (id) ON appdb.t", "may not be granted"),
            ("SELECT, ON appdb.*", "an empty privilege"),
            ("SELECT appdb.*", "is not PRIVILEGE"),
            ("SELECT ON appdb", "name the database and the tables"),
            ("SELECT ON appdb.t.u", "is not a table name"),
            ("SELECT ON ``.*", "is not db.*"),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(text, want)| match Grant::parse(text) {
                Ok(g) => Some(format!("{text:?} accepted as {g}")),
                Err(e) if !e.contains(want) => Some(format!("{text:?}: {e} (want {want:?})")),
                Err(_) => None,
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn hosts_are_patterns_without_quotes() {
        for ok in [
            "%",
            "10.0.%",
            "app.example.com",
            "::1",
            "10.0.0.0/255.0.0.0",
        ] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a'b", "a b", "x;y", "h\\"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_long_random_alphanumerics() {
        let a = new_password();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, new_password());
    }
}
