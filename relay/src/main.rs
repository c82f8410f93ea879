use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use postern_common::config::EXIT_CONFIG;
use postern_common::pki::{self, Kind};
use postern_relay::cli::{CertsCommand, Cli, Command, KindArg};
use postern_relay::{Config, Relay, certs};
use tokio_util::sync::CancellationToken;

mod notify;

/// The environment variable that holds the whole `relay.yaml` (a platform's config service, or
/// `cf set-env`), read instead of the file when it is set. Relative file names in it are
/// relative to the working directory.
const CONFIG_TEXT_ENV: &str = "POSTERN_RELAY_CONFIG_YAML";

/// The config: from [`CONFIG_TEXT_ENV`] when it is set, else from `path`.
fn load(path: &Path) -> Result<Config, postern_common::config::ConfigErrors> {
    match std::env::var(CONFIG_TEXT_ENV) {
        Ok(text) => Config::parse(&shown(path), &text, &postern_common::config::ProcessEnv),
        Err(_) => Config::load(path),
    }
}

/// The name errors give the config: the variable's when the text comes from it.
fn shown(path: &Path) -> PathBuf {
    if std::env::var_os(CONFIG_TEXT_ENV).is_some() {
        PathBuf::from(format!("${CONFIG_TEXT_ENV}"))
    } else {
        path.to_path_buf()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    postern_common::telemetry::init(cli.log_json);
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", shown(&config).display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            let config_path = config.clone();
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async {
                let relay = match Relay::bind(config).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = CancellationToken::new();
                tokio::spawn(postern_common::shutdown::on_signal(shutdown.clone()));
                // Installed now, not in the task: a SIGHUP from here on reloads (its default would end
                // the process).
                if let Some(hangups) = postern_common::shutdown::hangups() {
                    tokio::spawn(reload_on_hangup(relay.reloader(), config_path, hangups));
                }
                notify::started(&relay, shutdown.clone());
                relay.run(shutdown).await;
                ExitCode::SUCCESS
            })
        }
        Command::Certs { command } => match run_certs(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Reloads the configuration on each SIGHUP (`systemctl reload`): the file is read again
/// (on a blocking thread), and a file with errors is refused, each error logged with its line,
/// while the relay goes on with what it has.
async fn reload_on_hangup(
    reloader: postern_relay::Reloader,
    path: PathBuf,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        if std::env::var_os(CONFIG_TEXT_ENV).is_some() {
            tracing::warn!(
                "SIGHUP: the configuration comes from ${CONFIG_TEXT_ENV}, which a running process cannot read anew: restart the relay to change it"
            );
            continue;
        }
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        let file = path.clone();
        let config = match tokio::task::spawn_blocking(move || Config::load(&file)).await {
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
        // The outcome is logged by the relay.
        let _ = reloader.reload(config).await;
    }
}

fn run_certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            dir,
            days,
            name,
            force,
        } => certs::init(&dir, days, name.as_deref(), force).map(|_| ()),
        CertsCommand::Revoke {
            certs: files,
            dir,
            issuer,
        } => certs::revoke(&dir, &files, issuer.as_deref()).map(|_| ()),
        CertsCommand::Issue {
            kind,
            name,
            dir,
            issuer,
            dns,
            ip,
            days,
            force,
            ups,
        } => {
            let kind = match kind {
                KindArg::Agent => Kind::Agent,
                KindArg::Client => Kind::Client,
                KindArg::Server => Kind::Server,
                KindArg::Intermediate => {
                    let Some(name) = name else {
                        anyhow::bail!("issue intermediate needs a NAME");
                    };
                    if issuer.is_some() || ups.cf_ups.is_some() || !dns.is_empty() || !ip.is_empty()
                    {
                        anyhow::bail!(
                            "an intermediate CA is signed by the root: --issuer, --cf-ups, --dns and --ip do not apply"
                        );
                    }
                    let days = days.unwrap_or(pki::INTERMEDIATE_DAYS);
                    return certs::issue_intermediate(&dir, &name, days, force).map(|_| ());
                }
            };
            let name = match (kind, name) {
                (_, Some(n)) => n,
                (Kind::Server, None) => "relay".to_owned(),
                (_, None) => anyhow::bail!("issue {} needs a NAME", kind.as_str()),
            };
            let days = days.unwrap_or(match kind {
                Kind::Client => pki::CLIENT_DAYS,
                _ => pki::SERVER_DAYS,
            });
            // Checked before any file is written: a refused command writes nothing.
            let plan = match &ups.cf_ups {
                Some(_) if kind != Kind::Client => {
                    anyhow::bail!("--cf-ups is for client certificates")
                }
                Some(service) => Some(certs::UpsPlan::new(service, &ups)?),
                None => None,
            };
            let req = certs::IssueRequest {
                dir: &dir,
                kind,
                name: &name,
                dns: &dns,
                ips: &ip,
                days,
                force,
                issuer: issuer.as_deref(),
            };
            let Some(plan) = plan else {
                return certs::issue(&req, &mut std::io::stdout()).map(|_| ());
            };
            // stdout carries the JSON alone; what was made is said on stderr.
            let made = certs::issue(&req, &mut std::io::stderr())?;
            let credentials = plan.credentials(&dir, &name, &made.issued)?;
            let json = serde_json::to_string_pretty(&credentials.to_value())?;
            println!("{json}");
            eprintln!("{}", plan.hint());
            Ok(())
        }
    }
}
