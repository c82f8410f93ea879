//! The `postern-relay` command line.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Postern relay: exposes services behind agents to clients with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "postern-relay", version, about)]
pub struct Cli {
    /// Log as JSON lines (for platforms that collect stdout).
    #[arg(long, global = true, env = "POSTERN_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    ///
    /// Listens for agents, `connect` clients and MySQL clients until stopped. Signals: SIGTERM
    /// or SIGINT drains (agents are told, open connections get up to 8 s), SIGHUP reloads the
    /// config file and its certificates (services, listeners, agents and access rules added or
    /// removed; removed services end their connections, connections of unchanged services go
    /// on; a config with errors, or a listener that cannot bind, is refused and logged, the
    /// running one stays). Under systemd (Type=notify) it reports READY=1 once listening, a
    /// STATUS= line, and watchdog pings.
    Run {
        /// The relay config file (ignored when POSTERN_RELAY_CONFIG_YAML holds the whole text).
        #[arg(
            short,
            long,
            env = "POSTERN_RELAY_CONFIG",
            default_value = "relay.yaml"
        )]
        config: PathBuf,
    },
    /// Validate a config file without starting; exits 64 listing every error.
    CheckConfig {
        /// The relay config file (ignored when POSTERN_RELAY_CONFIG_YAML holds the whole text).
        #[arg(
            short,
            long,
            env = "POSTERN_RELAY_CONFIG",
            default_value = "relay.yaml"
        )]
        config: PathBuf,
    },
    /// Make a CA and issue certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

/// `certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA (ca.pem and ca-key.pem).
    Init {
        /// Where the files go.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = postern_common::pki::CA_DAYS)]
        days: u32,
        /// The CA's name (its common name). Default: "Postern CA" and 8 random hex digits, so
        /// that no two CAs share a name.
        #[arg(long)]
        name: Option<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA (or by an intermediate CA, with --issuer).
    Issue {
        /// agent, client, server or intermediate.
        kind: KindArg,
        /// The identity name (agent, client), the intermediate's name, or a label for the files
        /// (server; default "relay").
        name: Option<String>,
        /// Where the CA is and the files go.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Sign with the intermediate CA NAME in --dir (intermediate-NAME.pem and its key)
        /// instead of the root: the certificate file then holds the chain, leaf first.
        #[arg(long, value_name = "NAME")]
        issuer: Option<String>,
        /// DNS names clients use to reach the server (server certificates).
        #[arg(long, num_args = 1..)]
        dns: Vec<String>,
        /// IP addresses clients use to reach the server (server certificates).
        #[arg(long, num_args = 1..)]
        ip: Vec<IpAddr>,
        /// Lifetime in days (default: 30 for clients, 365 for agents and servers, 1825 for
        /// intermediates; never beyond the signing CA's).
        #[arg(long)]
        days: Option<u32>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        ups: Box<UpsArgs>,
    },
    /// Revoke certificates: add them to the CA's revocation list (crl.pem).
    Revoke {
        /// The certificate files (PEM) to revoke.
        #[arg(required = true)]
        certs: Vec<PathBuf>,
        /// Where the CA and crl.pem are.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The certificates were signed by intermediate CA NAME (intermediate-NAME.pem in
        /// --dir): its own list, kept in crl.pem beside the root's, revokes them.
        #[arg(long, value_name = "NAME")]
        issuer: Option<String>,
    },
}

/// Certificate kinds on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// An agent (identity postern://agent/NAME).
    Agent,
    /// A client (identity postern://client/NAME).
    Client,
    /// A TLS server (DNS and IP names).
    Server,
    /// An intermediate CA signed by the root, for a signing key that must be online (the
    /// service broker's) while the root key stays offline.
    Intermediate,
}

/// `certs issue client NAME --cf-ups SERVICE`: the credentials of a Cloud Foundry
/// user-provided service, printed as JSON on stdout.
#[derive(Debug, Clone, clap::Args)]
pub struct UpsArgs {
    /// Print the JSON for `cf create-user-provided-service INSTANCE -t mysql -p JSON` that
    /// reaches Postern service SERVICE with this client certificate (client certificates only).
    #[arg(long, value_name = "SERVICE")]
    pub cf_ups: Option<String>,
    /// The name of the service instance in the hint printed on stderr (default: SERVICE).
    #[arg(long, value_name = "NAME", requires = "cf_ups")]
    pub cf_instance: Option<String>,
    /// Where apps connect: the relay's MySQL listener as apps reach it (e.g. its internal
    /// route). Not with --local-port.
    #[arg(long, requires = "cf_ups", conflicts_with = "local_port")]
    pub host: Option<String>,
    /// The port of --host.
    #[arg(long, default_value_t = 3306, requires = "cf_ups")]
    pub port: u16,
    /// Sidecar mode: apps connect to 127.0.0.1:PORT, where `postern-agent connect --binding`
    /// listens and carries connections to the relay.
    #[arg(long, value_name = "PORT", requires = "cf_ups")]
    pub local_port: Option<u16>,
    /// The database name.
    #[arg(long, default_value = "", requires = "cf_ups")]
    pub database: String,
    /// The MySQL user.
    #[arg(long, requires = "cf_ups")]
    pub username: Option<String>,
    /// Read the MySQL password from this environment variable (never from the command line).
    #[arg(
        long,
        value_name = "VAR",
        requires = "cf_ups",
        conflicts_with = "password_file"
    )]
    pub password_env: Option<String>,
    /// Read the MySQL password from this file (one trailing newline is dropped).
    #[arg(long, value_name = "FILE", requires = "cf_ups")]
    pub password_file: Option<PathBuf>,
    /// A relay URL for the sidecar (`quic://HOST:PORT`, `wss://HOST` with an optional port); repeat for several.
    #[arg(long = "relay", value_name = "URL", requires = "cf_ups", value_parser = relay_url)]
    pub relays: Vec<String>,
    /// The name on the relay's certificate, when it is not the relay URL's host.
    #[arg(long, requires = "cf_ups")]
    pub server_name: Option<String>,
    /// Leave `jdbcUrl` out (file-based bindings refuse key names with capitals).
    #[arg(long, requires = "cf_ups")]
    pub no_jdbc_url: bool,
}

fn relay_url(s: &str) -> Result<String, String> {
    s.parse::<postern_common::transport::addr::RelayUrl>()
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}
