use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use postern_agent::cli::{Cli, Command, ConnectArgs, ProtocolArg, TransportArg};
use postern_agent::config::{ProxySetting, RelayTarget, TransportChoice, WebsocketSettings};
use postern_agent::connect::{Connect, Options};
use postern_agent::dial::Dialer;
use postern_agent::{Agent, Config, exec, notify};
use postern_common::config::{EXIT_CONFIG, ProcessEnv};
use postern_common::shutdown;
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
                tokio::spawn(shutdown::on_signal(shutdown.clone()));
                let agent = Agent::new(config);
                tokio::spawn(notify::run(agent.status()));
                let stopping = shutdown.clone();
                tokio::spawn(async move {
                    stopping.cancelled().await;
                    notify::stopping();
                });
                agent.run(shutdown).await;
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
    let proxy = match &args.proxy {
        None => ProxySetting::from_env(&ProcessEnv),
        Some(p) => match ProxySetting::parse("--proxy", p) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let websocket = WebsocketSettings {
        proxy,
        ca: args.ws_ca.clone(),
        ..WebsocketSettings::default()
    };
    let transport = match args.transport {
        TransportArg::Auto => TransportChoice::Auto,
        TransportArg::Quic => TransportChoice::Quic,
        TransportArg::Websocket => TransportChoice::Websocket,
    };
    let dialer = match Dialer::load(tls, args.server_name.clone(), transport, websocket).await {
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
        shutdown::on_signal(shutdown.clone()).await;
        let _ = serving.await;
        return ExitCode::SUCCESS;
    }

    let Some((program, rest)) = args.exec.split_first() else {
        // clap requires a program after --exec; nothing to run otherwise.
        return ExitCode::from(EXIT_CONFIG);
    };
    let status = exec::run(program, rest, local).await;
    shutdown.cancel();
    let _ = serving.await;
    status
}
