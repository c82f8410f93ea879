//! The stock `mariadb` command-line client, as tests run it against a port (plaintext, root,
//! batch output without column names).

use std::process::{Command, Output};

use crate::mariadb::find;

/// Runs `sql` with the `mariadb` client against `127.0.0.1:port`.
pub fn cli(port: u16, sql: &str) -> Output {
    Command::new(find("mariadb"))
        .args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "--protocol=TCP",
            "-uroot",
            "--batch",
            "--skip-column-names",
        ])
        .arg(format!("-P{port}"))
        .arg("-e")
        .arg(sql)
        .output()
        .expect("run mariadb")
}

/// Runs `sql` and returns its output, or the client's error text.
pub fn query(port: u16, sql: &str) -> Result<String, String> {
    let out = cli(port, sql);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// [`query`] off the async runtime's threads.
pub async fn query_async(port: u16, sql: &str) -> Result<String, String> {
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || query(port, &sql))
        .await
        .map_err(|e| e.to_string())?
}
