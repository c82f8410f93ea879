//! `connect --exec PROGRAM ARGS`: runs a MySQL client (or any program) against the local port
//! and exits with its status.

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

/// Runs `program` with `args` against `local`: MySQL clients get the address as options (after
/// their option-file options, which must come first); every program gets it in the
/// environment (`POSTERN_HOST`, `POSTERN_PORT`, `MYSQL_HOST`, `MYSQL_TCP_PORT`). Exits with the
/// program's status, 128 + the signal that ended it, or 127 if it cannot be started.
pub async fn run(program: &str, args: &[String], local: SocketAddr) -> ExitCode {
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
