//! The `tcp` check: the node accepts a connection (closed at once).

use super::Probe;

/// Connects to `addr`; the caller bounds the time.
pub(super) async fn probe(addr: &str) -> Probe {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_) => Probe::up("connected", None),
        Err(e) => Probe::failed(super::first_line(&e.to_string())),
    }
}
