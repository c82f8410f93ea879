use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use postern_agent::cli::{Cli, Command, ConnectArgs, ProtocolArg, TransportArg};
use postern_agent::config::{ProxySetting, RelayTarget, TransportChoice, WebsocketSettings};
use postern_agent::connect::{Connect, Options};
use postern_agent::dial::Dialer;
use postern_agent::{Agent, Config, bound, chooser, exec, notify};
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
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
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
                // Installed now, not in the task: a SIGHUP from here on reloads (its default would end
                // the process).
                if let Some(hangups) = shutdown::hangups() {
                    tokio::spawn(reload_on_hangup(agent.reloader(), path, hangups));
                }
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
        Command::Connect(args) => connect_runtime(connect(*args)),
        Command::Diagnose(args) => runtime(postern_agent::diagnose::main(args)),
    }
}

/// SIGHUP (`systemctl reload`): reads the config file again and hands it to the agent. A config
/// with errors is refused, each error logged with its file, line and key; the running one
/// stays.
async fn reload_on_hangup(
    reloader: postern_agent::Reloader,
    path: std::path::PathBuf,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&file)).await;
        let config = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                for line in e.to_string().lines().filter(|l| !l.trim().is_empty()) {
                    tracing::error!(config = %path.display(), "{line}");
                }
                tracing::error!(config = %path.display(), "reload refused: the configuration has errors; the running one stays");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed: the running configuration stays");
                continue;
            }
        };
        // The outcome is logged by the agent.
        let _ = reloader.reload(config).await;
    }
}

fn runtime(f: impl Future<Output = ExitCode>) -> ExitCode {
    block_on(tokio::runtime::Runtime::new(), f)
}

