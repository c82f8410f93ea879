//! End-to-end tests with real parts: private `mariadbd` servers, the `mariadb` and `mysqldump`
//! clients, a Rust MySQL driver, and the relay and agent in-process or as real processes.

mod basic;
mod certs;
mod config;
mod cuts;
mod faults;
mod fleet;
mod mysql_e2e;
mod mysql_tls;
mod router;
mod security;
mod websocket;
