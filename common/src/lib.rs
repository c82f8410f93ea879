//! Shared parts of Postern: the wire protocol (pure codec), transports (QUIC, WebSocket), TLS
//! and PKI helpers, config plumbing, byte splicing and logging setup.
//!
//! The agent and the relay are written against [`transport::Session`] and
//! [`transport::Stream`]; the protocol spoken on those streams is in [`protocol`] and read and
//! written by [`wire`].

pub mod binding;
pub mod config;
pub mod control;
pub mod events;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod mysql;
pub mod net;
pub mod pki;
pub mod policy;
pub mod procstat;
pub mod protocol;
pub mod shutdown;
pub mod splice;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;
