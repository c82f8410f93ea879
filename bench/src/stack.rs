//! The system under test: a private `mariadbd` (offering TLS too), certificates made with
//! Postern's own PKI code, and two tunnels, each made of the release binaries `postern-relay
//! run`, `postern-agent run` and `postern-agent connect` as three separate processes on loopback,
//! so that each one's memory and CPU time can be read from `/proc/PID`:
//!
//! ```text
//! direct:      client ───────────────────────────────────────────────────────────────▶ mariadbd
//! QUIC:        client ─tcp─▶ connect ─quic─▶ postern-relay ◀─quic─ postern-agent run ─tcp─▶ mariadbd
//! WebSocket:   client ─tcp─▶ connect ──ws──▶ postern-relay ◀──ws── postern-agent run ─tcp─▶ mariadbd
//! direct TLS:  client ─mysql+tls───────────────────────────────────────────────────────▶ mariadbd
//! MySQL-TLS:   client ─mysql+tls─▶ postern-relay (QUIC stack) ◀─quic─ agent ─tcp─▶ mariadbd
//! ```
//!
//! The WebSocket tunnel is a second relay and agent of its own (`ws://` to the relay's
//! `listen.http`, `transport: websocket` on both sides), so its memory is measured on fresh
//! processes too. The MySQL-native path goes to the QUIC relay's service `listen` address
//! (`protocol: mysql`, `tls_termination: relay`).
//!
//! Every process is stopped when the [`Stack`] is dropped (also on error or Ctrl-C): SIGTERM, a
//! few seconds to exit, then SIGKILL.
//!
//! The soak starts the same stack with a [`Tuning`]: a `mariadbd` for tens of thousands of
//! connections, a higher per-service connection limit at the relays, and ways to read each
//! relay's and agent's task count (the relay's API for `/metrics`, a `NOTIFY_SOCKET` per agent).

use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use postern_common::pki::Kind;
use postern_tests::config::{AgentConfig, AgentTransport, RelayConfig, RelayListen, RelaySpec};
use postern_tests::{MariaDb, TestPki};

use crate::probe::{Api, StatusReader};

/// The names of the binaries the bench runs.
pub(crate) const BINARIES: [&str; 2] = ["postern-relay", "postern-agent"];
/// The service name the relay and agent use for MariaDB.
pub(crate) const SERVICE: &str = "mariadb";
/// The agent's and the client's certificate names.
pub(crate) const NAME: &str = "bench";
/// The relay API's user, when the API is on.
const API_USER: &str = "bench";
/// Deadline for each process to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// What the soak changes in the stack; the benchmark runs with the default (nothing changed).
#[derive(Debug, Default, Clone)]
pub(crate) struct Tuning {
    /// Extra `mariadbd` options (they come last, so they win).
    pub(crate) mariadbd: Vec<String>,
    /// The service's `max_connections` at each relay (`None`: the relay's default).
    pub(crate) service_max_connections: Option<usize>,
    /// Turn on each relay's API (for `/metrics`) and bind a `NOTIFY_SOCKET` for each agent (for
    /// its status line), so their task counts can be read.
    pub(crate) observe: bool,
}

/// How a tunnel's agent and `connect` reach its relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Quic,
    WebSocket,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::WebSocket => "ws",
        }
    }

    /// The name in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Quic => "QUIC",
            Self::WebSocket => "WebSocket",
        }
    }
}

/// One relay, one agent and one `connect`, all running.
///
/// Fields drop in declaration order: `connect` first, the relay last.
pub(crate) struct Tunnel {
    /// `postern-agent connect`: the local port clients of the tunnel use.
    pub(crate) connect: Proc,
    /// `postern-agent run`, next to the database.
    pub(crate) agent: Proc,
    /// `postern-relay run`.
    pub(crate) relay: Proc,
    /// Where `connect` listens.
    pub(crate) addr: SocketAddr,
    /// The relay's MySQL-native listener for the service (QUIC tunnel only).
    pub(crate) mysql: Option<SocketAddr>,
    /// The relay's API, when [`Tuning::observe`] turned it on.
    pub(crate) api: Option<Api>,
    /// The agent's status lines, when [`Tuning::observe`] asked for them.
    pub(crate) status: Option<StatusReader>,
}

