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
use postern_common::transport::proxy::{self, Proxy};
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
    /// Prepares to dial. Fails if the WebSocket CA bundle cannot be read.
    pub fn new(
        material: Material,
        server_name: Option<String>,
        transport: TransportChoice,
        websocket: WebsocketSettings,
    ) -> Result<Self, String> {
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
                .map_err(|e| format!("websocket.ca {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "websocket.ca {}: no certificate in file",
                    path.display()
                ));
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
    pub async fn dial(&self, target: &RelayTarget) -> Result<Session, String> {
        self.dial_with(target, &[]).await
    }

    /// Like [`dial`](Self::dial), with extra HTTP headers on the WebSocket upgrade.
    pub async fn dial_with(
        &self,
        target: &RelayTarget,
        headers: &[(String, String)],
    ) -> Result<Session, String> {
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
            (None, None) => Err(format!(
                "relay {target} has no url for the chosen transport"
            )),
        }
    }

    /// Starts QUIC, then WebSocket after [`RACE_DELAY`] (or at once if QUIC fails first); the
    /// first session up wins, QUIC preferred on a tie.
    async fn race(
        &self,
        q: &RelayUrl,
        w: &RelayUrl,
        headers: &[(String, String)],
    ) -> Result<Session, String> {
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
                Err(we) => Err(format!("quic: {qe}; websocket: {we}")),
            };
        }
        tokio::select! {
            biased;
            r = &mut quic => match r {
                Ok(s) => Ok(chosen(s, "quic answered first")),
                Err(qe) => match ws.await {
                    Ok(s) => Ok(chosen(s, &format!("quic failed: {qe}"))),
                    Err(we) => Err(format!("quic: {qe}; websocket: {we}")),
                },
            },
            r = &mut ws => match r {
                Ok(s) => Ok(chosen(s, "websocket answered first (udp slow or blocked)")),
                Err(we) => match quic.await {
                    Ok(s) => Ok(chosen(s, "quic answered first")),
                    Err(qe) => Err(format!("quic: {qe}; websocket: {we}")),
                },
            },
        }
    }

    /// One QUIC attempt, bounded by [`QUIC_TIMEOUT`].
    pub async fn quic(&self, url: &RelayUrl) -> Result<Session, String> {
        let attempt = async {
            let addrs = url
                .resolve()
                .await
                .map_err(|e| format!("resolve {}: {e}", url.host))?;
            let mut last = format!("{} resolved to no address", url.host);
            let name = self.server_name.clone().unwrap_or_else(|| url.host.clone());
            for addr in addrs {
                let liveness = self.liveness.unwrap_or(Liveness::AGENT);
                let endpoint =
                    quic::client(addr, &self.material, liveness).map_err(|e| e.to_string())?;
                match endpoint
                    .connect(addr, &name)
                    .instrument(info_span!("dial", %addr))
                    .await
                {
                    Ok(s) => return Ok(s),
                    Err(e) => {
                        debug!(%addr, error = %e, "quic dial failed");
                        last = e.to_string();
                    }
                }
            }
            Err(last)
        };
        tokio::time::timeout(QUIC_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("{url}: no answer over udp within {QUIC_TIMEOUT:?}")))
    }

    /// One WebSocket attempt (through a forward proxy when configured or set in the environment).
    pub async fn websocket(
        &self,
        url: &RelayUrl,
        headers: &[(String, String)],
    ) -> Result<Session, String> {
        let opts = self.ws_options(url, headers)?;
        ws::connect(&opts, &self.material)
            .await
            .map_err(|e| e.to_string())
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
            Err(e) => Err(Pinned::Failed(e.to_string())),
        }
    }

    fn ws_options(
        &self,
        url: &RelayUrl,
        headers: &[(String, String)],
    ) -> Result<ws::ConnectOptions, String> {
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
        opts.proxy = match self.websocket.proxy.as_deref() {
            Some("none") | Some("") => None,
            Some(p) => Some(Proxy::parse("websocket.proxy", p).map_err(|e| e.to_string())?),
            None => {
                proxy::proxy_from_env(|k| std::env::var(k).ok(), url.scheme, &url.host, url.port)
                    .map_err(|e| e.to_string())?
            }
        };
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
    Failed(String),
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
