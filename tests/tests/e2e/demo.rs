//! `scripts/demo`, run as a user runs it: with a database it can log in to, it tunnels to that
//! one; with none, it starts its own private MariaDB. Either way a client run with `--exec`
//! reads through the tunnel. The script uses the binaries this test run built
//! (`POSTERN_BIN`), so it builds nothing here.

use std::process::Stdio;
use std::time::Duration;

use postern_tests::mariadb::free_port;
use postern_tests::procs::bin;
use postern_tests::*;
use tokio::process::Command;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo");
const README: &str = include_str!("../../../README.md");
/// The README's install command, which the demo must run as it is (a different set of packages
/// unifies other features and rebuilds).
const INSTALL: &str = "cargo build --release --locked -p postern-relay -p postern-agent";

/// Runs the demo against `backend` with `--exec mariadb -u root ... -e sql`; returns stdout.
async fn demo(backend: &str, sql: &str) -> String {
    let bin_dir = bin("postern-relay")
        .parent()
        .expect("target dir")
        .to_path_buf();
    let mut cmd = Command::new("bash");
    cmd.arg(DEMO)
        .args([
            "--exec",
            "mariadb",
            "-u",
            "root",
            "--batch",
            "--skip-column-names",
        ])
        .args(["-e", sql])
        .env("BACKEND", backend)
        .env("POSTERN_BIN", &bin_dir)
        .env_remove("OWN_DB")
        .env_remove("DB_USER")
        .env_remove("DB_PASSWORD")
        .env_remove("MYSQL_PWD")
        .env_remove("LISTEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the demo finishes within 60 s")
        .expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scripts/demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tunnels_to_a_database_it_can_log_in_to_or_starts_its_own() {
    let script = std::fs::read_to_string(DEMO).expect("read scripts/demo");
    assert!(
        README.contains(INSTALL) && script.contains(INSTALL),
        "the README's install command and the demo's build must be the same: {INSTALL}"
    );

    // A database where root logs in over TCP with no password: the demo uses it.
    let db = MariaDb::start().await;
    db.sql("CREATE DATABASE demo_marker");
    let out = demo(&db.backend(), "SHOW DATABASES LIKE 'demo_marker'").await;
    assert!(
        out.contains(&format!("Database: {}, user root.", db.backend())),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "demo_marker"), "{out}");

    // Nothing listens at BACKEND: the demo starts its own database and logs in with the
    // password it prints.
    let nothing = format!("127.0.0.1:{}", free_port());
    let out = demo(&nothing, "SELECT CONCAT('through the tunnel ', 6 * 7)").await;
    assert!(out.contains("starting a private MariaDB"), "{out}");
    assert!(out.contains("user root, password "), "{out}");
    assert!(out.lines().any(|l| l == "through the tunnel 42"), "{out}");
}