impl Tunnel {
    /// Stops the processes in order and reports any that did not exit cleanly.
    pub(crate) fn shutdown(&mut self) -> Vec<String> {
        [&mut self.connect, &mut self.agent, &mut self.relay]
            .into_iter()
            .filter_map(|p| p.stop().err().map(|e| format!("{e:#}")))
            .collect()
    }
}

/// MariaDB and both tunnels, all running.
///
/// Fields drop in declaration order: the tunnels first, the database last, the certificate and
/// config directory after everything that reads it.
pub(crate) struct Stack {
    /// The tunnel over QUIC, whose relay also has the MySQL-native listener.
    pub(crate) quic: Tunnel,
    /// The tunnel over WebSocket.
    pub(crate) ws: Tunnel,
    /// The private MariaDB server.
    pub(crate) db: MariaDb,
    /// The process id of `mariadbd`.
    pub(crate) db_pid: u32,
    /// Client certificate and key, for the MySQL-native TLS paths.
    pub(crate) client_cert: (PathBuf, PathBuf),
    /// The CA that signed the relay's, mariadbd's and the client's certificates.
    pub(crate) ca: PathBuf,
    pki: TestPki,
}

impl Stack {
    /// Starts everything and waits until a client can connect through both tunnels.
    ///
    /// `worker_threads`, when set, becomes `TOKIO_WORKER_THREADS` of the Postern processes
    /// (by default their runtimes start one worker per CPU).
    pub(crate) async fn start(bin_dir: &Path, worker_threads: Option<u32>) -> Result<Self> {
        let env: Vec<(&str, String)> = worker_threads
            .map(|n| ("TOKIO_WORKER_THREADS", n.to_string()))
            .into_iter()
            .collect();
        let pki = prepare(bin_dir)?;
        let client_base = pki.issue(Kind::Client, NAME);
        let db = start_mariadb(&pki).await?;
        let db_pid = pid_of(&db)?;
        let tuning = Tuning::default();
        let quic = start_tunnel(bin_dir, &pki, &db, Transport::Quic, &env, &tuning).await?;
        let ws = start_tunnel(bin_dir, &pki, &db, Transport::WebSocket, &env, &tuning).await?;
        Ok(Self {
            quic,
            ws,
            db,
            db_pid,
            client_cert: pki.files(&client_base),
            ca: pki.ca(),
            pki,
        })
    }

    /// Stops the Postern processes in order and reports any that did not exit cleanly.
    pub(crate) fn shutdown(mut self) -> Vec<String> {
        let mut problems = self.quic.shutdown();
        problems.extend(self.ws.shutdown());
        drop(self.pki);
        problems
    }
}

/// MariaDB and one tunnel per transport asked for, tuned: the soak's stack.
///
/// Fields drop in declaration order: the tunnels first, the database last, the certificate and
/// config directory after everything that reads it.
pub(crate) struct TunedStack {
    /// The tunnels, in the order asked for.
    pub(crate) tunnels: Vec<(Transport, Tunnel)>,
    /// The private MariaDB server.
    pub(crate) db: MariaDb,
    /// The process id of `mariadbd`.
    pub(crate) db_pid: u32,
    pki: TestPki,
}

impl TunedStack {
    /// Starts mariadbd and a tunnel per transport in `transports`, with what `tuning` changes.
    pub(crate) async fn start(
        bin_dir: &Path,
        transports: &[Transport],
        tuning: &Tuning,
    ) -> Result<Self> {
        let pki = prepare(bin_dir)?;
        let db = start_mariadb_with(&pki, &tuning.mariadbd).await?;
        let db_pid = pid_of(&db)?;
        let mut tunnels = Vec::new();
        for &t in transports {
            tunnels.push((t, start_tunnel(bin_dir, &pki, &db, t, &[], tuning).await?));
        }
        Ok(Self {
            tunnels,
            db,
            db_pid,
            pki,
        })
    }

