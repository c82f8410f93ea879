//! End-to-end tests with real parts: private `mariadbd` servers, the `mariadb` and `mysqldump`
//! clients, a Rust MySQL driver, the Java, Go, Node and Python drivers whose settings README.md
//! documents, and the relay and agent in-process or as real processes.

mod audit;
mod basic;
mod broker;
mod certs;
mod config;
mod consensus;
mod cuts;
mod dashboard;
mod demo;
mod diagnose;
mod drain;
mod drivers;
mod failover;
mod faults;
mod fleet;
mod harness;
mod http_api;
mod intermediate;
mod limits;
mod lockout;
mod mysql_e2e;
mod mysql_tls;
mod packaging;
mod platform;
mod reload;
mod reload_relay;
mod router;
mod security;
mod sidecar;
mod users;
mod websocket;
