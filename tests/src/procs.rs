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

    /// Sends SIGTERM (what systemd and Cloud Foundry send to stop a process).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.id());
    }

    /// Waits up to `within` for the process to exit; its status, or `None` if it still runs.
    pub async fn wait_exit(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Proc {
    /// Waits up to `within` for a log line containing `needle` and returns it.
    pub async fn wait_log(&self, needle: &str, within: std::time::Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line containing {needle:?} in {}:\n{text}",
                self.log.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
}

/// A `postern-relay run` process on ephemeral ports, which it reports in its log.
pub struct RelayProc {
    /// The process.
    pub proc: Proc,
    /// Where agents and `connect` clients reach it.
    pub quic: std::net::SocketAddr,
    /// Its HTTP listener, when the config has one.
    pub http: Option<std::net::SocketAddr>,
    /// `(service, kind, address)` of every service listener (kind `mysql` or `tls`).
    pub listeners: Vec<(String, String, std::net::SocketAddr)>,
}

impl RelayProc {
    /// Writes `yaml` as `dir/relay.yaml`, starts the relay and reads its addresses from its log.
    pub async fn start(dir: &Path, yaml: &str) -> Self {
        Self::start_env(dir, yaml, &[]).await
    }

    /// [`start`](Self::start) with extra environment variables (e.g. Cloud Foundry's).
    pub async fn start_env(dir: &Path, yaml: &str, env: &[(&str, &str)]) -> Self {
        let cfg = dir.join("relay.yaml");
        std::fs::write(&cfg, yaml).expect("write relay.yaml");
        let vars: std::collections::BTreeMap<&str, &str> = env.iter().copied().collect();
        let config =
            postern_relay::Config::load_with(&cfg, &vars).unwrap_or_else(|e| panic!("{e}"));
        let expected: usize = config
            .services
            .values()
            .map(|s| usize::from(s.listen.is_some()) + usize::from(s.tls_listen.is_some()))
            .sum();
        let cfg = cfg.to_str().expect("utf-8 path").to_owned();
        let proc = Proc::spawn_env(
            "postern-relay",
            &["run", "--config", &cfg],
            env,
            dir.join("relay.log"),
        );
        let http = match config.http_listen {
            None => None,
            Some(_) => {
                let line = proc
                    .wait_log("http listener ready", std::time::Duration::from_secs(10))
                    .await;
                field(&line, "addr").and_then(|a| a.parse().ok())
            }
        };
        let quic_line = proc
            .wait_log("relay listening", std::time::Duration::from_secs(10))
            .await;
        let quic = field(&quic_line, "quic").expect("quic address in the log");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let listeners = loop {
            let text = proc.log_text();
            let found: Vec<_> = text
                .lines()
                .filter(|l| l.contains("service listener ready"))
                .filter_map(|l| {
                    let svc = field(l, "service")?;
                    let kind = field(l, "kind")?;
                    let addr = field(l, "addr")?.parse().ok()?;
                    Some((svc, kind, addr))
                })
                .collect();
            if found.len() >= expected {
                break found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay listeners not reported:\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        };
        Self {
            quic: quic.parse().expect("quic address"),
            http,
            listeners,
            proc,
        }
    }

    /// The address of `service`'s listener of `kind` (`mysql` or `tls`).
    pub fn listener(&self, service: &str, kind: &str) -> std::net::SocketAddr {
        self.listeners
            .iter()
            .find(|(s, k, _)| s == service && k == kind)
            .map(|(_, _, a)| *a)
            .unwrap_or_else(|| panic!("no {kind} listener for {service}"))
    }

    /// Waits for a log line containing `needle` (5 s) and returns it.
    pub async fn wait_log(&self, needle: &str) -> String {
        self.proc
            .wait_log(needle, std::time::Duration::from_secs(5))
            .await
    }
}

/// The value of `key=value` in a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}
