//! A UDP path the test opens and closes: a firewall that drops UDP, in front of a relay's QUIC
//! port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UdpSocket;

/// A UDP port that forwards to `to` (and the answers back) while `open` is set, and drops every
/// datagram both ways while it is not. Returns its address; it runs until the runtime ends.
pub async fn gate(to: SocketAddr, open: Arc<AtomicBool>) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind udp"));
    let addr = front.local_addr().expect("udp addr");
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            if !open.load(Ordering::Relaxed) {
                continue;
            }
            let back = match backs.get(&from) {
                Some(b) => b.clone(),
                None => {
                    let b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind udp"));
                    b.connect(to).await.expect("connect udp");
                    let (b2, front2, open2) = (b.clone(), front.clone(), open.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = b2.recv(&mut buf).await {
                            if open2.load(Ordering::Relaxed) {
                                let _ = front2.send_to(&buf[..n], from).await;
                            }
                        }
                    });
                    backs.insert(from, b.clone());
                    b
                }
            };
            let _ = back.send(&buf[..n]).await;
        }
    });
    addr
}