    /// Stops the Postern processes in order and reports any that did not exit cleanly.
    pub(crate) fn shutdown(mut self) -> Vec<String> {
        let problems = self
            .tunnels
            .iter_mut()
            .flat_map(|(_, t)| t.shutdown())
            .collect();
        drop(self.tunnels);
        drop(self.pki);
        problems
    }
}

/// Checks the binaries and programs, and makes the certificates for the agent and the client.
fn prepare(bin_dir: &Path) -> Result<TestPki> {
    check_binaries(bin_dir)?;
    // MariaDb::start panics if mariadbd cannot start; check the programs first so the common
    // case (not installed) is a plain error.
    for program in ["mariadb-install-db", "mariadbd"] {
        if !on_path(program) {
            bail!("{program} not found: install mariadb-server (apt-get install mariadb-server)");
        }
    }
    let pki = TestPki::new();
    pki.issue(Kind::Agent, NAME);
    pki.issue(Kind::Client, NAME);
    Ok(pki)
}

/// The process id of `db`'s mariadbd.
fn pid_of(db: &MariaDb) -> Result<u32> {
    fs::read_to_string(db.dir().join("mysqld.pid"))
        .context("read mariadbd pid file")?
        .trim()
        .parse()
        .context("parse mariadbd pid file")
}

/// Fails unless the relay and agent binaries are in `bin_dir`; warns if they look older than
/// the sources.
pub(crate) fn check_binaries(bin_dir: &Path) -> Result<()> {
    for name in BINARIES {
        let path = bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} is missing: build it first with \
                 `cargo build --release -p postern-relay -p postern-agent -p postern-bench`",
                path.display()
            );
        }
    }
    warn_if_stale(bin_dir);
    Ok(())
}

/// Starts a relay, an agent and `connect` that talk over `transport`.
async fn start_tunnel(
    bin_dir: &Path,
    pki: &TestPki,
    db: &MariaDb,
    transport: Transport,
    env: &[(&str, String)],
    tuning: &Tuning,
) -> Result<Tunnel> {
    let backend = db.backend();
    let configure = |agent: &mut AgentConfig| {
        agent.service(SERVICE, &backend).connect_timeout = None;
    };
    start_tunnel_tuned(bin_dir, pki, transport, env, &configure, tuning).await
}

/// Starts a relay, an agent whose service `configure` sets up, and `connect`, over `transport`.
pub(crate) async fn start_tunnel_with(
    bin_dir: &Path,
    pki: &TestPki,
    transport: Transport,
    env: &[(&str, String)],
    configure: &dyn Fn(&mut AgentConfig),
) -> Result<Tunnel> {
    start_tunnel_tuned(bin_dir, pki, transport, env, configure, &Tuning::default()).await
}

