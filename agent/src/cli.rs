//! The `postern-agent` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Postern agent: makes private services reachable through a relay, dialling out only.
#[derive(Debug, Parser)]
#[command(name = "postern-agent", version, about)]
pub struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "POSTERN_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    ///
    /// Dials every relay in the config and serves the services it offers until stopped.
    /// Signals: SIGTERM or SIGINT drains (each relay is told, open connections get up to 8 s),
    /// SIGHUP reloads the config file and its certificates (services added are offered,
    /// removed ones end their connections, connections of unchanged services go on; a config
    /// with errors is refused and logged, the running one stays). Under systemd (Type=notify)
    /// it reports READY=1 once in session with a relay, a STATUS= line, and watchdog pings.
    Run {
        /// The agent config file.
        #[arg(
            short,
            long,
            env = "POSTERN_AGENT_CONFIG",
            default_value = "agent.yaml"
        )]
        config: PathBuf,
    },
    /// Validate a config file without starting; exits 64 listing every error.
    CheckConfig {
        /// The agent config file.
        #[arg(
            short,
            long,
            env = "POSTERN_AGENT_CONFIG",
            default_value = "agent.yaml"
        )]
        config: PathBuf,
    },
    /// Open a local port that leads to SERVICE through the relay (like `cf tunnel`).
    Connect(Box<ConnectArgs>),
    /// Check a setup step by step and say where it breaks: the config, the certificates, each
    /// relay (DNS, TCP, UDP/QUIC, proxy CONNECT, outer TLS, WebSocket upgrade, mutual TLS, the
    /// relay's acceptance) and each backend (connect, the MySQL greeting, the health check).
    ///
    /// Each step gets a verdict (ok, warn, fail, or skipped after a failed step) and a hint when
    /// it fails. The relay is asked whether it would accept this agent without taking the session
    /// for the agent's own, so a running agent is not disturbed. Exit status: 0 when no step
    /// fails (warnings allowed), 1 when one does, 64 when the config does not parse.
    Diagnose(DiagnoseArgs),
}

/// `diagnose` arguments.
#[derive(Debug, clap::Args)]
pub struct DiagnoseArgs {
    /// The agent config file.
    #[arg(
        short,
        long,
        env = "POSTERN_AGENT_CONFIG",
        default_value = "agent.yaml"
    )]
    pub config: PathBuf,
    /// Print the steps as JSON (an object with `verdict` and `steps`: step, target, verdict,
    /// detail, hint, elapsed_ms), for tools.
    #[arg(long)]
    pub json: bool,
    /// Bound on each network step (500ms, 5s, 1m).
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub timeout: postern_common::config::HumanDuration,
}

/// `connect` arguments. Every option can also come from the environment.
///
/// Where the service, the relay and the certificate come from: the flags (`SERVICE --relay
/// --ca --cert --key`), a binding the app was given (`--binding [NAME]`, the Cloud Foundry
/// sidecar), or a service key (`--service-key FILE`, `-` for stdin). See [`crate::bound`].
#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// The service to reach.
    #[arg(
        required_unless_present_any = ["binding", "service_key"],
        conflicts_with_all = ["binding", "service_key"]
    )]
    pub service: Option<String>,
    /// Take the service, relays, certificate and key from the app's binding NAME (its
    /// binding name, service name or instance name) in VCAP_SERVICES, VCAP_SERVICES_FILE_PATH
    /// or SERVICE_BINDING_ROOT; without NAME, the only Postern binding. The key stays in
    /// memory. Listens on the binding's `local_port` unless --listen says otherwise.
    #[arg(
        long,
        num_args = 0..=1,
        default_missing_value = "",
        value_name = "NAME",
        conflicts_with_all = ["service_key", "relay", "ca", "cert", "key"]
    )]
    pub binding: Option<String>,
    /// Take the service, relays, certificate and key from a service key: the output of `cf
    /// service-key SERVICE KEY` in FILE, or on stdin with `-`. The key stays in memory.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["relay", "ca", "cert", "key"]
    )]
    pub service_key: Option<PathBuf>,
    /// The relay, e.g. quic://relay.example.com:7443 or wss://relay.example.com. Give one
    /// quic:// and one wss:// url to race them (see --transport).
    #[arg(
        long,
        env = "POSTERN_RELAY",
        value_delimiter = ',',
        required_unless_present_any = ["binding", "service_key"]
    )]
    pub relay: Vec<String>,
    /// auto (race QUIC and WebSocket, prefer QUIC), quic or websocket.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto, env = "POSTERN_TRANSPORT")]
    pub transport: TransportArg,
    /// HTTP CONNECT proxy for WebSocket (`http://[user:pass@]host:port`; "none" to ignore
    /// HTTPS_PROXY). Default: HTTPS_PROXY / NO_PROXY from the environment.
    #[arg(long)]
    pub proxy: Option<String>,
    /// Extra CA bundle for the outer TLS of wss:// (a TLS-inspecting proxy, a private router CA).
    #[arg(long)]
    pub ws_ca: Option<PathBuf>,
    /// The name on the relay's certificate (default: the binding's, else the relay URL's host).
    #[arg(long, env = "POSTERN_SERVER_NAME")]
    pub server_name: Option<String>,
    /// The CA certificate.
    #[arg(long, env = "POSTERN_CA", required_unless_present_any = ["binding", "service_key"])]
    pub ca: Option<PathBuf>,
    /// Your client certificate.
    #[arg(long, env = "POSTERN_CERT", required_unless_present_any = ["binding", "service_key"])]
    pub cert: Option<PathBuf>,
    /// Your client key.
    #[arg(long, env = "POSTERN_KEY", required_unless_present_any = ["binding", "service_key"])]
    pub key: Option<PathBuf>,
    /// Local address to listen on (default: the binding's `local_port` on 127.0.0.1, else
    /// 127.0.0.1:10000; an ephemeral port with --exec).
    #[arg(long, env = "POSTERN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// What the service speaks: refusals become MySQL errors for mysql.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Mysql)]
    pub protocol: ProtocolArg,
    /// Run this client against the local port and exit with its status, e.g.
    /// `--exec mariadb -u app` or `--exec mysqldump -u app mydb`. Must come last. Without it,
    /// on a terminal, `connect` asks which client to start (MySQL services).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "PROGRAM [ARGS]")]
    pub exec: Vec<String>,
}

/// Transports on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// Race QUIC and WebSocket; prefer QUIC.
    Auto,
    /// QUIC only.
    Quic,
    /// WebSocket only.
    Websocket,
}

/// Protocols `connect` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// MySQL or MariaDB.
    Mysql,
    /// Any TCP protocol.
    Tcp,
}
