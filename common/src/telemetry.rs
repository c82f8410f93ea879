//! Logging setup for the binaries: `RUST_LOG` filters, text for terminals, JSON lines for
//! platforms that collect stdout (Cloud Foundry's Loggregator).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `json` selects JSON lines.
pub fn init(json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
