//! The real `postern-relay` and `postern-agent` binaries as child processes, for tests that kill
//! them or read their exit statuses and log lines.
//!
//! A log is read through [`LogMark`]s: a test marks the log before a case and then looks only at
//! what was written after the mark, so each case's assertion matches its own event and never a
//! line an earlier case wrote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::config::{AgentConfig, RelayConfig};

/// How long [`RelayProc::wait_log`] and [`AgentProc::wait_log`] wait for a line.
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// The path of a workspace binary next to the test executable (`target/<profile>/NAME`).
///
/// `cargo test` does not build other packages' binaries, so the test command builds them
/// first (`cargo build --workspace`, which `.ci/run` and the README do).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` before `cargo test`",
        path.display()
    );
    path
}

/// Where the workspace's binaries are built: `target/<profile>`, next to the test executable's
/// `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-HASH -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A position in a process's log: lines after it were written later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogMark(usize);

impl LogMark {
    /// The byte offset in the log.
    pub fn offset(self) -> usize {
        self.0
    }
}

/// A running binary whose stderr goes to a log file. Killed on drop; a panic in its log fails
/// the test at [`Proc::stop`] and on drop.
pub struct Proc {
    child: Option<Child>,
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Logs of earlier runs of this process (before restarts), checked for panics too.
    old_logs: Vec<PathBuf>,
}

impl Proc {
    /// Starts `name` with `args`, logging to `log`.
    pub fn spawn(name: &str, args: &[&str], log: PathBuf) -> Self {
        Self::spawn_env(name, args, &[], log)
    }