/// [`start_tunnel_with`], with what `tuning` changes.
async fn start_tunnel_tuned(
    bin_dir: &Path,
    pki: &TestPki,
    transport: Transport,
    env: &[(&str, String)],
    configure: &dyn Fn(&mut AgentConfig),
    tuning: &Tuning,
) -> Result<Tunnel> {
    let dir = pki.dir().to_path_buf();
    let tag = transport.as_str();
    let (relay, ports, api) = start_relay(bin_dir, pki, transport, env, tuning).await?;
    let url = match transport {
        Transport::Quic => format!("quic://{}", ports.quic),
        Transport::WebSocket => format!("ws://{}/v1/tunnel", ports.http),
    };
    let transport_name = match transport {
        Transport::Quic => "quic",
        Transport::WebSocket => "websocket",
    };

    let mut agent_yaml = AgentConfig::new(pki, NAME, RelaySpec::Url(url.clone()));
    agent_yaml.transport = Some(match transport {
        Transport::Quic => AgentTransport::Quic,
        Transport::WebSocket => AgentTransport::Websocket,
    });
    configure(&mut agent_yaml);
    let agent_config = dir.join(format!("{tag}-agent.yaml"));
    fs::write(&agent_config, agent_yaml.to_yaml()).context("write agent.yaml")?;
    // The status reader binds before the agent starts, as systemd's socket exists before the
    // service, and only the agent gets the variable (`connect` is not a service).
    let mut agent_env = env.to_vec();
    let status = if tuning.observe {
        let path = dir.join(format!("{tag}-agent.notify"));
        let reader = StatusReader::bind(&path)?;
        agent_env.push(("NOTIFY_SOCKET", path_arg(&path)));
        Some(reader)
    } else {
        None
    };
    let mut agent = Proc::spawn(
        "agent",
        &bin_dir.join("postern-agent"),
        &["run".into(), "--config".into(), path_arg(&agent_config)],
        dir.join(format!("{tag}-agent.log")),
        &agent_env,
    )?;
    agent
        .wait_log("connected to relay", READY_WITHIN)
        .await
        .with_context(|| format!("agent did not connect to the relay over {transport_name}"))?;

    let addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?)
        .parse()
        .context("local address")?;
    let (cert, key) = pki.files(&format!("client-{NAME}"));
    let mut connect = Proc::spawn(
        "connect",
        &bin_dir.join("postern-agent"),
        &[
            "connect".into(),
            SERVICE.into(),
            "--relay".into(),
            url,
            "--transport".into(),
            transport_name.into(),
            "--server-name".into(),
            "localhost".into(),
            "--ca".into(),
            path_arg(&pki.ca()),
            "--cert".into(),
            path_arg(&cert),
            "--key".into(),
            path_arg(&key),
            "--listen".into(),
            addr.to_string(),
        ],
        dir.join(format!("{tag}-connect.log")),
        env,
    )?;
    connect
        .wait_log("is available at", READY_WITHIN)
        .await
        .with_context(|| format!("connect ({transport_name}) did not open its local port"))?;
    Ok(Tunnel {
        connect,
        agent,
        relay,
        addr,
        mysql: ports.mysql,
        api,
        status,
    })
}

/// Starts MariaDB (with TLS, certificate from `pki`) through the test harness, which panics on
/// failure: the panic is caught and becomes an error, after one retry (creating the system
/// tables fails now and then on a loaded machine).
pub(crate) async fn start_mariadb(pki: &TestPki) -> Result<MariaDb> {
    start_mariadb_with(pki, &[]).await
}

/// [`start_mariadb`] with `extra` options for `mariadbd` after the harness's own (so they win).
pub(crate) async fn start_mariadb_with(pki: &TestPki, extra: &[String]) -> Result<MariaDb> {
    let (cert, key) = pki.files(&pki.issue_server("mariadb"));
    let mut options = vec![
        format!("--ssl-ca={}", pki.ca().display()),
        format!("--ssl-cert={}", cert.display()),
        format!("--ssl-key={}", key.display()),
    ];
    options.extend(extra.iter().cloned());
    let mut last = String::new();
    for _ in 0..2 {
        let options = options.clone();
        let start = async move {
            let args: Vec<&str> = options.iter().map(String::as_str).collect();
            MariaDb::start_with(&args).await
        };
        match tokio::spawn(start).await {
            Ok(db) => return Ok(db),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                last = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "unknown reason".into());
                eprintln!("mariadbd did not start; retrying once");
            }
            Err(e) => return Err(e).context("start mariadbd"),
        }
    }
    bail!("mariadbd did not start: {last}")
}

/// Where a relay listens.
struct RelayPorts {
    quic: SocketAddr,
    http: SocketAddr,
    mysql: Option<SocketAddr>,
}

