use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use postern_agent::cli::{Cli, Command, ConnectArgs, ProtocolArg, TransportArg};
use postern_agent::config::{RelayTarget, TransportChoice, WebsocketSettings};
use postern_agent::connect::{Connect, Options};
use postern_agent::dial::Dialer;
use postern_agent::{Agent, Config};
use postern_common::config::EXIT_CONFIG;
use postern_common::tls::Material;
use postern_common::transport::addr::{RelayUrl, Scheme};
use tokio_util::sync::CancellationToken;

/// Where `connect` listens by default (the port `cf tunnel` users know).
const DEFAULT_LISTEN: &str = "127.0.0.1:10000";

fn main() -> ExitCode {
    let cli = Cli::parse();
    postern_common::telemetry::init(cli.log_json);
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok (agent {}, {} service(s), relays: {})",
                    config.display(),
                    c.name,
                    c.services.len(),
                    c.relays
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            runtime(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(signals(shutdown.clone()));
                let agent = Agent::new(config);
                tokio::spawn(systemd(agent.status()));
                agent.run(shutdown).await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                ExitCode::SUCCESS
            })
        }
        Command::Connect(args) => runtime(connect(*args)),
    }
}

fn runtime(f: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(args: ConnectArgs) -> ExitCode {
    let mut relay = RelayTarget {
        quic: None,
        websocket: None,
    };
    for text in &args.relay {
        match text.parse::<RelayUrl>() {
            Ok(u) if u.scheme == Scheme::Quic && relay.quic.is_none() => relay.quic = Some(u),
            Ok(u) if u.scheme != Scheme::Quic && relay.websocket.is_none() => {
                relay.websocket = Some(u)
            }
            Ok(u) => {
                eprintln!("error: --relay {u}: give at most one quic:// and one ws(s):// url");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                eprintln!("error: --relay: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let tls = match Material::load(&args.ca, &args.cert, &args.key) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let websocket = WebsocketSettings {
        proxy: args.proxy.clone(),
        ca: args.ws_ca.clone(),
        ..WebsocketSettings::default()
    };
    let transport = match args.transport {
        TransportArg::Auto => TransportChoice::Auto,
        TransportArg::Quic => TransportChoice::Quic,
        TransportArg::Websocket => TransportChoice::Websocket,
    };
    let dialer = match Dialer::new(tls, args.server_name.clone(), transport, websocket) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listen: SocketAddr = args.listen.unwrap_or_else(|| {
        if args.exec.is_empty() {
            DEFAULT_LISTEN
        } else {
            "127.0.0.1:0"
        }
        .parse()
        .expect("literal address")
    });
    let opts = Options {
        dialer,
        relay,
        service: args.service.clone(),
        listen,
        mysql: args.protocol == ProtocolArg::Mysql,
    };
    let connect = match Connect::bind(opts).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let local = connect.local_addr();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(connect.run(shutdown.clone()));

    if args.exec.is_empty() {
        eprintln!("Service {:?} is available at {local}", args.service);
        eprintln!("  host: {}  port: {}", local.ip(), local.port());
        if args.protocol == ProtocolArg::Mysql {
            eprintln!(
                "  connect with: mariadb --host={} --port={} --user=USER -p",
                local.ip(),
                local.port()
            );
        }
        eprintln!("Press Ctrl-C to close the tunnel.");
        signals(shutdown.clone()).await;
        let _ = serving.await;
        return ExitCode::SUCCESS;
    }

    let status = run_client(&args.exec, local).await;
    shutdown.cancel();
    let _ = serving.await;
    status
}

/// Runs `exec` (a MySQL client or any program) against the local port.
async fn run_client(exec: &[String], local: SocketAddr) -> ExitCode {
    let (program, rest) = exec
        .split_first()
        .expect("clap requires at least one value");
    let base = std::path::Path::new(program)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(program);
    let mut cmd = tokio::process::Command::new(program);
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
    let mut rest = rest;
    if MYSQL_CLIENTS.contains(&base) {
        // Option-file options must come first on a MySQL client's command line.
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
            ExitCode::from(128u8.saturating_add(status.signal().unwrap_or(0) as u8))
        }
    }
}

/// Tells systemd (when run with `Type=notify`) that the agent runs, keeps the watchdog fed and
/// publishes its status line (`systemctl status` shows it). Ready means "configured and trying":
/// an agent whose relay is unreachable must keep trying, not be restarted by a start timeout.
/// A no-op outside systemd.
async fn systemd(mut status: tokio::sync::watch::Receiver<postern_agent::Status>) {
    use sd_notify::NotifyState;
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
    loop {
        let line = match &*status.borrow_and_update() {
            postern_agent::Status::Connected {
                relay_instance,
                transport,
                ..
            } => {
                format!("connected to relay {relay_instance} over {transport}")
            }
            postern_agent::Status::Disconnected(why) => format!("disconnected: {why}"),
        };
        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Returns on SIGTERM or SIGINT, cancelling `token`.
async fn signals(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            _ = token.cancelled() => {},
        }
    }
    token.cancel();
}