fn block_on(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    f: impl Future<Output = ExitCode>,
) -> ExitCode {
    match runtime {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `connect`'s runtime: one thread, unless `TOKIO_WORKER_THREADS` asks for more. It forwards a
/// few local connections; one thread spares it the multi-thread scheduler's work-stealing and
/// cross-thread wake-ups, about 8 % of its instructions per query (bench/RESULTS.md).
fn connect_runtime(f: impl Future<Output = ExitCode>) -> ExitCode {
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok());
    if threads.is_some_and(|n| n > 1) {
        return runtime(f);
    }
    block_on(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        f,
    )
}

/// Where `connect` goes and with which certificate: from the flags, a binding or a service key.
struct Target {
    /// The service.
    service: String,
    /// Relay URLs (at most one quic:// and one ws(s)://).
    relays: Vec<String>,
    /// The name on the relay's certificate.
    server_name: Option<String>,
    /// The certificate, key and CA.
    tls: Material,
    /// Where a binding says to listen.
    local_port: Option<u16>,
    /// The MySQL login and database a binding carries.
    login: Option<exec::Login>,
    database: String,
}

/// The target of the flags (`SERVICE --relay --ca --cert --key`), `--binding` or
/// `--service-key`; an error message otherwise.
fn target(args: &ConnectArgs) -> Result<Target, String> {
    let bound = match (&args.binding, &args.service_key) {
        (Some(name), _) => Some(bound::from_env(name, &ProcessEnv)),
        (None, Some(file)) => Some(bound::from_service_key_file(file)),
        (None, None) => None,
    };
    if let Some(bound) = bound {
        let bound = bound.map_err(|e| e.to_string())?;
        let tls = bound.material().map_err(|e| e.to_string())?;
        let view = bound.view;
        return Ok(Target {
            service: view.service,
            relays: view.relays,
            server_name: args.server_name.clone().or(view.server_name),
            tls,
            local_port: view.local_port,
            login: Some(exec::Login {
                user: view.username,
                password: view.password,
                database: view.database.clone(),
            }),
            database: view.database,
        });
    }
    // clap requires these without --binding and --service-key.
    let (Some(service), Some(ca), Some(cert), Some(key)) =
        (&args.service, &args.ca, &args.cert, &args.key)
    else {
        return Err("give SERVICE --relay --ca --cert --key, --binding or --service-key".into());
    };
    let tls = Material::load(ca, cert, key).map_err(|e| e.to_string())?;
    Ok(Target {
        service: service.clone(),
        relays: args.relay.clone(),
        server_name: args.server_name.clone(),
        tls,
        local_port: None,
        login: None,
        database: String::new(),
    })
}

/// At most one quic:// and one ws(s):// url.
fn relay_target(urls: &[String]) -> Result<RelayTarget, String> {
    let mut relay = RelayTarget {
        quic: None,
        websocket: None,
    };
    for text in urls {
        match text.parse::<RelayUrl>() {
            Ok(u) if u.scheme == Scheme::Quic && relay.quic.is_none() => relay.quic = Some(u),
            Ok(u) if u.scheme != Scheme::Quic && relay.websocket.is_none() => {
                relay.websocket = Some(u)
            }
            Ok(u) => {
                return Err(format!(
                    "relay {u}: give at most one quic:// and one ws(s):// url"
                ));
            }
            Err(e) => return Err(format!("relay {text}: {e}")),
        }
    }
    if relay.quic.is_none() && relay.websocket.is_none() {
        return Err("no relay url".into());
    }
    Ok(relay)
}

/// The `connect` options for `target` with the transport flags of `args`.
async fn options(args: &ConnectArgs, target: Target) -> Result<(Options, Target), String> {
    let relay = relay_target(&target.relays)?;
    let proxy = match &args.proxy {
        None => ProxySetting::from_env(&ProcessEnv),
        Some(p) => ProxySetting::parse("--proxy", p).map_err(|e| e.to_string())?,
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
    let dialer = Dialer::load(
        target.tls.clone(),
        target.server_name.clone(),
        transport,
        websocket,
    )
    .await
    .map_err(|e| e.to_string())?;
    // --listen, else the binding's local port, else the default (ephemeral for --exec).
    let listen: SocketAddr = args.listen.unwrap_or_else(|| match target.local_port {
        Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        None if args.exec.is_empty() => DEFAULT_LISTEN.parse().expect("literal address"),
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    });
    let opts = Options {
        dialer,
        relay,
        service: target.service.clone(),
        listen,
        mysql: args.protocol == ProtocolArg::Mysql,
    };
    Ok((opts, target))
}

async fn connect(args: ConnectArgs) -> ExitCode {
    let prepared = match target(&args) {
        Ok(t) => options(&args, t).await,
        Err(e) => Err(e),
    };
    let (opts, target) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
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
    let mysql = args.protocol == ProtocolArg::Mysql;

    let client = if !args.exec.is_empty() {
        args.exec
            .split_first()
            .map(|(program, rest)| (program.clone(), rest.to_vec(), None))
    } else if mysql && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        announce(&target, local, mysql);
        match choose(&target.database).await {
            Ok(c) => c,
            Err(code) => {
                shutdown.cancel();
                let _ = serving.await;
                return code;
            }
        }
    } else {
        announce(&target, local, mysql);
        None
    };

    let Some((program, rest, stdout)) = client else {
        eprintln!("Press Ctrl-C to close the tunnel.");
        shutdown::on_signal(shutdown.clone()).await;
        let _ = serving.await;
        return ExitCode::SUCCESS;
    };
    // Ctrl-C is the client's to handle (mariadb cancels the query): the tunnel stays until the
    // client exits.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let status = exec::run_with(&program, &rest, local, target.login.as_ref(), stdout).await;
    shutdown.cancel();
    let _ = serving.await;
    status
}

/// A client to start: program, arguments, where its standard output goes.
type Client = (String, Vec<String>, Option<std::fs::File>);

/// Asks which client to start (see [`chooser`]); `Err` with the exit code when it cannot be.
async fn choose(database: &str) -> Result<Option<Client>, ExitCode> {
    let asked = tokio::task::spawn_blocking(|| {
        chooser::ask(&mut std::io::stdin().lock(), &mut std::io::stderr())
    })
    .await;
    let choice = match asked {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            eprintln!("error: cannot ask which client to start: {e}");
            return Err(ExitCode::FAILURE);
        }
        Err(e) => {
            eprintln!("error: cannot ask which client to start: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    let Some((program, args)) = chooser::command(&choice, database) else {
        return Ok(None);
    };
    let stdout = match &choice {
        chooser::Choice::Mysqldump(path) => match std::fs::File::create(path) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("error: cannot write {}: {e}", path.display());
                return Err(ExitCode::FAILURE);
            }
        },
        _ => None,
    };
    Ok(Some((program.to_owned(), args, stdout)))
}

/// Prints where the service is and how to reach it (the password only on a terminal: a
/// sidecar's output goes to the platform's logs).
fn announce(target: &Target, local: SocketAddr, mysql: bool) {
    eprintln!("Service {:?} is available at {local}", target.service);
    eprintln!("  host: {}  port: {}", local.ip(), local.port());
    let login = target.login.as_ref();
    if let Some(l) = login {
        if !l.user.is_empty() {
            eprintln!("  user: {}", l.user);
        }
        if !l.password.is_empty() && std::io::stderr().is_terminal() {
            eprintln!("  password: {}", l.password);
        }
    }
    if !target.database.is_empty() {
        eprintln!("  database: {}", target.database);
    }
    if mysql {
        let user = login
            .map(|l| l.user.as_str())
            .filter(|u| !u.is_empty())
            .unwrap_or("USER");
        eprintln!(
            "  connect with: mariadb --host={} --port={} --user={user} -p{}",
            local.ip(),
            local.port(),
            if target.database.is_empty() {
                String::new()
            } else {
                format!(" {}", target.database)
            }
        );
    }
}
