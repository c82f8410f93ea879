//! TCP socket settings used on every connection Postern makes or accepts.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Applies `TCP_NODELAY` (MySQL is request/response: Nagle would add latency to every query)
/// and TCP keep-alive (so a peer that vanished is noticed even on an idle connection).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = SockRef::from(stream);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// Makes the next close of `stream` a reset (RST) instead of an orderly FIN, so that the peer
/// sees a failure and does not mistake a broken tunnel for a complete response.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Connects to `addr` within `timeout`, tuned.
pub async fn connect(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {}ms", timeout.as_millis()),
            )
        })??;
    tune(&stream);
    Ok(stream)
}