/// Starts a relay on free ports (retrying if a port was taken meanwhile): QUIC, HTTP (for the
/// WebSocket tunnel) and, for the QUIC tunnel, the service's MySQL-native listener.
async fn start_relay(
    bin_dir: &Path,
    pki: &TestPki,
    transport: Transport,
    env: &[(&str, String)],
    tuning: &Tuning,
) -> Result<(Proc, RelayPorts, Option<Api>)> {
    let dir = pki.dir();
    let tag = transport.as_str();
    let credentials = if tuning.observe {
        let password = format!("{:016x}", rand::random::<u64>());
        let file = dir.join(format!("{tag}-api-password"));
        fs::write(&file, &password).context("write the API password file")?;
        Some((file, password))
    } else {
        None
    };
    let mut last = None;
    for _ in 0..3 {
        let quic: SocketAddr = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("find a free udp port")?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?)
            .parse()
            .context("http address")?;
        let mysql: Option<SocketAddr> = match transport {
            Transport::Quic => Some(
                format!("127.0.0.1:{}", free_tcp_port()?)
                    .parse()
                    .context("mysql address")?,
            ),
            Transport::WebSocket => None,
        };
        let mut yaml = RelayConfig::new(pki);
        yaml.listen = RelayListen {
            quic: Some(quic.to_string()),
            http: Some(http.to_string()),
        };
        (yaml.heartbeat_interval, yaml.handshake_timeout) = (None, None);
        yaml.agent(NAME, &[SERVICE]);
        if let Some((file, _)) = &credentials {
            yaml.api(API_USER, file);
        }
        let service = yaml.service(SERVICE, &[NAME]);
        service.tls_listen = None;
        service.max_connections = tuning.service_max_connections;
        // For the QUIC tunnel, a MySQL-native listener (protocol mysql, TLS ending at the relay:
        // the defaults).
        service.listen = mysql.map(|a| a.to_string());
        let config = dir.join(format!("{tag}-relay.yaml"));
        fs::write(&config, yaml.to_yaml()).context("write relay.yaml")?;
        let mut relay = Proc::spawn(
            "relay",
            &bin_dir.join("postern-relay"),
            &["run".into(), "--config".into(), path_arg(&config)],
            dir.join(format!("{tag}-relay.log")),
            env,
        )?;
        let ready = if mysql.is_some() {
            "service listener ready"
        } else {
            "relay listening"
        };
        match relay.wait_log(ready, READY_WITHIN).await {
            Ok(()) => {
                let api = credentials.as_ref().map(|(_, password)| Api {
                    addr: http,
                    user: API_USER.into(),
                    password: password.clone(),
                });
                return Ok((relay, RelayPorts { quic, http, mysql }, api));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context("relay did not start"))
}

/// A child process whose stderr goes to a log file. Stopped on drop.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let err = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self {
            name,
            child,
            log,
            stopped: false,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls the log until a line contains `needle`, failing if the process exits first.
    async fn wait_log(&mut self, needle: &str, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("wait for child")? {
                self.stopped = true;
                bail!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {within:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The last lines of the log, for error messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, up to five seconds to exit, then SIGKILL. Errs if the exit was not clean.
    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("{} had already exited ({status})", self.name);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = SystemTime::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => bail!("{} exited with {status} on SIGTERM", self.name),
                Ok(None) if SystemTime::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    bail!("{} did not exit within 5 s of SIGTERM: killed", self.name);
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// User plus system CPU time of process `pid` (all threads), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; the fields after its ')' are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the file, so utime (14) and stime (15) are at 11 and 12.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("malformed /proc/{pid}/stat"))
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every common Linux).
pub(crate) fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Where the Postern binaries are by default: next to this executable (`target/release`).
pub(crate) fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate this executable")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("executable has no directory")
}

/// The workspace this bench was built from.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Prints a warning when a source file of the relay or agent is newer than the binaries, which
/// would mean measuring old code.
fn warn_if_stale(bin_dir: &Path) {
    let oldest_bin = BINARIES
        .iter()
        .filter_map(|b| mtime(&bin_dir.join(b)))
        .min();
    let root = workspace_root();
    let newest_src = ["common", "agent", "relay"]
        .iter()
        .filter_map(|c| newest_mtime(&root.join(c)))
        .max();
    if let (Some(bin), Some(src)) = (oldest_bin, newest_src)
        && src > bin
    {
        eprintln!(
            "warning: sources changed since {} were built; rebuild with \
             `cargo build --release -p postern-relay -p postern-agent -p postern-bench`",
            BINARIES.join(" and ")
        );
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file below `dir` (skipping `target`).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if entry.file_name() != "target" {
                    todo.push(path);
                }
            } else if let Some(t) = mtime(&path) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .any(|d| Path::new(d).join(program).is_file())
}

fn free_tcp_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("find a free tcp port")
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}
