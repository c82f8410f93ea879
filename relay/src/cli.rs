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
    Run {
        /// The relay config file.
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
        /// The relay config file.
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
    /// Issue a certificate signed by the CA.
    Issue {
        /// agent, client or server.
        kind: KindArg,
        /// The identity name (agent, client) or a label for the files (server; default "relay").
        name: Option<String>,
        /// Where the CA is and the files go.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// DNS names clients use to reach the server (server certificates).
        #[arg(long, num_args = 1..)]
        dns: Vec<String>,
        /// IP addresses clients use to reach the server (server certificates).
        #[arg(long, num_args = 1..)]
        ip: Vec<IpAddr>,
        /// Lifetime in days (default: 30 for clients, 365 for agents and servers).
        #[arg(long)]
        days: Option<u32>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Revoke certificates: add them to the CA's revocation list (crl.pem).
    Revoke {
        /// The certificate files (PEM) to revoke.
        #[arg(required = true)]
        certs: Vec<PathBuf>,
        /// Where the CA and crl.pem are.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
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
}
