//! The relay's listeners for clients, one module per kind.
//!
//! * [`mysql`]: the MySQL-native listener of a service (TLS negotiated in-band, client
//!   certificate, user policy) for stock MySQL and MariaDB clients.
//!
//! The TLS-first listeners and `connect` sessions are in [`crate::clients`].

pub mod mysql;