    /// Starts `name` with `args` and extra environment variables, logging to `log`.
    pub fn spawn_env(name: &str, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Self {
        let mut me = Self {
            child: None,
            name: name.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log,
            old_logs: Vec::new(),
        };
        me.launch();
        me
    }

    fn launch(&mut self) {
        let err = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(bin(&self.name))
            .args(&self.args)
            // The proxy settings of the machine running the tests must not leak in.
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn");
        self.child = Some(child);
    }

    /// Starts the same command again (after [`kill`](Self::kill)), logging to a new file.
    pub fn restart(&mut self) {
        self.kill();
        let n = self.old_logs.len() + 1;
        let next = self.log.with_extension(format!("{n}.log"));
        self.old_logs.push(std::mem::replace(&mut self.log, next));
        self.launch();
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log now.
    pub fn mark(&self) -> LogMark {
        LogMark(self.log_text().len())
    }

    /// Kills the process at once (SIGKILL: no goodbye to peers).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process and fails the test if it panicked.
    pub fn stop(mut self) {
        self.kill();
        self.check_panics();
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM (what systemd and Cloud Foundry send to stop a process).
    pub fn terminate(&self) {
        signal(self.id(), "TERM");
    }

    /// Sends signal `name` (`STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        signal(self.id(), name);
    }

    /// Waits up to `within` for the process to exit; its status, or `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for a log line after `since` containing `needle` and returns it.
    pub async fn wait_log_after(&self, since: LogMark, needle: &str, within: Duration) -> String {
        self.wait_line(since, within, needle, |l| l.contains(needle))
            .await
    }

    /// Waits up to `within` for a log line after `since` for which `matches` holds (`what`
    /// describes it when none comes).
    pub async fn wait_line(
        &self,
        since: LogMark,
        within: Duration,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.log_text();
            let fresh = text.get(since.0..).unwrap_or_default();
            if let Some(line) = fresh.lines().find(|l| matches(l)) {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line {what:?} in {} after byte {}:\n{fresh}",
                self.log.display(),
                since.0
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits up to `within` for a log line containing `needle` and returns it.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> String {
        self.wait_log_after(LogMark::default(), needle, within)
            .await
    }

    fn check_panics(&self) {
        if std::thread::panicking() {
            return;
        }
        for log in self.old_logs.iter().chain([&self.log]) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(
                !text.contains("panicked at"),
                "{} panicked (log {}):\n{text}",
                self.name,
                log.display()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        self.check_panics();
    }
}

/// A `postern-relay run` process on the ports of its config (ephemeral ones are read back from
/// its log).
pub struct RelayProc {
    /// The process.
    pub proc: Proc,
    /// Where agents and `connect` clients reach it, if it listens for QUIC.
    pub quic: Option<std::net::SocketAddr>,
    /// The HTTP address, if configured.
    pub http: Option<std::net::SocketAddr>,
    /// `(service, kind, address)` of every service listener (kind `mysql` or `tls`).
    pub listeners: Vec<(String, String, std::net::SocketAddr)>,
}

impl RelayProc {
    /// Writes `config` to `path`, starts the relay and reads its addresses from its log.
    pub async fn start(path: &Path, config: &RelayConfig) -> Self {
        Self::start_env(path, config, &[]).await
    }

    /// [`start`](Self::start) with extra environment variables (e.g. Cloud Foundry's).
    pub async fn start_env(path: &Path, config: &RelayConfig, env: &[(&str, &str)]) -> Self {
        let parsed = config.load_with(path, env);
        let cfg = path.to_str().expect("utf-8 path").to_owned();
        let proc = Proc::spawn_env(
            "postern-relay",
            &["run", "--config", &cfg],
            env,
            path.with_extension("log"),
        );
        let mut me = Self {
            proc,
            quic: None,
            http: None,
            listeners: Vec::new(),
        };
        me.read_addresses(&parsed).await;
        me
    }

    async fn read_addresses(&mut self, config: &postern_relay::Config) {
        let expected: usize = config
            .services
            .values()
            .map(|s| usize::from(s.listen.is_some()) + usize::from(s.tls_listen.is_some()))
            .sum();
        if config.http_listen.is_some() {
            let line = self
                .proc
                .wait_log("http listener ready", Duration::from_secs(10))
                .await;
            self.http = Some(
                field(&line, "addr")
                    .and_then(|a| a.parse().ok())
                    .expect("http address in the log"),
            );
        }
        let quic_line = self
            .proc
            .wait_log("relay listening", Duration::from_secs(10))
            .await;
        // `quic=off` without a QUIC listener.
        self.quic = field(&quic_line, "quic").and_then(|q| q.parse().ok());
        assert_eq!(
            self.quic.is_some(),
            config.quic_listen.is_some(),
            "quic address in the log: {quic_line}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        self.listeners = loop {
            let text = self.proc.log_text();
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
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
    }

    /// Kills the relay and starts it again with the same config (on the same addresses if the
    /// config names them: see [`RelayConfig::pin_ports`]).
    pub async fn restart(&mut self, config: &RelayConfig) {
        let path = PathBuf::from(&self.proc.args[2]);
        // The file is written (and checked) before the relay starts and reads it.
        let parsed = {
            let env: Vec<(&str, &str)> = self
                .proc
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            config.load_with(&path, &env)
        };
        self.proc.restart();
        self.read_addresses(&parsed).await;
    }

    /// Waits for the outcome of a reload logged after `since` ("configuration reloaded" or
    /// "reload refused"), then reads the listeners again from the log (those opened, less
    /// those closed); returns the outcome's line.
    pub async fn reloaded(&mut self, since: LogMark) -> String {
        let line = self
            .proc
            .wait_line(since, LOG_WAIT, "the outcome of a reload", |l| {
                l.contains("configuration reloaded") || l.contains("reload refused")
            })
            .await;
        let text = self.proc.log_text();
        let mut listeners: Vec<(String, String, std::net::SocketAddr)> = Vec::new();
        for l in text.lines() {
            let (Some(svc), Some(kind), Some(addr)) = (
                field(l, "service"),
                field(l, "kind"),
                field(l, "addr").and_then(|a| a.parse().ok()),
            ) else {
                continue;
            };
            if l.contains("service listener ready") {
                listeners.push((svc, kind, addr));
            } else if l.contains("service listener closed") {
                listeners.retain(|x| *x != (svc.clone(), kind.clone(), addr));
            }
        }
        self.listeners = listeners;
        line
    }

    /// The address of `service`'s listener of `kind` (`mysql` or `tls`).
    pub fn listener(&self, service: &str, kind: &str) -> std::net::SocketAddr {
        self.listeners
            .iter()
            .find(|(s, k, _)| s == service && k == kind)
            .map(|(_, _, a)| *a)
            .unwrap_or_else(|| panic!("no {kind} listener for {service}"))
    }

    /// The end of the log now.
    pub fn mark(&self) -> LogMark {
        self.proc.mark()
    }

    /// Waits for a log line containing `needle` ([`LOG_WAIT`]) and returns it.
    pub async fn wait_log(&self, needle: &str) -> String {
        self.proc.wait_log(needle, LOG_WAIT).await
    }

    /// Waits for a line written after `since` containing `needle` ([`LOG_WAIT`]).
    pub async fn wait_log_after(&self, since: LogMark, needle: &str) -> String {
        self.proc.wait_log_after(since, needle, LOG_WAIT).await
    }
}

/// A `postern-agent run` process.
pub struct AgentProc {
    /// The process.
    pub proc: Proc,
}

impl AgentProc {
    /// Writes `config` to `path` and starts the agent with extra environment `env`.
    pub fn start(path: &Path, config: &AgentConfig, env: &[(&str, &str)]) -> Self {
        config.load(path);
        let cfg = path.to_str().expect("utf-8 path").to_owned();
        Self {
            proc: Proc::spawn_env(
                "postern-agent",
                &["run", "--config", &cfg],
                env,
                path.with_extension("log"),
            ),
        }
    }

    /// Kills the agent at once.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kills the agent (if running) and starts it again.
    pub fn restart(&mut self) {
        self.proc.restart();
    }

    /// Waits for a log line containing `needle` ([`LOG_WAIT`]) and returns it.
    pub async fn wait_log(&self, needle: &str) -> String {
        self.proc.wait_log(needle, LOG_WAIT).await
    }
}

/// Sends signal `name` (`TERM`, `STOP`, `CONT`, ...) to process `pid`, as `kill -NAME` does.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// What a process holds, from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    /// Open file descriptors (entries of `fd/`).
    pub fds: usize,
    /// Resident memory (`VmRSS`), in KiB.
    pub rss_kib: u64,
    /// OS threads.
    pub threads: u64,
}

/// What process `pid` holds; `None` once it is gone.
pub fn holdings(pid: u32) -> Option<Holdings> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Holdings {
        fds,
        rss_kib: status_field(&status, "VmRSS")?,
        threads: status_field(&status, "Threads")?,
    })
}

/// The number in field `name` of a `/proc/PID/status` text (`VmRSS:\t  1234 kB` → 1234).
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The value of `key=value` in a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let status = "Name:\tpostern-relay\nThreads:\t3\nVmRSSX:\t1 kB\nVmRSS:\t   14236 kB\n";
        assert_eq!(status_field(status, "VmRSS"), Some(14236));
        assert_eq!(status_field(status, "Threads"), Some(3));
        assert_eq!(status_field(status, "VmHWM"), None);
        assert_eq!(status_field("", "VmRSS"), None);
    }

    #[test]
    fn this_process_is_read() {
        let h = holdings(std::process::id()).expect("this process");
        assert!(h.fds >= 3 && h.rss_kib > 0 && h.threads >= 1, "{h:?}");
    }
}
