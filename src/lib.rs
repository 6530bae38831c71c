//! tollgate: a credit-enforcing reverse proxy for HTTP SMS gateways.
//!
//! Data flows one way: `api` (front doors parse requests into typed commands
//! and render typed answers) → `ledger` (balances and reservations, no HTTP)
//! → `store` (write-behind persistence). `tariff` prices messages with pure
//! functions; `proxy` is the thin pingora glue; `config` turns files into one
//! validated `Config`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dlr;
pub mod downstream;
pub mod error;
pub mod handover;
pub mod idempotency;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod money;
pub mod notify;
pub mod outbox;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod server;
pub mod service;
pub mod sim;
pub mod store;
pub mod tariff;
pub mod tls;
pub mod upstream;
