//! Which backend a new stream goes to, and the one place the agent connects to backends.
//!
//! Every stream the relay opens asks [`Backends::connect`] for a connection to its service's
//! backend. Today a service has one backend address. Failover puts several nodes and a health
//! checker behind this same call: it will pick the active node, count connections per node, and
//! cancel the [`Backend::severed`] token of a node that turns bad so that every forward to it
//! ends, without anything outside this module changing.

use std::collections::BTreeMap;
use std::time::Duration;

use postern_common::net;
use postern_common::protocol::{Code, Refusal};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The backends of every service this agent offers.
#[derive(Debug)]
pub struct Backends {
    services: BTreeMap<String, Backend>,
}

/// One backend a stream may be connected to.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The service it serves.
    pub service: String,
    /// Where it listens (`host:port`).
    pub addr: String,
    /// Deadline for connecting to it.
    pub connect_timeout: Duration,
    /// Cancelled when connections to this backend must end (the node was taken out of
    /// service). A forward ends its connection when this fires.
    pub severed: CancellationToken,
}

impl Backends {
    /// The backends of `config`'s services.
    pub fn new(config: &Config) -> Self {
        let services = config
            .services
            .values()
            .map(|s| {
                (
                    s.name.clone(),
                    Backend {
                        service: s.name.clone(),
                        addr: s.backend.clone(),
                        connect_timeout: s.connect_timeout,
                        severed: CancellationToken::new(),
                    },
                )
            })
            .collect();
        Self { services }
    }

    /// The backend a new stream of `service` goes to.
    pub fn pick(&self, service: &str) -> Result<Backend, Refusal> {
        self.services.get(service).cloned().ok_or_else(|| {
            Refusal::new(
                Code::UnknownService,
                format!("this agent does not offer service {service:?}"),
            )
        })
    }

    /// Connects a new stream of `service` to its backend. The refusal says which backend failed
    /// and why, in words the client is shown.
    pub async fn connect(&self, service: &str) -> Result<(Backend, TcpStream), Refusal> {
        let backend = self.pick(service)?;
        match net::connect(&backend.addr, backend.connect_timeout).await {
            Ok(tcp) => Ok((backend, tcp)),
            Err(e) => Err(Refusal::new(
                Code::BackendUnavailable,
                format!(
                    "service {service:?} is unavailable: cannot connect to backend {}: {e}",
                    backend.addr
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(addr: &str) -> Backends {
        let backend = Backend {
            service: "orders".into(),
            addr: addr.into(),
            connect_timeout: Duration::from_secs(2),
            severed: CancellationToken::new(),
        };
        Backends {
            services: [("orders".to_owned(), backend)].into(),
        }
    }

    #[tokio::test]
    async fn a_listening_backend_is_connected_and_a_dead_one_is_refused_with_its_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (backend, _tcp) = backends(&addr).connect("orders").await.unwrap();
        assert_eq!(backend.addr, addr);
        drop(listener);
        let r = backends(&addr).connect("orders").await.unwrap_err();
        assert_eq!(r.code, Code::BackendUnavailable);
        assert!(
            r.message
                .contains(&format!("cannot connect to backend {addr}")),
            "{r}"
        );
        let r = backends(&addr).connect("billing").await.unwrap_err();
        assert_eq!(r.code, Code::UnknownService);
    }
}
