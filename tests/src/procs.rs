//! The real `postern-relay` and `postern-agent` binaries as child processes, for tests that kill
//! them or check exit statuses and log lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The path of a workspace binary next to the test executable (`target/<profile>/NAME`).
///
/// `cargo test` does not build other packages' binaries, so the test command builds them
/// first (`cargo build --workspace`, which `.ci/run` and the README do).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-HASH -> target/debug/NAME
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` before `cargo test`",
        path.display()
    );
    path
}

/// A running binary whose stderr goes to a log file. Killed on drop.
pub struct Proc {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `name` with `args`, logging to `log`.
    pub fn spawn(name: &str, args: &[&str], log: PathBuf) -> Self {
        Self::spawn_env(name, args, &[], log)
    }

    /// Starts `name` with `args` and extra environment variables, logging to `log`.
    pub fn spawn_env(name: &str, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Self {
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin(name))
            .args(args)
            // The proxy settings of the machine running the tests must not leak in.
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn");
        Self { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL: no goodbye to peers).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
