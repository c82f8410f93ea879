//! `connect --exec PROGRAM ARGS`: runs a MySQL client (or any program) against the local port
//! and exits with its status. The interactive chooser ([`crate::chooser`]) starts its clients
//! the same way.
//!
//! With a binding (`--binding`, `--service-key`) the credentials' MySQL user goes on the
//! client's command line (`--user`, before the user's own arguments, which may override it) and
//! the password in the `MYSQL_PWD` environment variable, never on the command line, where `ps`
//! would show it.

use std::net::SocketAddr;
use std::process::ExitCode;

/// MySQL and MariaDB client programs, which get `--host`, `--port` and `--protocol=TCP`.
const MYSQL_CLIENTS: &[&str] = &[
    "mariadb",
    "mysql",
    "mysqldump",
    "mariadb-dump",
    "mysqladmin",
    "mariadb-admin",
    "mysqlshow",
    "mariadb-show",
    "mysqlcheck",
    "mariadb-check",
    "mysqlimport",
    "mariadb-import",
];

/// The MySQL login a binding carries, for the clients `connect` starts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Login {
    /// The user (empty: the client's default).
    pub user: String,
    /// The password (empty: none), passed as `MYSQL_PWD`.
    pub password: String,
    /// The database (empty: none), the default of the `mariadb`/`mysql` shell.
    pub database: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Runs `program` with `args` against `local`: MySQL clients get the address as options (after
/// their option-file options, which must come first); every program gets it in the
/// environment (`POSTERN_HOST`, `POSTERN_PORT`, `MYSQL_HOST`, `MYSQL_TCP_PORT`). Exits with the
/// program's status, 128 + the signal that ended it, or 127 if it cannot be started.
pub async fn run(program: &str, args: &[String], local: SocketAddr) -> ExitCode {
    run_with(program, args, local, None, None).await
}

/// [`run`] with a binding's `login` (the user for MySQL clients, the password as `MYSQL_PWD`
/// for every program) and the program's standard output sent to `stdout` (a file) if given.
pub async fn run_with(
    program: &str,
    args: &[String],
    local: SocketAddr,
    login: Option<&Login>,
    stdout: Option<std::fs::File>,
) -> ExitCode {
    let base = std::path::Path::new(program)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(program);
    let mut cmd = tokio::process::Command::new(program);
    let mut rest = args;
    if MYSQL_CLIENTS.contains(&base) {
        while let Some((first, tail)) = rest.split_first() {
            if !first.starts_with("--no-defaults") && !first.starts_with("--defaults") {
                break;
            }
            cmd.arg(first);
            rest = tail;
        }
        cmd.arg(format!("--host={}", local.ip()))
            .arg(format!("--port={}", local.port()))
            .arg("--protocol=TCP");
        if let Some(l) = login.filter(|l| !l.user.is_empty()) {
            cmd.arg(format!("--user={}", l.user));
        }
        // Only the shells take a default database as an option (mysqldump's is positional).
        if matches!(base, "mariadb" | "mysql")
            && let Some(l) = login.filter(|l| !l.database.is_empty())
        {
            cmd.arg(format!("--database={}", l.database));
        }
    }
    if let Some(l) = login.filter(|l| !l.password.is_empty()) {
        cmd.env("MYSQL_PWD", &l.password);
    }
    if let Some(file) = stdout {
        cmd.stdout(file);
    }
    cmd.args(rest)
        .env("POSTERN_HOST", local.ip().to_string())
        .env("POSTERN_PORT", local.port().to_string())
        .env("MYSQL_HOST", local.ip().to_string())
        .env("MYSQL_TCP_PORT", local.port().to_string());
    let status = match cmd.status().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot run {program}: {e}");
            return ExitCode::from(127);
        }
    };
    match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => {
            use std::os::unix::process::ExitStatusExt;
            let signal = u8::try_from(status.signal().unwrap_or(0)).unwrap_or(0);
            ExitCode::from(128u8.saturating_add(signal))
        }
    }
}
