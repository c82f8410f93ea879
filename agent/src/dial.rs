//! Reaching a relay: QUIC, WebSocket, or both raced.
//!
//! With `transport: auto` the QUIC attempt starts first and the WebSocket attempt
//! [`RACE_DELAY`] later, unless QUIC has already failed; the first session up wins, and when both
//! complete close together QUIC is preferred. So when UDP is blocked, service starts at most
//! [`RACE_DELAY`] after what WebSocket alone would take.

use std::sync::Arc;
use std::time::Duration;

use postern_common::tls::Material;
use postern_common::transport::addr::RelayUrl;
use postern_common::transport::proxy::ProxyError;
use postern_common::transport::{Liveness, Session, TransportError, TransportKind, quic, ws};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::{Instrument, debug, info, info_span};

use crate::config::{RelayTarget, TransportChoice, WebsocketSettings};

/// Head start of QUIC over WebSocket in a race.
pub const RACE_DELAY: Duration = Duration::from_millis(250);
/// Bound on one QUIC connection attempt (a blocked UDP path never answers).
pub const QUIC_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a relay could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The relay's host name did not resolve.
    #[error("resolve {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// The relay's host name resolved to nothing.
    #[error("{0} resolved to no address")]
    NoAddress(String),
    /// A QUIC endpoint could not be made.
    #[error(transparent)]
    Endpoint(#[from] quic::EndpointError),
    /// The transport failed (TLS refused, connection refused, upgrade refused, ...).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Nothing came back over UDP in time (a blocked UDP path never answers).
    #[error("{url}: no answer over udp within {timeout:?}")]
    QuicTimeout {
        /// The relay.
        url: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Both transports of a race failed.
    #[error("quic: {quic}; websocket: {websocket}")]
    Both {
        /// Why QUIC failed.
        quic: Box<DialError>,
        /// Why the WebSocket failed.
        websocket: Box<DialError>,
    },
    /// The relay has no URL for the transport the config chose.
    #[error("relay {0} has no url for the chosen transport")]
    NoUrl(String),
    /// The forward proxy setting cannot be used for this relay.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// `websocket.ca` could not be read.
    #[error("websocket.ca {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Everything needed to reach relays.
#[derive(Debug, Clone)]
pub struct Dialer {
    material: Material,
    server_name: Option<String>,
    transport: TransportChoice,
    websocket: Arc<WebsocketSettings>,
    /// CAs for the outer TLS of `wss://`: the system's, the configured bundle, and ours.
    outer_roots: Arc<RootCertStore>,
    /// How sessions notice a dead relay; `None`: the agent's defaults for each transport
    /// ([`Liveness::AGENT`] on QUIC, `websocket.ping_interval` on WebSocket).
    liveness: Option<Liveness>,
}

impl Dialer {
    /// Prepares to dial, reading the system's CA certificates and `websocket.ca` (files: this
    /// runs on a blocking thread). Fails if the WebSocket CA bundle cannot be read.
    pub async fn load(
        material: Material,
        server_name: Option<String>,
        transport: TransportChoice,
        websocket: WebsocketSettings,
    ) -> Result<Self, DialError> {
        tokio::task::spawn_blocking(move || Self::new(material, server_name, transport, websocket))
            .await
            .unwrap_or_else(|e| {
                Err(DialError::Ca {
                    path: String::new(),
                    reason: format!("loading certificates failed: {e}"),
                })
            })
    }

    /// [`load`](Self::load) on the calling thread (it reads files: not from async code).
    pub fn new(
        material: Material,
        server_name: Option<String>,
        transport: TransportChoice,
        websocket: WebsocketSettings,
    ) -> Result<Self, DialError> {
        let mut roots = (*material.roots).clone();
        if transport != TransportChoice::Quic {
            // Routers on public platforms present certificates from public CAs.
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            debug!(added, "system CA certificates loaded for the outer tls");
        }
        if let Some(path) = &websocket.ca {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| DialError::Ca {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(DialError::Ca {
                    path: path.display().to_string(),
                    reason: "no certificate in file".into(),
                });
            }
            roots.add_parsable_certificates(certs);
        }
        Ok(Self {
            material,
            server_name,
            transport,
            websocket: Arc::new(websocket),
            outer_roots: Arc::new(roots),
            liveness: None,
        })
    }

    /// Sessions dialled from now on notice a dead relay as `liveness` says, on both transports
    /// (`connect` uses [`Liveness::CONNECT`]: it has no heartbeat of its own).
    pub fn with_liveness(mut self, liveness: Liveness) -> Self {
        self.liveness = Some(liveness);
        self
    }

    /// Reaches `target` with the configured transport choice.
    pub async fn dial(&self, target: &RelayTarget) -> Result<Session, DialError> {
        self.dial_with(target, &[]).await
    }

    /// Like [`dial`](Self::dial), with extra HTTP headers on the WebSocket upgrade.
    pub async fn dial_with(
        &self,
        target: &RelayTarget,
        headers: &[(String, String)],
    ) -> Result<Session, DialError> {
        let quic = target
            .quic
            .as_ref()
            .filter(|_| self.transport != TransportChoice::Websocket);
        let ws = target
            .websocket
            .as_ref()
            .filter(|_| self.transport != TransportChoice::Quic);
        match (quic, ws) {
            (Some(q), None) => self.quic(q).await,
            (None, Some(w)) => self.websocket(w, headers).await,
            (Some(q), Some(w)) => self.race(q, w, headers).await,
            (None, None) => Err(DialError::NoUrl(target.to_string())),
        }
    }

    /// Starts QUIC, then WebSocket after [`RACE_DELAY`] (or at once if QUIC fails first); the
    /// first session up wins, QUIC preferred on a tie.
    async fn race(
        &self,
        q: &RelayUrl,
        w: &RelayUrl,
        headers: &[(String, String)],
    ) -> Result<Session, DialError> {
        let both = |qe, we| DialError::Both {
            quic: Box::new(qe),
            websocket: Box::new(we),
        };
        let quic = self.quic(q);
        tokio::pin!(quic);
        let mut quic_error = None;
        // QUIC's head start.
        tokio::select! {
            biased;
            r = &mut quic => match r {
                Ok(s) => return Ok(chosen(s, "quic answered first")),
                Err(e) => quic_error = Some(e),
            },
            _ = tokio::time::sleep(RACE_DELAY) => {}
        }
        let ws = self.websocket(w, headers);
        tokio::pin!(ws);
        if let Some(qe) = quic_error {
            return match ws.await {
                Ok(s) => Ok(chosen(s, &format!("quic failed: {qe}"))),
                Err(we) => Err(both(qe, we)),
            };
        }
        tokio::select! {
            biased;
            r = &mut quic => match r {
                Ok(s) => Ok(chosen(s, "quic answered first")),
                Err(qe) => match ws.await {
                    Ok(s) => Ok(chosen(s, &format!("quic failed: {qe}"))),
                    Err(we) => Err(both(qe, we)),
                },
            },
            r = &mut ws => match r {
                Ok(s) => Ok(chosen(s, "websocket answered first (udp slow or blocked)")),
                Err(we) => match quic.await {
                    Ok(s) => Ok(chosen(s, "quic answered first")),
                    Err(qe) => Err(both(qe, we)),
                },
            },
        }
    }

    /// One QUIC attempt, bounded by [`QUIC_TIMEOUT`].
    pub async fn quic(&self, url: &RelayUrl) -> Result<Session, DialError> {
        let attempt = async {
            let addrs = url.resolve().await.map_err(|source| DialError::Resolve {
                host: url.host.clone(),
                source,
            })?;
            let mut last = DialError::NoAddress(url.host.clone());
            let name = self.server_name.clone().unwrap_or_else(|| url.host.clone());
            for addr in addrs {
                let liveness = self.liveness.unwrap_or(Liveness::AGENT);
                let endpoint = quic::client(addr, &self.material, liveness)?;
                match endpoint
                    .connect(addr, &name)
                    .instrument(info_span!("dial", %addr))
                    .await
                {
                    Ok(s) => return Ok(s),
                    Err(e) => {
                        debug!(%addr, error = %e, "quic dial failed");
                        last = e.into();
                    }
                }
            }
            Err(last)
        };
        tokio::time::timeout(QUIC_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(DialError::QuicTimeout {
                    url: url.to_string(),
                    timeout: QUIC_TIMEOUT,
                })
            })
    }

    /// One WebSocket attempt (through a forward proxy when configured or set in the environment).
    pub async fn websocket(
        &self,
        url: &RelayUrl,
        headers: &[(String, String)],
    ) -> Result<Session, DialError> {
        let opts = self.ws_options(url, headers)?;
        Ok(ws::connect(&opts, &self.material).await?)
    }

    /// One WebSocket attempt pinned to instance `index` of the Cloud Foundry app `app_guid`
    /// (`X-Cf-App-Instance`). [`Pinned::Gone`] when the router says that instance does not exist.
    pub async fn websocket_pinned(
        &self,
        url: &RelayUrl,
        app_guid: &str,
        index: u32,
    ) -> Result<Session, Pinned> {
        let header = [(
            "X-Cf-App-Instance".to_owned(),
            format!("{app_guid}:{index}"),
        )];
        let opts = self.ws_options(url, &header).map_err(Pinned::Failed)?;
        match ws::connect(&opts, &self.material).await {
            Ok(s) => Ok(s),
            Err(TransportError::Rejected { status: 400, .. }) => Err(Pinned::Gone),
            Err(e) => Err(Pinned::Failed(e.into())),
        }
    }

    pub(crate) fn ws_options(
        &self,
        url: &RelayUrl,
        headers: &[(String, String)],
    ) -> Result<ws::ConnectOptions, DialError> {
        let name = self.server_name.clone().unwrap_or_else(|| url.host.clone());
        let mut opts = ws::ConnectOptions::new(url.clone(), name);
        opts.sni = self.websocket.sni.clone();
        opts.host_header = self.websocket.host.clone();
        opts.headers = headers.to_vec();
        opts.outer_roots = Some(self.outer_roots.clone());
        if let Some(i) = self.websocket.ping_interval {
            opts.liveness = Liveness::pings(i);
        }
        if let Some(l) = self.liveness {
            opts.liveness = l;
        }
        opts.proxy = self.websocket.proxy.for_url(url)?;
        if let Some(p) = &opts.proxy {
            debug!(proxy = %p, "dialling through a forward proxy");
        }
        Ok(opts)
    }

    /// Whether `target` should be reached as every instance of a Cloud Foundry app.
    pub fn pins_instances(&self, target: &RelayTarget) -> bool {
        self.websocket.cloud_foundry
            && target.websocket.is_some()
            && self.transport != TransportChoice::Quic
    }
}

/// The outcome of a failed pinned dial.
#[derive(Debug)]
pub enum Pinned {
    /// The router has no such instance (HTTP 400): the app has fewer instances.
    Gone,
    /// Any other failure.
    Failed(DialError),
}

fn chosen(session: Session, why: &str) -> Session {
    let kind = session.kind();
    if kind == TransportKind::Quic {
        debug!(transport = %kind, why, "transport chosen");
    } else {
        info!(transport = %kind, why, "transport chosen");
    }
    session
}
